"""nograd demo: a Gradio app, one tab per family (VLM, LLM, Diffusion, Merge), the plain model beside the method.

    nograd demo                          # or: python -m demo, python demo/app.py
    nograd demo --port 7861              # --host 0.0.0.0 / --share only when you ask for them

It binds to 127.0.0.1 unless ``--host`` says otherwise and makes no public link unless ``--share`` is given.
With no model given, every tab runs on built-in tiny models with random weights (``nograd.tiny``): they show the
mechanics only. Uploads: images only (PNG, JPEG, WebP, ...), at most ``MAX_FILE_SIZE`` and ``compare.MAX_SIDE``
pixels a side; models load from safetensors only. Without gradio installed, this prints every method with its
options instead.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import pathlib
import sys

if __package__ in (None, ""):  # python demo/app.py: make the repository root importable for ``demo``
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import nograd  # noqa: E402
from nograd import tiny  # noqa: E402
from nograd.cli import add_demo_arguments  # noqa: E402

from demo import compare  # noqa: E402

MAX_FILE_SIZE = "10mb"
QUESTION = "What is in the picture?"
PROMPT = "The capital of France is"


def print_methods() -> None:
    for name, info in nograd.methods().items():
        print(f"{name}: {info.summary}")
        print(f"  paper: {info.paper} (arXiv {info.arxiv})")
        print(f"  families: {', '.join(info.families)}")
        for option, meta in info.options.items():
            print(f"  {option}={meta['default']!r}: {meta['doc']}")


# ---- the app ------------------------------------------------------------------------------------------------------
def _timing(result) -> str:
    t = result["timing"]
    head = f"**{result['method']}** on *{result['label']}*: "
    if "plain_s" not in t:  # RefAM grounds an image: there is no plain pass to compare with
        return head + f"method {t['method_s']:.2f} s (no plain pass)"
    ratio = f" ({t['method_s'] / t['plain_s']:.2f}x)" if t["plain_s"] else ""
    return head + f"plain {t['plain_s']:.2f} s, method {t['method_s']:.2f} s{ratio}"


def _not_available(tab: str) -> str:
    gone = compare.missing(tab)
    return (f"Not available in this build of nograd: {', '.join(gone)} "
            f"(`nograd.methods()` does not list {'it' if len(gone) == 1 else 'them'})." if gone else "")


def build_app():
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    def guard(function):
        """Run a tab's computation; a ValueError/TypeError (bad option, bad upload, unloadable model) becomes a
        visible message instead of a stack trace."""
        @functools.wraps(function)  # Gradio reads the signature through it: ``progress=gr.Progress()`` is seen
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
                raise gr.Error(str(error)) from None
        return run

    def model_box(what: str):
        return gr.Textbox(label=f"{what}: a local folder or a hub id (safetensors only)", value="",
                          placeholder="empty = the built-in tiny model (random weights); tiny:<family> another one, "
                                      "e.g. tiny:qwen2_vl")

    def method_picker(tab: str, default: str):
        names = compare.available(tab)
        picker = gr.Dropdown(names, value=default if default in names else (names[0] if names else None),
                             label="method")
        with gr.Accordion("the method and its options", open=False):
            doc = gr.Markdown(compare.method_doc(picker.value) if picker.value else _not_available(tab))
        picker.change(compare.method_doc, picker, doc)
        return picker

    with gr.Blocks(title="nograd demo") as app:
        gr.Markdown("# nograd: training-free attention methods, plain model vs method\n"
                    f"With an empty model box each tab runs a **{tiny.LABEL}**. Load a real model (a local folder "
                    "with safetensors weights, or a hub id when online) to see what a method does to quality.")

        with gr.Tab("VLM"):
            with gr.Row():
                with gr.Column():
                    vlm_source = model_box("VLM")
                    vlm_method = method_picker("VLM", "carve")
                    vlm_image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"],
                                         elem_id="vlm-image",
                                         image_mode="RGB", height=256)
                    vlm_question = gr.Textbox(QUESTION, label="question")
                    vlm_tokens = gr.Slider(1, compare.MAX_NEW_TOKENS, value=8, step=1, label="max new tokens",
                                           elem_id="vlm-tokens")
                    vlm_options = gr.Textbox("", label="options (JSON), e.g. {\"top_p\": 0.3}")
                    vlm_run = gr.Button("Run", variant="primary", elem_id="vlm-run")
                    gr.Examples([[tiny.image(70, 42), QUESTION, "carve"], [tiny.image(56, 56, 1), QUESTION,
                                                                            "pyramiddrop"]],
                                [vlm_image, vlm_question, vlm_method], label="examples (tiny model)",
                                elem_id="vlm-examples")
                with gr.Column():
                    with gr.Row():
                        vlm_plain = gr.Textbox(label="plain model", elem_id="vlm-plain")
                        vlm_steered = gr.Textbox(label="with the method", elem_id="vlm-method")
                    with gr.Row():
                        vlm_plain_heat = gr.Image(label="plain: last prompt token's attention over the image",
                                                  elem_id="vlm-plain-heat", interactive=False)
                        vlm_heat = gr.Image(label="method: attention / CARVE saliency", elem_id="vlm-method-heat",
                                            interactive=False)
                    vlm_gallery = gr.Gallery(label="CARVE mask and refined image / PyramidDrop, FastV kept tokens",
                                             elem_id="vlm-gallery", columns=3, height=300)
                    vlm_timing = gr.Markdown(elem_id="vlm-timing")
                    vlm_stats = gr.JSON(label="h.stats", elem_id="vlm-stats")

            def vlm(source, method, image, question, tokens, options, progress=gr.Progress()):
                r = compare.vlm_compare(source, method, image, question, tokens, compare.parse_options(options),
                                        progress)
                return (r["plain_text"], r["method_text"], r["plain_heat"], r["method_heat"], r["gallery"],
                        _timing(r), r["stats"])

            vlm_run.click(guard(vlm), [vlm_source, vlm_method, vlm_image, vlm_question, vlm_tokens, vlm_options],
                          [vlm_plain, vlm_steered, vlm_plain_heat, vlm_heat, vlm_gallery, vlm_timing, vlm_stats])

        with gr.Tab("LLM"):
            with gr.Row():
                with gr.Column():
                    llm_source = model_box("LLM")
                    llm_method = method_picker("LLM", "zerotuning")
                    llm_prompt = gr.Textbox(PROMPT, label="prompt", lines=3)
                    llm_tokens = gr.Slider(1, compare.MAX_NEW_TOKENS, value=16, step=1, label="max new tokens")
                    llm_options = gr.Textbox("", label="options (JSON), e.g. {\"gamma\": 1.5}")
                    llm_run = gr.Button("Run", variant="primary", elem_id="llm-run")
                    gr.Examples([[PROMPT, "zerotuning", "{\"gamma\": 1.5}"], [PROMPT, "act", ""]],
                                [llm_prompt, llm_method, llm_options], label="examples (tiny model)",
                                elem_id="llm-examples")
                with gr.Column():
                    with gr.Row():
                        llm_plain = gr.Textbox(label="plain model", elem_id="llm-plain")
                        llm_steered = gr.Textbox(label="with the method", elem_id="llm-method")
                    llm_plain_att = gr.HighlightedText(label="plain: last prompt token's attention",
                                                       elem_id="llm-plain-heat")
                    llm_att = gr.HighlightedText(label="method: last prompt token's attention",
                                                 elem_id="llm-method-heat")
                    llm_timing = gr.Markdown(elem_id="llm-timing")
                    llm_stats = gr.JSON(label="h.stats", elem_id="llm-stats")

            def llm(source, method, prompt, tokens, options, progress=gr.Progress()):
                r = compare.llm_compare(source, method, prompt, tokens, compare.parse_options(options), progress)
                return (r["plain_text"], r["method_text"], r["plain_attention"], r["method_attention"], _timing(r),
                        r["stats"])

            llm_run.click(guard(llm), [llm_source, llm_method, llm_prompt, llm_tokens, llm_options],
                          [llm_plain, llm_steered, llm_plain_att, llm_att, llm_timing, llm_stats])

        with gr.Tab("Diffusion"):
            _diffusion_tab(gr, guard, model_box, method_picker)

        with gr.Tab("Merge"):
            _merge_tab(gr, guard, method_picker)
    return app


def _diffusion_tab(gr, guard, model_box, method_picker):
    names = compare.available("Diffusion")
    if not names or not hasattr(compare, "diffusion_compare"):
        gr.Markdown(_not_available("Diffusion") or "The Diffusion tab is not available in this build.",
                    elem_id="diffusion-missing")
        return
    note = _not_available("Diffusion")
    if note:
        gr.Markdown(note)
    with gr.Row():
        with gr.Column():
            source = model_box("diffusers pipeline (SD3 / FLUX)")
            method = method_picker("Diffusion", "softpag")
            prompt = gr.Textbox("a red car on the left", label="prompt (guidance) / referring expression (RefAM)")
            image = gr.Image(type="pil", label="image to segment (RefAM only)", sources=["upload", "clipboard"],
                             image_mode="RGB", height=200)
            steps = gr.Slider(1, 50, value=4, step=1, label="denoising steps")
            options = gr.Textbox("", label="options (JSON); empty = the demo's defaults for the tiny model")
            run = gr.Button("Run", variant="primary", elem_id="diffusion-run")
            gr.Examples([["a red car on the left", "softpag", None], ["the red car", "refam", tiny.image(48, 32, 2)]],
                        [prompt, method, image], label="examples (tiny model)", elem_id="diffusion-examples")
        with gr.Column():
            with gr.Row():
                plain = gr.Image(label="plain pipeline / input image", elem_id="diffusion-plain", interactive=False)
                steered = gr.Image(label="with the method / RefAM heatmap", elem_id="diffusion-method",
                                   interactive=False)
            gallery = gr.Gallery(label="RefAM mask and overlay / guided minus plain", elem_id="diffusion-gallery",
                                 columns=3, height=260)
            timing = gr.Markdown(elem_id="diffusion-timing")
            stats = gr.JSON(label="h.stats", elem_id="diffusion-stats")

    def diffusion(source, method, prompt, image, steps, options, progress=gr.Progress()):
        r = compare.diffusion_compare(source, method, prompt, image, steps, compare.parse_options(options), progress)
        return r["plain_image"], r["method_image"], r["gallery"], _timing(r), r["stats"]

    run.click(guard(diffusion), [source, method, prompt, image, steps, options],
              [plain, steered, gallery, timing, stats])


def _merge_tab(gr, guard, method_picker):
    names = compare.available("Merge")
    if not names or not hasattr(compare, "merge_compare"):
        gr.Markdown(_not_available("Merge") or "The Merge tab is not available in this build.",
                    elem_id="merge-missing")
        return
    with gr.Row():
        with gr.Column():
            gr.Markdown("FRANK merges a reasoning LLM into a multimodal LLM in place (`nograd.apply(mllm, 'frank', "
                        "reasoning=..., base=...)`); for checkpoints on disk use `nograd merge frank --mllm A "
                        "--reasoning B --base C --out D`. Here: the built-in tiny LLaVA, a tiny reasoning Llama "
                        "and their common base.")
            method_picker("Merge", "frank")
            image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"], image_mode="RGB",
                             height=200, value=tiny.image(56, 56, 3))
            question = gr.Textbox(QUESTION, label="question")
            options = gr.Textbox("", label="options (JSON), e.g. {\"rule\": \"linear\", \"lambda_r\": 0.5}")
            run = gr.Button("Run", variant="primary", elem_id="merge-run")
            gr.Examples([[QUESTION, ""], [QUESTION, "{\"rule\": \"linear\", \"lambda_r\": 0.5}"]], [question, options],
                        label="examples (tiny models)", elem_id="merge-examples")
        with gr.Column():
            with gr.Row():
                plain = gr.Textbox(label="the MLLM", elem_id="merge-plain")
                merged = gr.Textbox(label="merged (FRANK)", elem_id="merge-method")
            table = gr.Dataframe(label="per decoder layer: visual prior pi_V and reasoning weight lambda_R",
                                 elem_id="merge-table")
            timing = gr.Markdown(elem_id="merge-timing")
            stats = gr.JSON(label="h.stats", elem_id="merge-stats")

    def merge(image, question, options, progress=gr.Progress()):
        r = compare.merge_compare(image, question, compare.parse_options(options), progress)
        import pandas

        return r["plain_text"], r["method_text"], pandas.DataFrame(r["table"]), _timing(r), r["stats"]

    run.click(guard(merge), [image, question, options], [plain, merged, table, timing, stats])


# ---- the command line ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    return add_demo_arguments(argparse.ArgumentParser(prog="python -m demo", description="The nograd Gradio demo."))\
        .parse_args(argv)


def launch_options(args: argparse.Namespace) -> dict:
    """The keyword arguments ``build_app().launch`` gets for ``args``."""
    return dict(server_name=args.host, server_port=args.port, share=bool(args.share), max_file_size=MAX_FILE_SIZE,
                ssr_mode=False, mcp_server=False, footer_links=[])


def supported(options: dict) -> dict:
    """``options`` less those this Gradio's ``launch`` does not take (``footer_links``, ``mcp_server`` are 6.x)."""
    import inspect

    import gradio as gr

    accepted = inspect.signature(gr.Blocks.launch).parameters
    return {k: v for k, v in options.items() if k in accepted or k in ("server_name", "server_port", "share")}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("The Gradio demo needs gradio: pip install -e \".[demo]\". Meanwhile, the methods nograd has:\n")
        print_methods()
        return 0
    if not _is_loopback(args.host):
        print(f"warning: binding to {args.host}: other machines can reach the demo", file=sys.stderr)
    if args.share:
        print("warning: --share makes a public link to this demo", file=sys.stderr)
    try:
        build_app().queue(default_concurrency_limit=1).launch(**supported(launch_options(args)))
    except OSError as error:  # the port is taken (or this host cannot be bound): say so in one line
        print(f"nograd demo: error: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
