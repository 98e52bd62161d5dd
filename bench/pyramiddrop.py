#!/usr/bin/env python3
"""Benchmark PyramidDrop and FastV (``nograd.apply(vlm, "pyramiddrop" | "fastv")``) against the plain model.

One process, one LLaVA-1.5-shaped model built from configs with random weights (no hub): a Llama decoder behind a
CLIP vision tower of 336-pixel images in 14-pixel patches (576 visual tokens per image), several images per prompt
so that the visual sequence is long, plus text tokens around them. Batch 1 (as every official evaluation script).
Cases, all on the same inputs and the same model (each method is applied before and removed after its turn):

- ``plain``: the unpatched model, the denominator of every ratio;
- ``pyramiddrop``: the paper's defaults scaled to the depth (4 even stages, keep 1, 1/2, 1/4, 1/8);
- ``fastv``: layer 2, keep 0.5 (the FastV paper's K = 2, R = 50 %);
- ``pyramiddrop budget``: ``tokens=`` FastV's mean visual tokens per layer (the same budget, spec A6);
- ``pyramiddrop compact``: the defaults with the official code's renumbered positions.

A set-up round (one untimed pass of every case: the KV cache of one prefill, the counters in ``handle.stats``, the
generated tokens) precedes ``--repeats`` timed rounds, in which the cases take turns (round-robin), so that load from
other processes hits them alike; a last round measures each case's peak memory over one prefill. Run
``python bench/pyramiddrop.py --help``; ``bench/README.md`` explains the columns.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from bisect import bisect_right
from dataclasses import dataclass, field

import torch
import transformers as tf

import nograd
from nograd.methods.drop_schedule import DropSchedule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import Memory, fmt, hwm_reset_works, quantiles, short_error, version  # noqa: E402

PAD, BOS, EOS, NEWLINE = 0, 1, 2, 13
TEXT_IDS = (100, 1000)  # random text tokens are drawn from this range

SHAPES = {
    "llava-7b": dict(  # LLaVA-1.5-7B: Vicuna-7B behind CLIP ViT-L/14-336
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  vocab_size=32064),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336)),
    "small": dict(
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  vocab_size=8192),
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    image_size=336)),
    "quick": dict(
        text=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=16, num_attention_heads=4,
                  vocab_size=2048),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=168)),
}
"""Model shapes (the text decoder has as many key/value heads as query heads, as Vicuna; the vision tower 14-pixel
patches)."""
QUICK = dict(shape="quick", images=2, text_tokens=16, new_tokens=4, repeats=2)
CASES = ("pyramiddrop", "fastv", "budget", "compact")
FASTV = dict(layer=2, keep=0.5)


# ----------------------------------------------------------------------------------------------------------------
# model and inputs

def build_model(shape: str, dtype, device: str, attn: str, seed: int):
    """A ``LlavaForConditionalGeneration`` with random weights (the image token is the last vocabulary id)."""
    sizes = SHAPES[shape]
    vocab = sizes["text"]["vocab_size"]
    text = tf.LlamaConfig(**sizes["text"], num_key_value_heads=sizes["text"]["num_attention_heads"],
                          max_position_embeddings=32768, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    vision = tf.CLIPVisionConfig(**sizes["vision"], patch_size=14)
    patches = (sizes["vision"]["image_size"] // 14) ** 2
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                            image_seq_length=patches)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def make_inputs(model, images: int, text_tokens: int, seed: int, device: str) -> dict:
    """One prompt: half the text tokens, then each image's tokens followed by a newline, then the other half (the
    question and "ASSISTANT:"); ``pixel_values`` of ``images`` random images."""
    config = model.config
    vision = config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    before, after = torch.randint(*TEXT_IDS, (2, text_tokens // 2), generator=g).tolist()
    image_part = ([config.image_token_index] * per_image + [NEWLINE]) * images
    ids = torch.tensor([[BOS, *before, *image_part, *after]], device=device)
    pixels = torch.randn(images, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels.to(device=device, dtype=model.dtype)}


# ----------------------------------------------------------------------------------------------------------------
# cases

@dataclass
class Case:
    label: str
    method: str | None = None
    options: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)

    def attach(self, model):
        """The method's handle (a context manager that removes it), or a no-op context for the plain model."""
        if self.method is None:
            return _Plain()
        return nograd.apply(model, self.method, **self.options)


class _Plain:
    stats: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def build_cases(wanted, layers: int, n_visual: int) -> list[Case]:
    """Plain first, then the wanted cases; the budget case gets FastV's mean visual tokens per layer."""
    cases = [Case("plain")]
    if "pyramiddrop" in wanted:
        cases.append(Case("pyramiddrop (paper defaults)", "pyramiddrop"))
    if "fastv" in wanted:
        cases.append(Case("fastv layer=2 keep=0.5", "fastv", dict(FASTV)))
    if "budget" in wanted:
        tokens = DropSchedule.one_stage(layers, FASTV["layer"], FASTV["keep"]).mean_tokens(n_visual)
        cases.append(Case(f"pyramiddrop tokens={tokens:g} (FastV's mean)", "pyramiddrop", dict(tokens=tokens)))
    if "compact" in wanted:
        cases.append(Case("pyramiddrop positions=compact", "pyramiddrop", dict(positions="compact")))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# measurements

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``--clock``: wall time, or the process's CPU time (steadier on a shared CPU, where other tenants stretch wall
time; on one thread it is the work done)."""
CLOCK = ["wall"]
"""The clock the timed calls read (set from ``--clock``)."""


class Stamps(tf.LogitsProcessor):
    """Records when each generated token's logits arrive (after a device sync); the first one follows the prefill."""

    def __init__(self, sync):
        self.sync = sync
        self.times = []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(CLOCKS[CLOCK[0]]())
        return scores


def prefill(model, inputs):
    """One forward over the prompt, as ``generate()`` runs it: KV cache on, logits of the last position only."""
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def cache_bytes(cache) -> int:
    """Bytes of every layer's cached keys and values."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def timed_prefill(model, inputs, sync) -> float:
    sync()
    clock = CLOCKS[CLOCK[0]]
    t0 = clock()
    out = prefill(model, inputs)
    sync()
    elapsed = (clock() - t0) * 1e3
    del out
    return elapsed


def generate(model, inputs, new_tokens: int, sync):
    """(generated ids, decode ms per token): greedy, KV cache on; the decode time is the span from the first token's
    logits to the last one's, over ``new_tokens - 1`` decode steps."""
    stamps = Stamps(sync)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=PAD, logits_processor=tf.LogitsProcessorList([stamps]))
    decode = (stamps.times[-1] - stamps.times[0]) * 1e3 / max(1, len(stamps.times) - 1)
    return out[:, inputs["input_ids"].shape[1]:].cpu(), decode


def mean_visual_tokens(stats: dict, layers: int) -> float:
    """Mean visual tokens per decoder layer of the (only) row, from ``stats``' stage counts and boundaries."""
    counts, bounds = stats["visual_tokens"][0], stats["boundaries"]
    return sum(counts[bisect_right(bounds, i)] for i in range(layers)) / layers


def set_up(case: Case, model, inputs, args, sync, n_visual: int, layers: int) -> None:
    """The untimed pass of one case (its warm-up): the KV cache of a prefill, the counters, the generated tokens."""
    with case.attach(model) as handle:
        r = case.result
        r["kv_bytes"] = cache_bytes(returned_cache(prefill(model, inputs)))
        stats = handle.stats
        r["stages"] = stats["visual_tokens"][0] if stats else [n_visual]
        r["boundaries"] = stats["boundaries"] if stats else []
        r["mean_tokens"] = mean_visual_tokens(stats, layers) if stats else float(n_visual)
        r["flops_ratio"] = stats["flops"]["ratio"] if stats else 1.0
        r["macs_ratio"] = stats["macs"]["ratio"] if stats else 1.0
        r["kv_saved_stats"] = stats.get("kv_bytes_saved", 0)
        r["tokens"], _ = generate(model, inputs, args.new_tokens, sync)
        r["prefill"], r["decode"] = [], []


def peak_memory(case: Case, model, inputs, memory) -> None:
    """Peak extra memory of one prefill, its returned KV cache included (after the timed rounds: on CPU the
    measurement makes glibc mmap every large buffer, which would slow the timed calls)."""
    with case.attach(model):
        case.result["peak_mb"] = memory(lambda: prefill(model, inputs))


def timed_round(case: Case, model, inputs, args, sync) -> None:
    """One timed prefill and one timed generation of a case (the method attached around them, untimed)."""
    with case.attach(model):
        case.result["prefill"].append(timed_prefill(model, inputs, sync))
        case.result["decode"].append(generate(model, inputs, args.new_tokens, sync)[1])


def run_cases(cases: list[Case], model, inputs, args, sync, start: float, set_up_case) -> tuple[int, object]:
    """A warm-up prefill, the set-up round (``set_up_case(case)``, which must fill ``case.result["tokens"]`` and
    empty ``"prefill"`` / ``"decode"`` lists), the timed round-robin rounds within ``args.repeats`` and
    ``args.budget_s``, then each case's peak memory; (rounds run, the memory meter). A case that raises keeps its
    error and leaves the rounds."""
    prefill(model, inputs)  # warm-up: one-time allocations are nobody's cost

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - start:.0f} s] {what}", flush=True)

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - start > args.budget_s

    for case in cases:
        if over_budget() and case is not cases[0]:  # plain, the denominator, always runs
            progress(f"budget of {args.budget_s:.0f} s reached: {case.label} not set up")
            continue
        try:
            set_up_case(case)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory, or a method refusing the model)
            case.result = {"error": short_error(e)}
        progress(f"set up: {case.label}")
    ready = [case for case in cases if "prefill" in case.result]
    rounds = 0
    while ready and rounds < args.repeats and not (rounds and over_budget()):
        for case in list(ready):
            try:
                timed_round(case, model, inputs, args, sync)
            except Exception as e:  # noqa: BLE001
                case.result["error"] = short_error(e)
                ready.remove(case)
        rounds += 1
        progress(f"timed round {rounds}/{args.repeats}")
    memory = Memory(args.device == "cuda", "reset" if args.device == "cuda" or hwm_reset_works() else "off")
    for case in ready:
        peak_memory(case, model, inputs, memory)
    progress("peak memory measured")
    return rounds, memory


# ----------------------------------------------------------------------------------------------------------------
# report

def summarize_timing(cases: list[Case]) -> None:
    """Medians, percentiles, the ratios of time and peak memory to the plain case, and whether its tokens are
    plain's."""
    plain = cases[0].result
    for case in cases:
        r = case.result
        if not r.get("prefill"):
            continue
        r["prefill_ms"], r["prefill_p20"], r["prefill_p80"] = quantiles(r["prefill"])
        r["decode_ms"], r["decode_p20"], r["decode_p80"] = quantiles(r["decode"])
        if plain.get("prefill"):
            r["prefill_x"] = r["prefill_ms"] / plain["prefill_ms"]
            r["decode_x"] = r["decode_ms"] / plain["decode_ms"]
            if r.get("peak_mb") and plain.get("peak_mb"):
                r["peak_x"] = r["peak_mb"] / plain["peak_mb"]
            r["same_tokens"] = bool(torch.equal(r["tokens"], plain["tokens"]))


def summarize(cases: list[Case]) -> None:
    """``summarize_timing``, and the KV cache against the plain case's."""
    summarize_timing(cases)
    plain = cases[0].result
    for case in cases:
        r = case.result
        if r.get("prefill") and plain.get("prefill"):
            r["kv_x"] = r["kv_bytes"] / plain["kv_bytes"]
            r["kv_saved"] = plain["kv_bytes"] - r["kv_bytes"]


COLUMNS = ["case", "visual tokens (@ from layer)", "mean / layer", "prefill ms (p20–p80)", "prefill × plain",
           "prefill speed-up", "paper FLOPs ×", "MACs ×", "decode ms/token (p20–p80)", "decode × plain",
           "KV cache MB", "KV × plain", "KV saved MB: measured / stats", "prefill peak MB", "tokens = plain"]


def row(case: Case) -> list[str]:
    """The cells of a timed case."""
    r = case.result
    speed = 1 / r["prefill_x"] if r.get("prefill_x") else None
    return [
        case.label,
        ", ".join([str(r["stages"][0])] + [f"{n}@{b}" for n, b in zip(r["stages"][1:], r["boundaries"])]),
        f"{r['mean_tokens']:.0f}",
        timing_cell(r, "prefill"),
        fmt(r.get("prefill_x")),
        fmt(speed, ".2f") + ("×" if speed else ""),
        f"{r['flops_ratio']:.3f}",
        f"{r['macs_ratio']:.3f}",
        timing_cell(r, "decode"),
        fmt(r.get("decode_x")),
        f"{r['kv_bytes'] / 2**20:.1f}",
        fmt(r.get("kv_x"), ".3f"),
        f"{r.get('kv_saved', 0) / 2**20:.1f} / {r['kv_saved_stats'] / 2**20:.1f}",
        fmt(r.get("peak_mb"), ".0f"),
        {True: "yes", False: "no"}.get(r.get("same_tokens"), "—"),
    ]


def timing_cell(r: dict, kind: str) -> str:
    """"median (p20–p80)" of the ``kind`` ("prefill" / "decode") times in ms: two decimals, one from 10 ms on for a
    prefill."""
    prec = ".1f" if kind == "prefill" and r["prefill_ms"] >= 10 else ".2f"
    return f"{r[kind + '_ms']:{prec}} ({r[kind + '_p20']:{prec}}–{r[kind + '_p80']:{prec}})"


def table(cases: list[Case], columns: list[str] = COLUMNS, row=row) -> str:
    """The cases as a markdown table: ``row(case)`` for a timed case; its error, or "not timed", for the others."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for case in cases:
        r = case.result
        if "error" in r:
            cells = [case.label, "ERROR: " + r["error"].replace("|", "/")] + [""] * (len(columns) - 2)
        elif not r.get("prefill"):
            cells = [case.label, "not timed (budget)"] + [""] * (len(columns) - 2)
        else:
            cells = row(case)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def describe(model, args, n_visual: int, prompt_len: int) -> str:
    text, vision = model.config.text_config, model.config.vision_config
    return (f"model: LLaVA-1.5-shaped, random weights, shape {args.shape}: Llama {text.num_hidden_layers} layers, "
            f"hidden {text.hidden_size}, {text.num_attention_heads} heads (MHA), FFN {text.intermediate_size}, "
            f"vocab {text.vocab_size}; CLIP {vision.num_hidden_layers} layers, hidden {vision.hidden_size}, image "
            f"{vision.image_size}/{vision.patch_size} | prompt: {prompt_len} tokens, of which {n_visual} visual "
            f"({args.images} image{'s' * (args.images > 1)}) | batch 1 | decode: {args.new_tokens} new tokens, greedy, "
            "KV cache")


def environment_line(args, device: str, memory, rounds: int) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        dev = f"{p.name}, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or "?"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        dev = f"CPU {cpu}, {os.cpu_count()} cores"
    timing = {"wall": "perf_counter", "cpu": "process_time (CPU time)"}[args.clock] \
        + (" after torch.cuda.synchronize()" if device == "cuda" else "")
    return (f"env: {when} | {dev} | python {platform.python_version()} | torch {torch.__version__} | "
            f"transformers {version('transformers')} | threads {torch.get_num_threads()} | dtype {args.dtype} | "
            f"attention {args.attn} | timing {timing}, median of {rounds} round-robin rounds after a set-up round | "
            f"peak memory {memory.label}, after the timed rounds")


# ----------------------------------------------------------------------------------------------------------------
# main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p, images=5, cases=CASES, quick=QUICK)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    return checked_args(p, p.parse_args(argv), CASES, QUICK)


def add_common_arguments(p, images: int, cases, quick: dict) -> None:
    """The options of the LLaVA-shaped model benches (this one and ``bench/methods.py``)."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small",
                   help="small: Llama 16 x 1024 (FFN 2816), a 2-layer CLIP; llava-7b: LLaVA-1.5-7B's Vicuna-7B "
                        "and CLIP ViT-L/14-336 (a GPU only)")
    p.add_argument("--images", type=int, default=images, help="images per prompt, 576 visual tokens each")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens around the images")
    p.add_argument("--new-tokens", type=int, default=16, help="N of generate(max_new_tokens=N); at least 2")
    p.add_argument("--repeats", type=int, help="timed round-robin rounds (default: CPU 3, CUDA 5)")
    p.add_argument("--cases", default=",".join(cases), help=f"comma list among {','.join(cases)} (plain always)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="what the timed calls read: wall time, or the process's CPU time (CPU only; steadier on a "
                        "shared machine, where other tenants stretch wall time)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="set up no new case and start no new timed round after this many seconds (0: none); "
                        "plain and one timed round always run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="append the environment line and the table to this file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test under a minute on CPU: " + ", ".join(f"{k}={v}" for k, v in quick.items()))


def apply_quick(p, args, quick: dict) -> None:
    """With ``--quick``, ``quick``'s values for the options left at their defaults (an explicit one wins)."""
    if args.quick:
        for key, value in quick.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)


def checked_args(p, args, cases, quick: dict):
    """``args`` with ``--quick`` (``apply_quick``) and the device's default repeats applied; ``p.error`` on a bad
    combination."""
    apply_quick(p, args, quick)
    if args.repeats is None:
        args.repeats = 5 if args.device == "cuda" else 3
    if args.repeats < 1:
        p.error("--repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.shape == "llava-7b" and args.device != "cuda":
        p.error("--shape llava-7b is a GPU shape (a 7B model: about 28 GB in fp32): add --device cuda")
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu times CPU work only: use the wall clock with --device cuda")
    CLOCK[0] = args.clock
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown or args.new_tokens < 2 or args.images < 1:
        p.error(f"unknown cases {sorted(unknown)}" if unknown else "--new-tokens >= 2 and --images >= 1")
    return args


def prepare(args, script: str):
    """Threads, the model and its inputs, the description lines (printed); (model, inputs, visual tokens, about,
    sync, start time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    start = time.perf_counter()
    model = build_model(args.shape, getattr(torch, args.dtype), args.device, args.attn, args.seed)
    inputs = make_inputs(model, args.images, args.text_tokens, args.seed, args.device)
    n_visual = int((inputs["input_ids"] == model.config.image_token_index).sum())
    about = [describe(model, args, n_visual, inputs["input_ids"].shape[1]),
             "command: python " + " ".join([script, *sys.argv[1:]])]
    print("\n".join(about) + f"\nmodel built in {time.perf_counter() - start:.0f} s", flush=True)
    return model, inputs, n_visual, about, sync, start


def report(table_text: str, args, memory, rounds: int, about: list[str], start: float, title: str) -> None:
    """Print the environment line and the table (with the run's total time); append every header line and the table
    to ``args.markdown``, under ``title`` and today's date."""
    header = [environment_line(args, args.device, memory, rounds)] + about
    text = table_text + f"\n_total {time.perf_counter() - start:.0f} s_\n"
    print("\n" + header[0] + "\n\n" + text, flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n### {title}, {datetime.date.today().isoformat()}\n\n"
                    + "\n\n".join(f"`{h}`" for h in header) + "\n\n" + text)


def main(argv=None) -> int:
    args = parse_args(argv)
    model, inputs, n_visual, about, sync, start = prepare(args, "bench/pyramiddrop.py")
    layers = model.config.text_config.num_hidden_layers
    cases = build_cases(args.cases.split(","), layers, n_visual)
    rounds, memory = run_cases(cases, model, inputs, args, sync, start,
                               lambda case: set_up(case, model, inputs, args, sync, n_visual, layers))
    summarize(cases)
    report(table(cases), args, memory, rounds, about, start, "PyramidDrop / FastV benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
