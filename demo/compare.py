"""What each demo tab computes, without any UI: the plain model and the method side by side.

Every ``*_compare`` function returns a plain dict (answers, PIL images, token scores, ``h.stats`` made
JSON-safe, timings), so the tests call them directly and the Gradio app only lays them out. Models are loaded once
per source and cached; an empty source means the built-in tiny models (``nograd.tiny``). Only safetensors weights
are loaded (``use_safetensors=True``: nothing is unpickled) and no remote code runs.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from typing import Callable

import torch

import nograd
from nograd.attention import Intervention, intervene
from nograd.handle import Handle
from nograd.methods.carve_geometry import processor_views, to_pixels
from nograd import tiny
from nograd.patches import adapter_for

FAMILIES = {
    "VLM": ("carve", "pyramiddrop", "fastv", "paint", "pai", "clearsight"),
    "LLM": ("zerotuning", "act"),
    "Diffusion": ("softpag", "pag", "headhunter", "refam"),
    "Merge": ("frank",),
}
MAX_SIDE = 4096
"""The longest side of an uploaded image the demo accepts, in pixels (so at most 4096 x 4096)."""
MAX_NEW_TOKENS = 64
DISPLAY = 256
"""Shorter side, in pixels, that small images are enlarged to for display."""

_MODELS: dict[tuple[str, str], tuple] = {}


def available(tab: str) -> list[str]:
    """The methods of ``tab`` that this build registers (``nograd.methods()``)."""
    registered = nograd.methods()
    return [name for name in FAMILIES[tab] if name in registered]


def missing(tab: str) -> list[str]:
    registered = nograd.methods()
    return [name for name in FAMILIES[tab] if name not in registered]


def method_doc(name: str) -> str:
    """Markdown: the method's summary, paper and options with defaults, from the registry."""
    info = nograd.methods().get(name)
    if info is None:
        return f"`{name}` is not available in this build of nograd."
    lines = [f"**{info.name}**: {info.summary}  ", f"{info.paper} (arXiv {info.arxiv}); families: "
             f"{', '.join(info.families)}", ""]
    lines += [f"- `{option}` = `{meta['default']!r}`: {meta['doc']}" for option, meta in info.options.items()]
    return "\n".join(lines)


def parse_options(text: str | None) -> dict:
    """The options box: a JSON object (``{"gamma": 1.5}``), or empty."""
    if not text or not text.strip():
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"options must be a JSON object such as {{\"gamma\": 1.5}}: {error}") from None
    if not isinstance(options, dict):
        raise ValueError("options must be a JSON object such as {\"gamma\": 1.5}")
    return options


def _no_progress(*args, **kwargs) -> None:
    """The progress callback outside Gradio."""


# ---- models ---------------------------------------------------------------------------------------------------
TINY_PREFIX = "tiny:"
TINY_DIT_FAMILIES = ("sd3", "flux")
"""``tiny:<family>`` in a model box picks another built-in tiny family (``nograd.tiny.VLM_FAMILIES``, or a text
family for the LLM tab), e.g. ``tiny:qwen2_vl``."""


def load(kind: str, source: str | None):
    """(model, processor-or-tokenizer, label) for ``kind`` ("vlm", "llm"), cached. Empty source: the tiny model;
    ``tiny:<family>``: the tiny model of that family."""
    source = (source or "").strip()
    key = (kind, source)
    if key not in _MODELS:
        if not source or source.startswith(TINY_PREFIX):
            family = source[len(TINY_PREFIX):].strip()
            try:
                model, processor = getattr(tiny, kind)(**({"family": family} if family else {}))
            except KeyError as error:
                raise ValueError(f"{source!r}: {error.args[0]}") from None
            _MODELS[key] = (model, processor, tiny.LABEL + (f" ({family})" if family else ""))
        else:
            import transformers as tf

            model_cls = tf.AutoModelForImageTextToText if kind == "vlm" else tf.AutoModelForCausalLM
            processor_cls = tf.AutoProcessor if kind == "vlm" else tf.AutoTokenizer
            try:
                model = model_cls.from_pretrained(source, use_safetensors=True, dtype="auto").eval()
                processor = processor_cls.from_pretrained(source)
            except (OSError, ValueError) as error:
                raise ValueError(f"could not load {source!r} (a local folder or a hub id with safetensors weights; "
                                 f"no network means local folders only): {error}") from None
            _MODELS[key] = (model, processor, source)
    return _MODELS[key]


def check_image(image):
    if image is None:
        raise ValueError("upload an image first (PNG, JPEG or WebP)")
    if max(image.size) > MAX_SIDE:
        raise ValueError(f"the image is {image.width}x{image.height}; the demo accepts up to "
                         f"{MAX_SIDE} x {MAX_SIDE} pixels: resize it first")
    return image.convert("RGB")


# ---- drawing ------------------------------------------------------------------------------------------------
def _enlarge(picture):
    from PIL import Image

    scale = max(1, min(math.ceil(DISPLAY / min(picture.size)), MAX_SIDE // max(picture.size)))  # <= MAX_SIDE
    return picture if scale == 1 else picture.resize((picture.width * scale, picture.height * scale),
                                                     Image.Resampling.NEAREST)


def heat_overlay(image, heat: torch.Tensor, alpha: float = 0.55):
    """``heat`` (H, W) in a blue-to-red colour map over ``image`` (W x H), enlarged for display."""
    from PIL import Image

    heat = heat.detach().float().cpu()
    low, high = heat.min(), heat.max()
    h = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    colour = torch.stack([(1.5 - (4 * h - c).abs()).clamp(0, 1) for c in (3, 2, 1)], dim=-1)
    base = torch.from_numpy(__import__("numpy").asarray(image.convert("RGB"), dtype="float32") / 255.0)
    mixed = (1 - alpha) * base + alpha * colour
    return _enlarge(Image.fromarray((mixed * 255).round().to(torch.uint8).numpy()))


def mask_overlay(image, mask: torch.Tensor):
    """Pixels outside ``mask`` (H, W) bool dimmed to a quarter, inside tinted green."""
    from PIL import Image
    import numpy as np

    base = torch.from_numpy(np.asarray(image.convert("RGB"), dtype="float32") / 255.0)
    m = mask.bool().cpu()[..., None]
    green = torch.tensor([0.2, 1.0, 0.2])
    out = torch.where(m, 0.7 * base + 0.3 * green, 0.25 * base)
    return _enlarge(Image.fromarray((out * 255).round().to(torch.uint8).numpy()))


# ---- attention read-out ---------------------------------------------------------------------------------------
class _LastRow(Intervention):
    """Reads, at prefill, the head-mean softmax row of the prompt's last token (the edited row, if a method edits)."""

    observes = True

    def __init__(self, sink: dict):
        self.sink = sink

    def observe(self, call) -> None:
        _, _, m, n = call.shape
        if m < 2 or n != self.sink.get("length", n) or call.layer_idx in self.sink["rows"]:
            return
        rows = call.attention_rows(torch.tensor([m - 1]))
        self.sink["rows"][call.layer_idx] = rows[:, :, 0].float().mean(dim=1).cpu()


@contextmanager
def last_row_attention(model, length: int | None = None):
    """Record, during one forward/generate, the last prompt token's attention over every key (mean over heads and
    the later half of the decoder layers): ``sink["rows"]`` layer -> (B, N). Observation only; removed on exit."""
    adapter = adapter_for(model)
    handle = Handle(model, adapter, "demo-readout", None)
    sink = {"rows": {}, **({"length": length} if length else {})}
    modules = adapter.attention_modules
    intervene(handle, {module: _LastRow(sink) for module in modules[len(modules) // 2:]})
    try:
        yield sink
    finally:
        handle.remove()


def _mean_row(sink) -> torch.Tensor | None:
    rows = list(sink["rows"].values())
    return torch.stack(rows).mean(dim=0)[0] if rows else None


# ---- VLM ----------------------------------------------------------------------------------------------------
def vlm_inputs(processor, image, question: str):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(text=prompt, images=image, return_tensors="pt")


def _generate(model, inputs, max_new_tokens: int):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _views(model, processor, inputs, image):
    adapter = adapter_for(model)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    grid = adapter.image_grids(inputs["input_ids"], **extra)[0]
    return processor_views(adapter, processor, grid, image.size)


def _image_heat(row, positions, views, image):
    return None if row is None else heat_overlay(image, to_pixels(row[positions], views, image.size))


def kept_overlay(image, positions: torch.Tensor, views, kept: torch.Tensor):
    """The image with the visual tokens a drop method removed blacked out, cell by cell."""
    from PIL import ImageDraw

    picture = image.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    kept = set(kept.tolist())
    for view in views:
        x0, y0, x1, y1 = view.box
        for cell, index in enumerate(view.index.tolist()):
            if int(positions[index]) in kept:
                continue
            r, c = divmod(cell, view.cols)
            box = (x0 + (x1 - x0) * c / view.cols, y0 + (y1 - y0) * r / view.rows,
                   x0 + (x1 - x0) * (c + 1) / view.cols - 1, y0 + (y1 - y0) * (r + 1) / view.rows - 1)
            draw.rectangle(box, fill=(20, 20, 20))
    return _enlarge(picture)


def vlm_compare(source: str | None, method: str, image, question: str, max_new_tokens: int = 8,
                options: dict | None = None, progress: Callable | None = None) -> dict:
    """Answer ``question`` about ``image`` with the plain model and with ``method``; heatmaps, masks, stats."""
    progress = _no_progress if progress is None else progress  # (a gr.Progress is falsy: it has a len)
    options = _json_options(options or {})
    image = check_image(image)
    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    progress(0.05, desc="loading the model")
    model, processor, label = load("vlm", source)
    inputs = vlm_inputs(processor, image, question)
    positions, views = _views(model, processor, inputs, image)
    length = inputs["input_ids"].shape[1]
    decode = processor.batch_decode if hasattr(processor, "batch_decode") else processor.tokenizer.batch_decode

    progress(0.2, desc="plain model")
    start = time.perf_counter()
    with last_row_attention(model, length) as sink:
        plain_ids = _generate(model, inputs, max_new_tokens)
    plain_seconds = time.perf_counter() - start
    result = dict(label=label, method=method, plain_text=decode(plain_ids, skip_special_tokens=True)[0],
                  plain_heat=_image_heat(_mean_row(sink), positions, views, image), gallery=[])

    progress(0.5, desc=f"{method}")
    start = time.perf_counter()
    if method == "carve":
        for name in ("probe_max_new_tokens", "max_new_tokens"):  # the demo's cap holds for CARVE's own passes too
            chosen = options.get(name, max_new_tokens)
            options[name] = max(1, min(int(chosen), MAX_NEW_TOKENS)) if isinstance(chosen, int) else chosen
        with nograd.apply(model, "carve", processor=processor, **options) as h:
            out = h.generate(image, question)
            stats = h.stats_json()
        result.update(method_text=out.text, method_heat=heat_overlay(image, out.saliency))
        result["gallery"] = [(mask_overlay(image, out.mask), "CARVE mask (kept regions)"),
                             (_enlarge(out.refined_image.convert("RGB")), "refined image (the final pass sees it)")]
    else:
        with nograd.apply(model, method, **options) as h:
            with last_row_attention(model, length) as sink:
                ids = _generate(model, inputs, max_new_tokens)
            stats = h.stats_json()
            kept = h.stats.get("kept")
            boundaries = h.stats.get("boundaries", [])
        result.update(method_text=decode(ids, skip_special_tokens=True)[0])
        if kept:  # PyramidDrop / FastV: positions kept per stage and row
            result["method_heat"] = None
            result["gallery"] = [(kept_overlay(image, positions, views, stage[0]),
                                  f"visual tokens kept from layer {layer} on: {len(stage[0])} of {len(positions)}")
                                 for layer, stage in zip(boundaries, kept)]
        else:
            result["method_heat"] = _image_heat(_mean_row(sink), positions, views, image)
    method_seconds = time.perf_counter() - start
    progress(1.0, desc="done")
    result.update(stats=stats, timing=dict(plain_s=round(plain_seconds, 3), method_s=round(method_seconds, 3)))
    return result


# ---- LLM ----------------------------------------------------------------------------------------------------
def _token_scores(tokenizer, ids: torch.Tensor, row: torch.Tensor | None):
    """[(token text, score in [0, 1])] for gr.HighlightedText: the last token's attention, max-normalised."""
    if row is None:
        return []
    weights = row[-ids.shape[0]:]
    weights = weights / weights.max().clamp_min(1e-12)
    return [(tokenizer.decode([int(t)]), round(float(w), 3)) for t, w in zip(ids, weights)]


def llm_compare(source: str | None, method: str, prompt: str, max_new_tokens: int = 16, options: dict | None = None,
                progress: Callable | None = None) -> dict:
    """Continue ``prompt`` with the plain model and with ``method``; the last prompt token's attention, stats."""
    progress = _no_progress if progress is None else progress  # (a gr.Progress is falsy: it has a len)
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt first")
    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    progress(0.05, desc="loading the model")
    model, tokenizer, label = load("llm", source)
    inputs = tokenizer(prompt, return_tensors="pt")
    ids = inputs["input_ids"][0]
    length = ids.shape[0]
    progress(0.2, desc="plain model")
    start = time.perf_counter()
    with last_row_attention(model, length) as sink:
        plain = _generate(model, inputs, max_new_tokens)
    plain_seconds = time.perf_counter() - start
    plain_scores = _token_scores(tokenizer, ids, _mean_row(sink))
    progress(0.5, desc=method)
    start = time.perf_counter()
    with nograd.apply(model, method, **_json_options(options or {})) as h:
        with last_row_attention(model, length) as sink:
            steered = _generate(model, inputs, max_new_tokens)
        stats = h.stats_json()
    method_seconds = time.perf_counter() - start
    progress(1.0, desc="done")
    return dict(label=label, method=method, plain_text=tokenizer.decode(plain[0], skip_special_tokens=True),
                method_text=tokenizer.decode(steered[0], skip_special_tokens=True), plain_attention=plain_scores,
                method_attention=_token_scores(tokenizer, ids, _mean_row(sink)), stats=stats,
                timing=dict(plain_s=round(plain_seconds, 3), method_s=round(method_seconds, 3)))


# ---- Diffusion ----------------------------------------------------------------------------------------------------
TINY_DIFFUSION_OPTIONS = {
    "softpag": {"heads": {"0": "all", "1": [1]}, "u": 1.0},
    "pag": {"layers": [0]},
    "headhunter": {"heads": [[0, 1], [1, 0]], "u": 0.5},
    "refam": {"resolution": 48, "max_sequence_length": 48},
}
"""Options the built-in tiny SD3 (2 blocks of 4 heads) and FLUX (4 layers of 2 heads) need; the paper head sets are
for SD3-medium and FLUX.1."""


def load_pipeline(source: str | None):
    source = (source or "").strip()
    key = ("diffusion", source)
    if key not in _MODELS:
        if not source or source.startswith(TINY_PREFIX):
            family = source[len(TINY_PREFIX):].strip() or "sd3"
            if family not in TINY_DIT_FAMILIES:
                raise ValueError(f"{source!r}: the tiny diffusion families are {', '.join(TINY_DIT_FAMILIES)}")
            pipe = getattr(tiny, family)()
            label = tiny.LABEL + (f" ({family})" if source else "")
        else:
            from diffusers import DiffusionPipeline

            try:
                pipe, label = DiffusionPipeline.from_pretrained(source, use_safetensors=True), source
            except (OSError, ValueError) as error:
                raise ValueError(f"could not load {source!r} (a local diffusers folder or a hub id with safetensors "
                                 f"weights): {error}") from None
        pipe.set_progress_bar_config(disable=True)
        _MODELS[key] = (pipe, None, label)
    return _MODELS[key]


def _json_options(options: dict) -> dict:
    """JSON has no tuples or int keys: {"0": "all"} -> {0: "all"}, [[0, 1]] -> [(0, 1)]."""
    def fix(value):
        if isinstance(value, dict):
            return {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: fix(v) for k, v in value.items()}
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return [tuple(v) for v in value]
        return value
    return {k: fix(v) for k, v in options.items()}


def diffusion_compare(source: str | None, method: str, prompt: str, image=None, steps: int = 4,
                      options: dict | None = None, progress: Callable | None = None) -> dict:
    """SoftPAG / PAG / HeadHunter: the plain pipeline's image beside the guided one (same seed). RefAM: the
    referring expression grounded in ``image``: heatmap, mask, overlay."""
    progress = _no_progress if progress is None else progress  # (a gr.Progress is falsy: it has a len)
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt first")
    progress(0.05, desc="loading the pipeline")
    pipe, _, label = load_pipeline(source)
    tiny_model = not (source or "").strip() or source.strip().startswith(TINY_PREFIX)
    options = _json_options({**(TINY_DIFFUSION_OPTIONS.get(method, {}) if tiny_model and not options else {}),
                             **(options or {})})
    result = dict(label=label, method=method, gallery=[])
    if method == "refam":
        image = check_image(image)
        progress(0.3, desc="refam: grounding")
        start = time.perf_counter()
        with nograd.apply(pipe, "refam", **options) as h:
            res = h.ground(image, prompt)
            stats = h.stats_json()
        seconds = time.perf_counter() - start
        result.update(plain_image=_enlarge(image), method_image=heat_overlay(image, res.heatmap),
                      gallery=[(mask_overlay(image, res.mask), "RefAM mask"),
                               (_enlarge(res.overlay().convert("RGB")), "heatmap, mask outline and point")],
                      stats=dict(stats, kept_tokens=res.kept_tokens, filtered_tokens=res.filtered_tokens),
                      timing=dict(method_s=round(seconds, 3)))
        progress(1.0, desc="done")
        return result
    steps = max(1, min(int(steps), 50))
    size = dict(height=32, width=32) if tiny_model else {}

    def sample(share: float, offset: float, what: str):
        def on_step(pipeline, step, timestep, kwargs):
            progress(offset + share * (step + 1) / steps, desc=f"{what}: step {step + 1} of {steps}")
            return kwargs

        with torch.no_grad():
            return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                        callback_on_step_end=on_step, **size).images[0]

    start = time.perf_counter()
    plain = sample(0.45, 0.05, "plain")
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with nograd.apply(pipe, method, **options) as h:
        guided = sample(0.5, 0.5, method)
        stats = h.stats_json()
    method_seconds = time.perf_counter() - start
    progress(1.0, desc="done")
    from PIL import ImageChops

    difference = ImageChops.difference(plain.convert("RGB"), guided.convert("RGB"))
    change = float(torch.tensor(list(difference.getdata()), dtype=torch.float32).mean()) / 255
    amplified = difference.point(lambda v: min(255, 4 * v))
    result.update(plain_image=_enlarge(plain.convert("RGB")), method_image=_enlarge(guided.convert("RGB")),
                  gallery=[(_enlarge(amplified), f"|guided - plain| x4 (mean {change:.3f} of full scale)")],
                  stats=dict(stats, mean_abs_change=round(change, 4)),
                  timing=dict(plain_s=round(plain_seconds, 3), method_s=round(method_seconds, 3)))
    return result


# ---- Merge --------------------------------------------------------------------------------------------------------
def merge_models():
    """FRANK's trio, tiny and homologous (``nograd.tiny.trio``): a LLaVA whose decoder starts as the base Llama, a
    reasoning Llama fine-tuned from nowhere (another seed) and the base; cached."""
    key = ("merge", "")
    if key not in _MODELS:
        mllm, processor, reasoning, base = tiny.trio(seed=0, layers=8)
        _MODELS[key] = ((mllm, reasoning, base), processor, tiny.LABEL)
    return _MODELS[key]


def merge_compare(image, question: str, options: dict | None = None, progress: Callable | None = None,
                  max_new_tokens: int = 8) -> dict:
    """The tiny MLLM's answer before and after FRANK merges the reasoning LLM into it (in place, then removed);
    the per-layer visual prior and merge weights."""
    progress = _no_progress if progress is None else progress  # (a gr.Progress is falsy: it has a len)
    image = check_image(image)
    progress(0.05, desc="building the tiny models")
    (mllm, reasoning, base), processor, label = merge_models()
    inputs = vlm_inputs(processor, image, question)
    progress(0.2, desc="the MLLM")
    start = time.perf_counter()
    plain = processor.batch_decode(_generate(mllm, inputs, max_new_tokens), skip_special_tokens=True)[0]
    plain_seconds = time.perf_counter() - start
    progress(0.5, desc="frank: merging")
    start = time.perf_counter()
    with nograd.apply(mllm, "frank", reasoning=reasoning, base=base, **(options or {})) as h:
        merged = processor.batch_decode(_generate(mllm, inputs, max_new_tokens), skip_special_tokens=True)[0]
        stats = h.stats_json()
    method_seconds = time.perf_counter() - start
    progress(1.0, desc="done")
    columns = [c for c in ("pi_v", "lambda_v", "lambda_r") if isinstance(stats.get(c), list)]
    rows = len(stats[columns[0]]) if columns else 0
    table = {"layer": list(range(rows)), **{c: [round(float(v), 4) if isinstance(v, (int, float)) else v
                                                for v in stats[c]] for c in columns}}
    return dict(label=label, method="frank", plain_text=plain, method_text=merged, table=table, stats=stats,
                timing=dict(plain_s=round(plain_seconds, 3), method_s=round(method_seconds, 3)))
