"""CARVE's cost: passes, latency and peak memory against the plain model and against an eager-attention capture.

One process, one model (Qwen2-VL-shaped, random weights, built from configs; the tiny offline processor of the
tests with a larger pixel budget), identical inputs, cases timed round-robin:

- ``plain``: one ``generate`` of the question (what the user ran before);
- ``probes, plain``: the batched probe pair (question + general instruction) with no capture;
- ``probes, nograd capture``: the same through CARVE's read-out (``carve.saliency``): rows of the last query only,
  through the shared attention path, the model's own SDPA;
- ``probes, eager capture``: the same pair on an eager-attention copy with ``output_attentions=True`` in
  ``generate`` (what the official code does), the attention matrices kept as ``generate`` returns them;
- ``carve.generate``: the whole method (probe pair + refinement + final pass with two images), general pass not
  cached, and again with the general pass cached.

Memory is the peak extra memory of one call over what was allocated before it (``bench/attention.py``'s ``Memory``:
CUDA max_memory_allocated; CPU VmHWM growth after a reset). The capture's own memory is "probes, nograd capture"
minus "probes, plain"; the eager capture's O(N^2) term is also computed from shapes.

    python bench/carve.py                       # CPU defaults (~2-4 min on 2 cores)
    python bench/carve.py --quick               # a smoke run (< 1 min)
    python bench/carve.py --device cuda --dtype bfloat16 --markdown out.md
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time

import torch
import transformers as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

import nograd  # noqa: E402
from attention import Memory  # noqa: E402  (bench/attention.py)
from pyramiddrop import apply_quick  # noqa: E402  (bench/pyramiddrop.py)
from nograd.tiny.processors import image, qwen2_vl_processor  # noqa: E402
from nograd.tiny.vlms import IMAGE, QWEN_TOKENS  # noqa: E402

QUESTION = "What is on the left of the sign?"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--image", type=int, nargs=2, default=(448, 336), metavar=("W", "H"),
                   help="image size in pixels; patches of 7, merged 2x2 into one LLM token")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens of each probe and of the final pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a small model and image, one repeat")
    p.add_argument("--markdown", default=None, help="append the environment line and the table to this file")
    args = p.parse_args(argv)
    apply_quick(p, args, dict(hidden=128, layers=4, image=(112, 84), new_tokens=4, repeats=1))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args


def build_model(args, attn: str):
    """A Qwen2-VL with a decoder of the given size (vocabulary of the tiny processor) and a 2-block vision tower."""
    text = dict(vocab_size=160, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                rope_theta=10000.0)
    head_dim = args.hidden // args.heads
    text["rope_scaling"]["mrope_section"] = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    vision = dict(depth=2, num_heads=2, patch_size=7, spatial_merge_size=2, temporal_patch_size=2, embed_dim=64,
                  hidden_size=args.hidden)
    config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **QWEN_TOKENS)
    torch.manual_seed(0)
    model = tf.Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=args.dtype)
    return model.to(args.device).eval()


def processor_for(args):
    processor = qwen2_vl_processor()
    w, h = args.image
    processor.image_processor.size = {"shortest_edge": w * h, "longest_edge": w * h}  # pixel budget: no resize
    return processor


def timed(fn, memory: Memory, sync) -> tuple[float, float | None]:
    """(seconds, peak extra MB) of one call."""
    sync()
    start = time.perf_counter()
    peak = memory(fn)
    sync()
    return time.perf_counter() - start, peak


def eager_capture_bytes(layers: int, heads: int, batch: int, keys: int, new_tokens: int, item: int) -> int:
    """What ``output_attentions`` keeps for a generate: per layer (B, H, N, N) at prefill, (B, H, 1, N + t) after."""
    decode = sum(keys + t for t in range(1, new_tokens))
    return layers * batch * heads * (keys * keys + decode) * item


def row_capture_bytes(layers: int, batch: int, image_tokens: int, new_tokens: int) -> int:
    """What CARVE keeps: per step and layer, one head-mean fp32 row at the image keys."""
    return layers * batch * image_tokens * new_tokens * 4


def main(argv=None) -> int:
    args = parse_args(argv)
    on_cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    memory = Memory(on_cuda, "auto")
    plain, eager = build_model(args, "sdpa"), build_model(args, "eager")
    processor = processor_for(args)
    picture = image(*args.image, seed=1)
    T = args.new_tokens
    options = dict(processor=processor, probe_max_new_tokens=T, max_new_tokens=T)
    carve = nograd.apply(build_model(args, "sdpa"), "carve", cache_general=False, **options)
    cached = nograd.apply(build_model(args, "sdpa"), "carve", **options)
    cached.generate(picture, QUESTION)  # fills its general-pass cache
    single = carve.build_inputs([picture], [QUESTION])
    pair = carve.build_inputs([picture] * 2, [QUESTION, carve.config.general_prompt])
    n_keys, n_image = pair["input_ids"].shape[1], int((pair["input_ids"][0] == IMAGE).sum())

    def generate(model, inputs, **kwargs):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=T, min_new_tokens=T, do_sample=False, **kwargs)

    def eager_probes():
        out = generate(eager, pair, output_attentions=True, return_dict_in_generate=True)
        return out.attentions  # kept, as the official code keeps them

    cases = {  # name -> (call, passes)
        "plain generate (question)": (lambda: generate(plain, single), 1),
        "probe pair, no capture": (lambda: generate(plain, pair), 1),
        "probe pair, nograd capture (carve.saliency)": (lambda: carve.saliency(picture, QUESTION), 1),
        "probe pair, eager capture (output_attentions)": (eager_probes, 1),
        "carve.generate": (lambda: carve.generate(picture, QUESTION), 2),
        "carve.generate, general pass cached": (lambda: cached.generate(picture, QUESTION), 2),
    }
    results = {name: ([], []) for name in cases}
    for call, _ in cases.values():  # warm-up
        call()
    for _ in range(args.repeats):
        for name, (call, _) in cases.items():
            seconds, peak = timed(call, memory, sync)
            results[name][0].append(seconds)
            results[name][1].append(peak)

    base = statistics.median(results["plain generate (question)"][0])
    lines = [f"| case | generate calls | ms (median of {args.repeats}) | × plain | peak extra MB |",
             "|---|---|---|---|---|"]
    for name, (times, peaks) in results.items():
        ms = statistics.median(times) * 1e3
        peak = max(p for p in peaks) if peaks[0] is not None else None
        lines.append(f"| {name} | {cases[name][1]} | {ms:.1f} | {ms / 1e3 / base:.2f} | "
                     f"{'—' if peak is None else f'{peak:.1f}'} |")
    item = torch.finfo(args.dtype).bits // 8
    eager_mb = eager_capture_bytes(args.layers, args.heads, 2, n_keys, T, item) / 2**20
    rows_mb = row_capture_bytes(len(carve.stats["layers"]), 2, n_image, T) / 2**20
    env = (f"{platform.node()} · {args.device} · {args.dtype} · torch {torch.__version__} · transformers "
           f"{tf.__version__} · memory: {memory.label}")
    shape = (f"Qwen2-VL-shaped: decoder hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
             f"heads; image {args.image[0]}x{args.image[1]} -> {n_image} image tokens, probe pair {n_keys} keys "
             f"per row, {T} new tokens per pass, CARVE layers {carve.stats['layers']}")
    computed = (f"From shapes: output_attentions keeps {eager_mb:.1f} MB for the probe pair (all layers, B x H x N x N "
                f"at prefill); CARVE's rows are {rows_mb:.3f} MB.")
    command = "python bench/carve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([f"`{command.strip()}`", "", env, "", shape, "", *lines, "", computed, ""])
    print(report)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
