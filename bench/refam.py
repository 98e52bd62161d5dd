#!/usr/bin/env python3
"""RefAM capture: peak memory and time of the fast image->text capture against an eager full-softmax capture.

One block's capture (``nograd.methods.refam.block_probabilities`` plus the head mean the capture keeps) on random
post-RoPE q/k at FLUX shapes (24 heads x 128, T = 512 text tokens of which |V| are valid), with the image side
scaled to what a CPU can time (``--image 512``: N = 1024 image tokens; a 1024 x 1024 image has N = 4096). Providers:

- ``fast text_softmax`` (the default): softmax over V of the N x |V| logits;
- ``fast joint``: ``exp(s - LSE)`` over V with the row LSE over every key in chunks of ``--chunk`` queries;
- ``eager``: the full (N+T) x (N+T) softmax per head, sliced (the reference the tests compare against).

Peak memory is the peak of the bytes held by tensors *created inside* the capture (q/k excluded), tracked per
storage through a ``TorchDispatchMode``: device-independent and exact for CPU runs. Each provider is checked
against eager (max abs difference) before it is timed. A second table gives the memory at full size computed from
the shapes (1024 x 1024 FLUX, 57 blocks), where the eager capture cannot be run on a CPU.

    python bench/refam.py                       # about a minute on 2 CPU cores
    python bench/refam.py --image 256 --valid 24 --reps 5
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nograd.methods.refam import block_probabilities

GIB, MIB = 2**30, 2**20


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create inside the mode and that are still referenced."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}
        self.existing = {t.untyped_storage().data_ptr() for t in existing}  # views of these add nothing

    def _release(self, ptr):
        count, size = self.refs[ptr]
        if count == 1:
            del self.refs[ptr]
            self.live -= size
        else:
            self.refs[ptr] = (count - 1, size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                if ptr in self.existing:
                    continue
                if ptr in self.refs:
                    count, size = self.refs[ptr]
                    self.refs[ptr] = (count + 1, size)
                else:
                    self.refs[ptr] = (1, t.untyped_storage().nbytes())
                    self.live += t.untyped_storage().nbytes()
                    self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, ptr)
        return out


def capture(q, k, text, image, valid, mode, normalisation, chunk):
    p_img, p_txt = block_probabilities(q, k, text, image, valid, scale=q.shape[-1] ** -0.5,
                                       normalisation=normalisation, capture=mode, lse_chunk=chunk)
    return p_img.mean(1), p_txt.mean(1)


def full_size_table(n=4096, t=512, valid=32, heads=24, blocks=57, chunk=256):
    s = n + t
    rows = [
        ("eager: full softmax of one block (logits + probs, fp32)", 2 * heads * s * s * 4, "per block, transient"),
        ("fast text_softmax: N x V logits, exp, probs per head", 3 * heads * n * valid * 4, "per block, transient"),
        ("fast joint: chunk x S logits + logsumexp's exp, row LSE", 2 * heads * chunk * s * 4, "per block, transient"),
        ("kept by the capture: head-mean N x V maps of every block", blocks * n * valid * 4, "all blocks"),
        ("(if kept) eager probs of every block, fp32", blocks * heads * s * s * 4, "all blocks"),
    ]
    print(f"\nFull size, computed from shapes: FLUX 1024x1024 (N={n}, T={t}, |V|={valid}, H={heads}, "
          f"{blocks} blocks)\n")
    print("| what | bytes | MiB | GiB | scope |\n|---|---:|---:|---:|---|")
    for what, size, scope in rows:
        print(f"| {what} | {size} | {size / MIB:.1f} | {size / GIB:.3f} | {scope} |")
    print(f"\nAt 1024x1024 the capture adds at most {(rows[1][1] + rows[3][1]) / MIB:.1f} MiB (text_softmax, the "
          f"default) or {(rows[2][1] + rows[3][1]) / MIB:.1f} MiB (joint): one block's transient plus every block's "
          f"kept maps, against {rows[0][1] / GIB:.2f} GiB per block for an eager capture.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=int, default=512, help="square image side in pixels (N = (side/16)^2)")
    parser.add_argument("--text", type=int, default=512, help="text tokens T (FLUX-dev: 512)")
    parser.add_argument("--valid", type=int, default=32, help="valid text tokens |V| (expression + magnets)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256, help="LSE query chunk of the joint mode")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast-only", action="store_true",
                        help="skip the eager capture (e.g. --image 1024 --fast-only measures full size on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, t = (args.image // 16) ** 2, args.text
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, t + n, args.head_dim, generator=g)
    k = torch.randn(1, args.heads, t + n, args.head_dim, generator=g)
    text, image, valid = slice(0, t), slice(t, t + n), slice(0, args.valid)  # FLUX order [text | image]
    print(f"RefAM capture of one block, FLUX-shaped: N={n} image tokens ({args.image}x{args.image}), T={t}, "
          f"|V|={args.valid}, H={args.heads}, D={args.head_dim}, fp32, CPU threads={args.threads}, "
          f"torch {torch.__version__}\n")
    reference = {}
    if not args.fast_only:
        for normalisation in ("text_softmax", "joint"):
            reference[normalisation] = capture(q, k, text, image, valid, "eager", normalisation, args.chunk)
    results = []
    providers = (("fast text_softmax", "fast", "text_softmax"), ("fast joint", "fast", "joint"),
                 ("eager text_softmax", "eager", "text_softmax"), ("eager joint", "eager", "joint"))
    for name, mode, normalisation in providers[:2] if args.fast_only else providers:
        got = capture(q, k, text, image, valid, mode, normalisation, args.chunk)
        error = (max(float((a - b).abs().max()) for a, b in zip(got, reference[normalisation]))
                 if reference else math.nan)
        del got
        gc.collect()
        with LiveBytes(q, k) as tracker:
            out = capture(q, k, text, image, valid, mode, normalisation, args.chunk)
            del out
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            capture(q, k, text, image, valid, mode, normalisation, args.chunk)
            times.append(time.perf_counter() - start)
        results.append((name, statistics.median(times) * 1e3, tracker.peak, error))
    eager_peak = {r[0].split()[1]: r[2] for r in results if r[0].startswith("eager")}
    eager_ms = {r[0].split()[1]: r[1] for r in results if r[0].startswith("eager")}
    if args.fast_only:  # the eager figures from the shapes: logits + probs of the full softmax, fp32
        eager_peak = dict.fromkeys(("text_softmax", "joint"), 2 * args.heads * (n + t) ** 2 * 4)
        eager_ms = dict.fromkeys(("text_softmax", "joint"), math.nan)
    print("| capture | median ms | peak MiB | vs eager (memory) | vs eager (time) | max abs diff vs eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ms, peak, error in results:
        norm = name.split()[1]
        ratio = "n/a" if math.isnan(eager_ms[norm]) else f"{ms / eager_ms[norm]:.3f}x"
        print(f"| {name} | {ms:.1f} | {peak / MIB:.2f} | {peak / eager_peak[norm]:.4f}x | {ratio} | "
              f"{'n/a' if math.isnan(error) else f'{error:.1e}'} |")
    full_size_table(heads=args.heads, valid=args.valid, chunk=args.chunk)


if __name__ == "__main__":
    main()
