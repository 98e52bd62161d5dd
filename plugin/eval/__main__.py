"""``python -m nograd.eval``: caption COCO images with and without a method and score them with CHAIR.

Subcommands:

- ``chair``: load a local VLM (``AutoModelForImageTextToText`` + ``AutoProcessor``), take the first ``--limit``
  images of a ``random.Random(seed).shuffle`` of the annotation's images (official protocol: seed 927, 500 images),
  caption each with greedy decoding, first plain, then with ``nograd.apply(model, method, **options)``, print both
  runs' metrics side by side and write captions + scores as JSON.
- ``score``: score an existing captions file (a list of ``{"image_id", "caption"}`` as JSON or JSONL, an
  ``{image_id: caption}`` object, or a file written by ``chair``).

Image order: the official ``chair_eval.py`` shuffles ``os.listdir(val2014)`` with ``random.seed(927)``; listdir order
depends on the file system, so the official 500 cannot be reproduced exactly elsewhere. ``--order sorted`` (default)
shuffles the present images sorted by file name, which is reproducible; ``--order listdir`` copies the official
procedure (same images only on the same directory listing); ``--order annotation`` keeps the annotation file's order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .chair import ChairResult, GroundTruth, UnknownImagesError, normalize_id, score

DEFAULT_PROMPT = "Please help me describe the image in detail."
ORDERS = ("sorted", "listdir", "annotation")


# ---- image selection --------------------------------------------------------------------------------------------
def select_images(images: Sequence[dict], limit: int | None = 500, seed: int = 927, image_dir: str | None = None,
                  order: str = "sorted") -> list[dict]:
    """The evaluated images: ``images`` (COCO ``{"id", "file_name"}`` entries), restricted to the files present in
    ``image_dir`` (if given), ordered (``order``), shuffled by ``random.Random(seed)``, the first ``limit`` kept."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    if order == "listdir":
        if image_dir is None:
            raise ValueError("order='listdir' needs image_dir")
        by_name = {image["file_name"]: image for image in images}
        files = os.listdir(image_dir)
        random.Random(seed).shuffle(files)  # what random.seed(927); random.shuffle(os.listdir(...)) does
        chosen = [by_name[name] for name in files if name in by_name]
    else:
        chosen = list(images)
        if image_dir is not None:
            present = set(os.listdir(image_dir))
            chosen = [image for image in chosen if image["file_name"] in present]
        if order == "sorted":
            chosen.sort(key=lambda image: (image["file_name"], str(image["id"])))
        random.Random(seed).shuffle(chosen)
    return chosen if limit is None else chosen[:limit]


def annotation_images(paths: Sequence[str]) -> list[dict]:
    """The ``images`` entries of the instance annotation files (first occurrence of an id wins)."""
    seen: dict[Any, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for image in json.load(f).get("images", []):
                seen.setdefault(normalize_id(image["id"]), {"id": normalize_id(image["id"]),
                                                            "file_name": image["file_name"]})
    return list(seen.values())


# ---- captioning -------------------------------------------------------------------------------------------------
def parse_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``; the value is read as JSON when it parses (``0.7``, ``true``, ``[2, 32]``,
    ``null``), else kept as a string (``paper``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_prompt(processor, prompt: str) -> str:
    """The processor's chat template around one image and ``prompt``; without a template, ``<image>\\n{prompt}``."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{getattr(processor, 'image_token', '<image>')}\n{prompt}"


def caption_images(model, processor, images: Sequence[tuple[Any, str]], prompt: str = DEFAULT_PROMPT,
                   max_new_tokens: int = 512, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Greedy captions ``[{"image_id", "caption"}]`` for ``(image_id, path)`` pairs, one image at a time."""
    import torch
    from PIL import Image

    text = build_prompt(processor, prompt)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for index, (image_id, path) in enumerate(images):
        with Image.open(path) as image:
            inputs = processor(images=image.convert("RGB"), text=text, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                  for k, v in inputs.items() if hasattr(v, "to")}
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        new = ids[0, inputs["input_ids"].shape[1]:]
        out.append({"image_id": image_id, "caption": processor.decode(new, skip_special_tokens=True).strip()})
        if progress:
            progress(f"{index + 1}/{len(images)}")
    return out


def load_model(path: str, dtype: str = "auto", device: str | None = None):
    """``(model, processor)`` from a local folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


# ---- reports ----------------------------------------------------------------------------------------------------
ROWS = (  # (label, metric, scale, format)
    ("CHAIR_S %", "chair_s", 100, "{:.1f}"),
    ("CHAIR_I %", "chair_i", 100, "{:.1f}"),
    ("CHAIR_I unique %", "chair_i_unique", 100, "{:.1f}"),
    ("Recall %", "recall", 100, "{:.1f}"),
    ("Precision %", "precision", 100, "{:.1f}"),
    ("F1 %", "f1", 100, "{:.1f}"),
    ("Length (words)", "mean_length", 1, "{:.1f}"),
    ("Repetition >=3 %", "repetition_rate", 100, "{:.1f}"),
    ("Distinct-2", "distinct_2", 1, "{:.3f}"),
    ("Captions", "n_captions", 1, "{:d}"),
)


def table(results: dict[str, ChairResult]) -> str:
    """Metrics of each run side by side (and plain-to-method deltas when there are two runs)."""
    names = list(results)
    head = ["metric", *names] + (["delta"] if len(names) == 2 else [])
    lines = [head]
    for label, key, scale, fmt in ROWS:
        values = [getattr(results[n], key) * scale for n in names]
        row = [label, *(fmt.format(v) for v in values)]
        if len(names) == 2:
            row.append(("{:+d}" if key == "n_captions" else fmt.replace("{:", "{:+")).format(values[1] - values[0]))
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def load_captions(path: str, image_id_key: str = "image_id", caption_key: str = "caption"
                  ) -> dict[str, list[tuple[Any, str]]]:
    """Run name -> ``(image_id, caption)`` pairs. A ``chair`` output file gives its runs; any other format one run
    named after the file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSONL
    if isinstance(data, dict) and image_id_key in data and caption_key in data:
        data = [data]  # a JSONL file of one record
    if isinstance(data, dict) and isinstance(data.get("runs"), dict):
        return {name: [(c["image_id"], c["caption"]) for c in run["captions"]] for name, run in data["runs"].items()}
    if isinstance(data, dict):
        return {Path(path).stem: [(k, v) for k, v in data.items()]}
    if isinstance(data, list):
        return {Path(path).stem: [(c[image_id_key], c[caption_key]) for c in data]}
    raise ValueError(f"{path}: not a captions file")


def _write(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _run_payload(captions: list[dict], result: ChairResult | None) -> dict:
    return {"captions": captions, **(result.to_dict() if result is not None else {})}


# ---- commands ---------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nograd.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def ground_truth_args(q):
        q.add_argument("--annotations", nargs="+", required=True, metavar="FILE",
                       help="COCO instance annotations (instances_val2014.json format); several files are merged")
        q.add_argument("--captions-annotations", nargs="+", default=None, metavar="FILE",
                       help="COCO caption annotations whose mentioned objects also count as ground truth")
        q.add_argument("--allow-unknown-images", action="store_true",
                       help="score captions of images missing from the annotations as having no objects")

    c = sub.add_parser("chair", help="caption images plain and with a method, score both with CHAIR")
    c.add_argument("--model", required=True, help="local model folder")
    c.add_argument("--method", required=True, help="nograd method name")
    c.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="a method option (JSON value or string); repeatable")
    c.add_argument("--images", required=True, metavar="DIR", help="the image folder (e.g. COCO val2014)")
    ground_truth_args(c)
    c.add_argument("--prompt", default=DEFAULT_PROMPT)
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--limit", type=int, default=500)
    c.add_argument("--seed", type=int, default=927)
    c.add_argument("--order", choices=ORDERS, default="sorted", help="image order before the shuffle")
    c.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    c.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    c.add_argument("--out", default="chair_results.json", metavar="FILE")

    s = sub.add_parser("score", help="score an existing captions file")
    s.add_argument("--captions", required=True, metavar="FILE")
    ground_truth_args(s)
    s.add_argument("--image-id-key", default="image_id")
    s.add_argument("--caption-key", default="caption")
    s.add_argument("--out", default=None, metavar="FILE", help="write metrics and per-caption details as JSON")
    return p


class BadInput(Exception):
    """An input file the command cannot read (missing, not JSON, not the expected fields): one line, exit 2."""


def read_input(what: str, load: Callable, *args):
    """``load(*args)``, with any way an input file can be wrong raised as ``BadInput`` naming ``what``."""
    try:
        return load(*args)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise BadInput(f"{what}: {detail}") from error


def cmd_score(args) -> int:
    truth = read_input("--annotations", GroundTruth.from_coco, args.annotations, args.captions_annotations)
    runs = read_input("--captions", load_captions, args.captions, args.image_id_key, args.caption_key)
    results = {name: score(pairs, truth, strict=not args.allow_unknown_images) for name, pairs in runs.items()}
    print(table(results))
    if args.out:
        _write(args.out, {"captions_file": args.captions, "runs": {
            name: _run_payload([{"image_id": i, "caption": c} for i, c in runs[name]], result)
            for name, result in results.items()}})
    return 0


def cmd_chair(args) -> int:
    import nograd
    from nograd import registry

    options = dict(args.option)
    try:  # a bad method name or option fails before any loading, not after the plain run
        method = registry.get(args.method)
        method.Config.from_options(options)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "vlm" not in method.kinds or method.own_generate:
        captioning = [name for name, m in registry.classes().items() if "vlm" in m.kinds and not m.own_generate]
        print(f"error: {args.method!r} does not caption through model.generate on a VLM; methods that do: "
              f"{', '.join(captioning)}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.images):
        print(f"error: --images {args.images}: no such folder", file=sys.stderr)
        return 2
    truth = read_input("--annotations", GroundTruth.from_coco, args.annotations, args.captions_annotations)
    chosen = read_input("--annotations", lambda: select_images(annotation_images(args.annotations), args.limit,
                                                               args.seed, args.images, args.order))
    if not chosen:
        print(f"error: no image of --annotations found in {args.images}", file=sys.stderr)
        return 2
    images = [(image["id"], os.path.join(args.images, image["file_name"])) for image in chosen]
    model, processor = load_model(args.model, args.dtype, args.device)
    payload = {
        "protocol": {"model": args.model, "method": args.method, "options": options, "prompt": args.prompt,
                     "max_new_tokens": args.max_new_tokens, "decoding": "greedy", "seed": args.seed,
                     "limit": args.limit, "order": args.order, "annotations": args.annotations,
                     "captions_annotations": args.captions_annotations},
        "images": [{"image_id": image["id"], "file_name": image["file_name"]} for image in chosen],
        "runs": {},
    }
    results: dict[str, ChairResult] = {}
    for run in ("plain", "method"):
        def progress(step, run=run):
            print(f"\r[{run}] {step}", end="", file=sys.stderr, flush=True)

        handle = nograd.apply(model, args.method, **options) if run == "method" else None
        try:
            captions = caption_images(model, processor, images, args.prompt, args.max_new_tokens, progress)
        finally:
            if handle is not None:
                handle.remove()
        print(file=sys.stderr)
        results[run] = score([(c["image_id"], c["caption"]) for c in captions], truth,
                             strict=not args.allow_unknown_images)
        payload["runs"][run] = _run_payload(captions, results[run])
        _write(args.out, payload)  # after each run, so a crash in the second keeps the first
    print(table({"plain": results["plain"], args.method: results["method"]}))
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"chair": cmd_chair, "score": cmd_score}[args.command](args)
    except UnknownImagesError as error:
        print(f"error: {error.args[0]} (--allow-unknown-images scores them as having no objects)", file=sys.stderr)
        return 2
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
