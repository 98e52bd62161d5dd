#!/usr/bin/env python3
"""Benchmark the attention-editing VLM methods (PAI, PAINT, ClearSight, ZeroTuning, ACT) against the plain model.

What attaching a method costs a user's ``generate()``: one process, the LLaVA-1.5-shaped model of
``bench/pyramiddrop.py`` (a Llama decoder behind a CLIP tower, random weights, no hub), one image prompt, batch 1.
Cases, all on the same inputs and the same model (each method is applied before and removed after its turn):

- ``plain``: the unpatched model (SDPA), the denominator of every ratio;
- ``plain eager``: the same model on transformers' eager attention, which the official code of these methods runs
  (it materialises every attention matrix);
- each method with its paper defaults, and PAI / PAINT with ``cfg_gamma=1.1`` as well (every published PAI / PAINT
  result uses it: one extra image-free forward per step, with its own KV cache).

The protocol is ``bench/pyramiddrop.py``'s: a warm-up prefill, a set-up round (each case once, untimed: its
generated tokens and ``handle.stats``), ``--repeats`` timed round-robin rounds, then each case's peak memory over one
prefill. Run ``python bench/methods.py --help``; ``bench/README.md`` explains the columns.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import fmt  # noqa: E402
from pyramiddrop import (  # noqa: E402
    Case, add_common_arguments, checked_args, generate, prepare, report, run_cases, summarize_timing, table,
    timing_cell)

CASES = {  # name: (label, method, options)
    "eager": ("plain eager (the official code's attention)", None, {}),
    "pai": ("pai", "pai", {}),
    "pai-cfg": ("pai cfg_gamma=1.1", "pai", {"cfg_gamma": 1.1}),
    "paint": ("paint", "paint", {}),
    "paint-cfg": ("paint cfg_gamma=1.1", "paint", {"cfg_gamma": 1.1}),
    "clearsight": ("clearsight", "clearsight", {}),
    "zerotuning": ("zerotuning", "zerotuning", {}),
    "act": ("act", "act", {}),
}
QUICK = dict(shape="quick", images=1, text_tokens=16, new_tokens=4, repeats=2)


class EagerCase(Case):
    """The plain model switched to eager attention for its turn."""

    def attach(self, model):
        return _EagerAttention(model)


class _EagerAttention:
    stats: dict = {}

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.before = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.before)


def build_cases(wanted) -> list[Case]:
    """Plain first, then the wanted cases in ``CASES``' order."""
    cases = [Case("plain")]
    for name, (label, method, options) in CASES.items():
        if name in wanted:
            cases.append(EagerCase(label) if name == "eager" else Case(label, method, dict(options)))
    return cases


def brief_stats(stats: dict) -> str:
    """The scalar entries of ``handle.stats`` ("heads 4, edited_calls 60"); lists and tables left out."""
    def scalar(value):
        if isinstance(value, torch.Tensor):
            return value.item() if value.numel() == 1 else None
        return value if isinstance(value, (bool, int, float, str)) else None

    parts = [f"{key} {scalar(value):g}" if isinstance(scalar(value), float) else f"{key} {scalar(value)}"
             for key, value in stats.items() if scalar(value) is not None]
    return ", ".join(parts) or "—"


def set_up(case: Case, model, inputs, args, sync) -> None:
    """The untimed pass of one case (its warm-up): the generated tokens and what the method reports."""
    with case.attach(model) as handle:
        case.result["tokens"], _ = generate(model, inputs, args.new_tokens, sync)
        case.result["stats"] = brief_stats(handle.stats)
        case.result["prefill"], case.result["decode"] = [], []


COLUMNS = ["case", "prefill ms (p20–p80)", "prefill × plain", "decode ms/token (p20–p80)", "decode × plain",
           "prefill peak MB", "peak × plain", "tokens = plain", "h.stats after one generate()"]


def row(case: Case) -> list[str]:
    """The cells of a timed case."""
    r = case.result
    return [
        case.label,
        timing_cell(r, "prefill"),
        fmt(r.get("prefill_x")),
        timing_cell(r, "decode"),
        fmt(r.get("decode_x")),
        fmt(r.get("peak_mb"), ".0f"),
        fmt(r.get("peak_x")),
        {True: "yes", False: "no"}.get(r.get("same_tokens"), "—"),
        r["stats"] if case.method else "—",
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p, images=1, cases=CASES, quick=QUICK)
    args = p.parse_args(argv)
    args.attn = "sdpa"  # the plain model's; the eager case switches it for its turn
    return checked_args(p, args, CASES, QUICK)


def main(argv=None) -> int:
    args = parse_args(argv)
    model, inputs, _, about, sync, start = prepare(args, "bench/methods.py")
    cases = build_cases(args.cases.split(","))
    rounds, memory = run_cases(cases, model, inputs, args, sync, start,
                               lambda case: set_up(case, model, inputs, args, sync))
    summarize_timing(cases)
    report(table(cases, COLUMNS, row), args, memory, rounds, about, start, "Attention-editing methods benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
