#!/usr/bin/env python3
"""Benchmark ``nograd.kernels.attention`` against SDPA, FlexAttention and eager on identical inputs.

One process, one table per case (spec ``shared/specs/kernels.md`` §1, §3.5, §9). Providers, each checked against an
fp32 reference before it is timed (a provider that fails the check is reported as FAIL and not timed):

- ``SDPA no bias (floor)``: plain ``F.scaled_dot_product_attention`` (``is_causal`` when causal), the speed of light
  and the denominator of every ratio. In a case with a key bias it computes a different function (no bias), so it
  is checked against the no-bias reference;
- ``SDPA dense mask``: SDPA with a materialised additive (B, H, M, N) mask carrying the bias and the causal -inf
  (mask construction timed separately, in "setup ms");
- ``flex compiled``: ``torch.compile(flex_attention)`` with a ``score_mod`` that adds the bias and a causal
  ``BlockMask`` (the first call, which compiles, is reported separately in "first call ms");
- ``eager``: explicit logits + softmax (fp32 softmax, as transformers' eager attention does);
- ``nograd <backend>``: ``nograd.kernels.attention(..., backend=b)`` for every backend of ``nograd.kernels.BACKENDS``
  among auto / sdpa / triton / flex (triton only on CUDA). Missing backends are skipped with a printed note.

Run ``python bench/attention.py --help``; ``bench/README.md`` explains the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="nograd.kernels.attention")

NOGRAD_BACKENDS = ("auto", "sdpa", "triton", "flex")
FLOOR = "SDPA no bias (floor)"
DENSE = "SDPA dense mask"
FLEX = "flex compiled"
EAGER = "eager"


# ----------------------------------------------------------------------------------------------------------------
# cases

@dataclass
class Case:
    kind: str  # "prefill", "gqa", "decode", "dit"
    b: int
    h: int
    h_kv: int
    m: int
    n: int
    d: int
    causal: bool
    bias: bool
    label: str = ""

    @property
    def edge(self) -> bool:
        """True when the causal edge cuts through the (M, N) block (M > 1)."""
        return self.causal and self.m > 1

    def title(self) -> str:
        what = {"prefill": "prefill", "gqa": "GQA prefill", "decode": "decode", "dit": "DiT"}[self.kind]
        mn = f"M=N={self.n}" if self.m == self.n else f"M={self.m} N={self.n}"
        heads = f"H={self.h}" + (f"/H_kv={self.h_kv}" if self.h_kv != self.h else "")
        extra = f" ({self.label})" if self.label else ""
        return (f"{what}{extra} · B={self.b} {heads} {mn} D={self.d} · {'causal' if self.causal else 'non-causal'}"
                f" · {'key bias' if self.bias else 'no bias'}")


def visible_pairs(m: int, n: int, causal: bool) -> int:
    """(q, k) pairs a query block sees; causal is bottom-right aligned (query i sees j <= i + N - M)."""
    if not causal:
        return m * n
    return sum(min(n, max(0, i + n - m + 1)) for i in range(m))


CASE_KINDS = ("prefill", "gqa", "decode", "dit")


def build_cases(args, on_cuda: bool) -> list[Case]:
    """All cases, most important first (so a time budget cuts the least useful ones)."""
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    biases = {"both": (True, False), "yes": (True,), "no": (False,)}[args.bias]
    kinds = set(args.cases.split(","))

    def grid_shape(n, d):
        if args.heads:
            h = args.heads
        else:
            h = max(1, 2048 // d) if on_cuda else 8  # GPU: H*D = 2048 (FA3 paper's setup)
        b = args.batch or (max(1, 16384 // n) if on_cuda else 1)  # GPU: B*N = 16k tokens
        return b, h

    grid = []
    for bias in biases:
        for d in sorted(args.d, reverse=True):
            for n in args.n:
                for causal in causals:
                    b, h = grid_shape(n, d)
                    grid.append(Case("prefill", b, h, h, n, n, d, causal, bias))
    first = [c for c in grid if c.bias and c.d == max(args.d)]
    rest = [c for c in grid if c not in first]
    out = list(first) if "prefill" in kinds else []
    if "gqa" in kinds:
        for n in args.gqa_n:
            for h, h_kv in ((28, 4), (32, 8)):
                out.append(Case("gqa", 1, h, h_kv, n, n, 128, True, True))
    if "decode" in kinds:
        for n in args.decode_n:
            for b in args.decode_b:
                out.append(Case("decode", b, 32, 8, 1, n, 128, False, True))
    if "dit" in kinds:
        out.append(Case("dit", 1, 24, 24, 4608, 4608, 128, False, True, "FLUX"))
        out.append(Case("dit", 2, 24, 24, 4429, 4429, 64, False, True, "SD3-medium"))
    if "prefill" in kinds:
        out += rest
    return out


# ----------------------------------------------------------------------------------------------------------------
# inputs and reference

def make_inputs(case: Case, dtype, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    q = randn(case.b, case.h, case.m, case.d).to(dtype)
    k = randn(case.b, case.h_kv, case.n, case.d).to(dtype)
    v = randn(case.b, case.h_kv, case.n, case.d).to(dtype)
    bias = randn(case.b, case.h, case.n) if case.bias else None  # fp32, natural-log units
    return q, k, v, bias


def reference(q, k, v, bias, causal: bool, scale: float, max_bytes: int) -> torch.Tensor:
    """fp32 explicit softmax attention, chunked over queries so the (rows, N) logits stay under ``max_bytes``."""
    b, h, m, d = q.shape
    n = k.shape[2]
    rep = h // k.shape[1]
    kf = k.float().repeat_interleave(rep, 1)
    vf = v.float().repeat_interleave(rep, 1)
    out = torch.empty(b, h, m, d, dtype=torch.float32, device=q.device)
    rows = max(1, max_bytes // (b * h * n * 4 * 2))
    keys = torch.arange(n, device=q.device)
    for i0 in range(0, m, rows):
        i1 = min(m, i0 + rows)
        s = torch.matmul(q[:, :, i0:i1].float(), kf.transpose(-1, -2)) * scale
        if bias is not None:
            s += bias.float()[:, :, None, :]
        if causal:
            visible = keys[None, :] <= torch.arange(i0, i1, device=q.device)[:, None] + (n - m)
            s.masked_fill_(~visible, -math.inf)
        out[:, :, i0:i1] = torch.matmul(torch.softmax(s, dim=-1), vf)
        del s
    return out


def check(out, ref, dtype, tol_override):
    """(max abs err, ok). Tolerance: fp32 1e-4, half types 5e-2, times max(1, max|ref|)."""
    if isinstance(out, tuple):
        out = out[0]
    if out.shape != ref.shape:
        return math.inf, False
    diff = (out.float() - ref).abs()
    if not bool(torch.isfinite(diff).all()):
        return math.nan, False
    err = float(diff.max())
    base = tol_override if tol_override is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    return err, err <= base * max(1.0, float(ref.abs().max()))


# ----------------------------------------------------------------------------------------------------------------
# providers

_FLEX_COMPILED = None


def flex_compiled(dynamic):
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=dynamic)
    return _FLEX_COMPILED


def raise_recompile_limits():
    """Every case is a new static shape (or a new score_mod / BlockMask): let Dynamo recompile instead of falling
    back to uncompiled flex after the default 8 recompiles. Applies to nograd's own compiled flex too."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)


def bias_score_mod(bias):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx]

    return score_mod


def causal_mask_mod(offset: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return mask_mod


def causal_visible(m, n, device):
    return torch.arange(n, device=device)[None, :] <= torch.arange(m, device=device)[:, None] + (n - m)


def provider_names(case: Case, nograd_backends, on_cuda: bool, keep=None) -> list[str]:
    """The providers of one case, in table order; ``keep`` (substrings) filters all but the floor."""
    names = [FLOOR]
    if case.bias or case.edge:
        names.append(DENSE)
    names += [FLEX, EAGER]
    names += [f"nograd {b}" for b in nograd_backends if b != "triton" or on_cuda]
    if keep:
        names = [n for n in names if n == FLOOR or any(s in n for s in keep)]
    return names


class Skip(Exception):
    pass


def make_provider(name: str, case: Case, q, k, v, bias, scale: float, args, sync):
    """Build one provider: returns (fn, setup_ms or None, note). Raises Skip to skip it."""
    gqa = case.h != case.h_kv
    dtype = q.dtype
    elt = q.element_size()
    cells = case.b * case.h * case.m * case.n
    limit = args.max_dense_gb * 1e9
    if name == FLOOR:
        if case.causal and case.m not in (1, case.n):
            raise Skip("is_causal is top-left; only M == N or M == 1")
        kw = {"enable_gqa": True} if gqa else {}
        is_causal = case.edge  # M == 1 sees every key: no mask at all
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, **kw)), None, ""
    if name == DENSE:
        shape_cells = cells if case.bias else case.m * case.n
        if shape_cells * elt > limit:
            raise Skip(f"dense mask would be {shape_cells * elt / 1e9:.1f} GB > --max-dense-gb")
        neg = torch.tensor(-math.inf, dtype=dtype, device=q.device)

        def build():
            if case.bias and case.edge:
                vis = causal_visible(case.m, case.n, q.device)
                return torch.where(vis, bias.to(dtype)[:, :, None, :], neg)
            if case.bias:
                return bias.to(dtype)[:, :, None, :].expand(case.b, case.h, case.m, case.n).contiguous()
            vis = causal_visible(case.m, case.n, q.device)
            return torch.where(vis, torch.zeros((), dtype=dtype, device=q.device), neg)[None, None]

        times = []
        mask = None
        for _ in range(3):
            mask = None
            sync()
            t0 = time.perf_counter()
            mask = build()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        note = f"mask {tuple(mask.shape)} {mask.numel() * elt / 2**20:.0f} MB"
        rep = case.h // case.h_kv
        if rep == 1:
            return (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)), \
                statistics.median(times), note

        # as transformers' sdpa path does when it passes a mask: repeat K/V (on CUDA, enable_gqa with a mask would
        # leave only the math backend)
        def dense_gqa():
            return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                  attn_mask=mask, scale=scale)

        return dense_gqa, statistics.median(times), note + f", K/V repeated ×{rep}"
    if name == FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        fn = flex_compiled(args.flex_dynamic)
        score_mod = bias_score_mod(bias.contiguous()) if case.bias else None
        block_mask, setup = None, None
        if case.edge:
            sync()
            t0 = time.perf_counter()
            block_mask = create_block_mask(causal_mask_mod(case.n - case.m), None, None, case.m, case.n,
                                           device=q.device)
            sync()
            setup = (time.perf_counter() - t0) * 1e3
        kw = {"enable_gqa": True} if gqa else {}
        return (lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, **kw)), setup, \
            "BlockMask 128" if block_mask is not None else ""
    if name == EAGER:
        if cells * (2 * elt + 4) > limit:
            raise Skip(f"logits would need {cells * (2 * elt + 4) / 1e9:.1f} GB > --max-dense-gb")
        rep = case.h // case.h_kv
        hidden = ~causal_visible(case.m, case.n, q.device) if case.edge else None
        bias_d = bias.to(dtype)[:, :, None, :] if case.bias else None

        def eager():
            kk = k.repeat_interleave(rep, 1) if rep > 1 else k
            vv = v.repeat_interleave(rep, 1) if rep > 1 else v
            w = torch.matmul(q, kk.transpose(-1, -2)).mul_(scale)
            if bias_d is not None:
                w.add_(bias_d)
            if hidden is not None:
                w.masked_fill_(hidden, -math.inf)
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(dtype)
            return torch.matmul(w, vv)

        return eager, None, "fp32 softmax" + (f", K/V repeated ×{rep}" if rep > 1 else "")
    if name.startswith("nograd "):
        from nograd import kernels

        backend = name.split(" ", 1)[1]
        return (lambda: kernels.attention(q, k, v, key_bias=bias, causal=case.causal, scale=scale,
                                          backend=backend)), None, ""
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------------------------
# timing and memory

class Timer:
    def __init__(self, on_cuda: bool, args):
        self.on_cuda = on_cuda
        self.args = args
        self.method = "perf_counter"
        self.do_bench = None
        if on_cuda:
            try:
                from triton.testing import do_bench

                self.do_bench = do_bench
                self.method = f"triton.testing.do_bench(warmup={args.warmup_ms}, rep={args.rep_ms}), L2 flushed"
            except Exception:  # noqa: BLE001
                self.method = "CUDA events, L2 flushed"

    def sync(self):
        if self.on_cuda:
            torch.cuda.synchronize()

    def __call__(self, fn):
        """(median, p20, p80) in ms."""
        if self.on_cuda and self.do_bench is not None:
            try:
                r = self.do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms, quantiles=[0.5, 0.2, 0.8])
                return tuple(float(x) for x in r)
            except TypeError:  # an older / newer do_bench signature: fall back to events for good
                self.do_bench = None
                self.method = "CUDA events, L2 flushed (do_bench failed)"
                print("note: triton.testing.do_bench failed; timing with CUDA events", flush=True)
        if self.on_cuda:
            return self._events(fn)
        for _ in range(self.args.warmup):
            fn()
        times, t_start = [], time.perf_counter()
        while len(times) < self.args.repeats or (time.perf_counter() - t_start < self.args.min_time_ms / 1e3
                                                 and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return quantiles(times)

    def _events(self, fn):
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = max(1e-3, (time.perf_counter() - t0) * 1e3)
        for _ in range(max(1, int(self.args.warmup_ms / est))):
            fn()
        times = []
        for _ in range(max(3, min(1000, int(self.args.rep_ms / est)))):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return quantiles(times)


def quantiles(times):
    xs = sorted(times)

    def q(p):
        pos = p * (len(xs) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def _proc_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field_name)


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_reset_works() -> bool:
    """Whether writing 5 to /proc/self/clear_refs resets VmHWM here (Linux >= 4.0; not every sandbox allows it)."""
    try:
        x = torch.ones(64 * 2**20 // 4)
        del x
        _reset_hwm()
        return _proc_status("VmHWM") - _proc_status("VmRSS") < 16 * 2**20
    except OSError:
        return False


def use_mmap_for_large_allocations() -> bool:
    """glibc: serve every allocation >= 1 MiB by mmap and unmap it on free, so VmRSS follows live memory.

    Without this, glibc's dynamic threshold keeps freed buffers up to 32 MB in the heap, a later call reuses them
    without any RSS growth, and the peak would be under-reported. It also means every provider pays its page faults
    on each call (all providers alike).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except OSError:
        return False


def trim_heap() -> None:
    """glibc: give the free pages of the heap back (``malloc_trim(0)``). Buffers freed before the mmap threshold was
    set (or while glibc's dynamic threshold had risen) stay in the heap, and a later call that reuses them grows no
    RSS: its peak would read as zero."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Memory:
    """Peak-memory delta of one call. CUDA: max_memory_allocated after reset_peak_memory_stats, minus what was
    allocated before. CPU: growth of VmHWM over VmRSS after resetting VmHWM (``reset``), or ru_maxrss growth in a
    fresh subprocess (``subprocess``), or ``off``."""

    def __init__(self, on_cuda: bool, mode: str):
        self.on_cuda = on_cuda
        if on_cuda:
            self.mode = "cuda"
            self.label = "Δ torch.cuda.max_memory_allocated"
            return
        if mode == "auto":
            mode = "reset" if hwm_reset_works() else "subprocess"
        self.mode = mode
        if mode == "reset":
            mmap = use_mmap_for_large_allocations()
            self.label = ("Δ VmHWM after /proc/self/clear_refs reset, heap trimmed"
                          + (", glibc mmap ≥1 MiB" if mmap else ""))
        elif mode == "subprocess":
            self.label = "Δ ru_maxrss in a fresh process (after one warm-up call)"
        else:
            self.label = "not measured"

    def __call__(self, fn):
        """Peak extra bytes (MB) during one call, or None."""
        gc.collect()
        if self.mode == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del out
            return peak / 2**20
        if self.mode == "reset":
            trim_heap()
            _reset_hwm()
            base = _proc_status("VmRSS")
            out = fn()
            peak = _proc_status("VmHWM") - base
            del out
            return peak / 2**20
        return None


def one_provider_main(spec_json: str):
    """Hidden ``--one-provider``: build one case's inputs and provider, call once (warm-up / compile), then report
    ru_maxrss growth over one more call as JSON on stdout. ru_maxrss is the process's lifetime high-water mark, so
    whatever the warm-up touched counts as baseline: the result is a lower bound when the warm-up peaked higher."""
    spec = json.loads(spec_json)
    ns = argparse.Namespace(**spec["args"])
    torch.set_num_threads(ns.threads or torch.get_num_threads())
    case = Case(**spec["case"])
    dtype = getattr(torch, ns.dtype)
    q, k, v, bias = make_inputs(case, dtype, "cpu", ns.seed)
    raise_recompile_limits()
    fn, _, _ = make_provider(spec["provider"], case, q, k, v, bias, case.d ** -0.5, ns, lambda: None)
    out = fn()
    del out
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    print(json.dumps({"peak_mb": (after - before) / 1024}))


def subprocess_peak(case: Case, name: str, args) -> float | None:
    spec = {"case": asdict(case), "provider": name,
            "args": {k: getattr(args, k) for k in ("dtype", "seed", "threads", "max_dense_gb", "flex_dynamic")}}
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one-provider", json.dumps(spec)],
                           capture_output=True, text=True, timeout=600)
        return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"])
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------------------------
# environment

def gpu_peaks(on_cuda: bool):
    """(dense bf16 TFLOP/s, HBM TB/s) for H100/H200 (spec §1.1), else (None, None)."""
    if not on_cuda:
        return None, None
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if "H200" in name:
        return 989.0, 4.8
    if "H100" in name:
        return (756.0, 2.0) if sms == 114 or "PCIe" in name else (989.0, 3.35)
    return None, None


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def sdpa_settings() -> str:
    parts = []
    try:
        from torch.nn.attention import SDPBackend

        names = {SDPBackend.MATH.value: "math", SDPBackend.FLASH_ATTENTION.value: "flash",
                 SDPBackend.EFFICIENT_ATTENTION.value: "efficient", SDPBackend.CUDNN_ATTENTION.value: "cudnn"}
        order = [names.get(int(p), str(int(p))) for p in torch._C._get_sdp_priority_order()]
        parts.append("priority " + ">".join(o for o in order if not o.isdigit()))
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        flags = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                 "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                 "math": torch.backends.cuda.math_sdp_enabled(),
                 "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()}
        parts.append("enabled " + ",".join(k for k, on in flags.items() if on))
    return "; ".join(parts) or "?"


def sdpa_backend_used(call) -> str:
    """Which SDPA kernel a call dispatches to: the first backend, in priority order, that accepts it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = {b.value: b for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                         SDPBackend.CUDNN_ATTENTION)}
        for p in torch._C._get_sdp_priority_order():
            backend = backends.get(int(p))
            if backend is None:
                continue
            try:
                with sdpa_kernel([backend]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = call()
                    del out
                return {"MATH": "math", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
                        "CUDNN_ATTENTION": "cudnn"}[backend.name]
            except RuntimeError:
                continue
    except Exception:  # noqa: BLE001
        pass
    return "?"


def environment_line(args, on_cuda, nograd_backends, timer, memory) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if on_cuda:
        p = torch.cuda.get_device_properties(0)
        driver = "?"
        with contextlib.suppress(Exception):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or "?"
        dev = (f"{p.name}, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
               f"driver {driver}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
               f"flash-attn {version('flash-attn')}")
    else:
        cpu = platform.processor() or "?"
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        dev = f"CPU {cpu}, {os.cpu_count()} cores"
    return (f"env: {when} | {dev} | python {platform.python_version()} | torch {torch.__version__} | "
            f"triton {version('triton')} | transformers {version('transformers')} | "
            f"threads {torch.get_num_threads()} | dtype {args.dtype} | SDPA {sdpa_settings()} | "
            f"nograd backends {','.join(nograd_backends) or 'none'} | timing {timer.method} | "
            f"peak memory {memory.label}")


# ----------------------------------------------------------------------------------------------------------------
# one case

def fmt(x, spec=".2f", none="—"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def short_error(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:120] if lines else ''}"


def interleaved_timing(pending, args):
    """Round-robin CPU timing: repeat i of every provider runs before repeat i + 1 of any. At least ``--repeats``
    rounds, more (up to 50) while the rounds so far took under ``--min-time-ms`` (cheap cases get more samples)."""
    times = {id(row): [] for row, _ in pending}
    for _ in range(args.warmup):
        for row, fn in pending:
            if "error" not in row:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    row["error"] = short_error(e)
    rounds, t_start = 0, time.perf_counter()
    while rounds < args.repeats or (time.perf_counter() - t_start < args.min_time_ms / 1e3 and rounds < 50):
        rounds += 1
        for row, fn in pending:
            if "error" in row:
                continue
            try:
                t0 = time.perf_counter()
                out = fn()
                times[id(row)].append((time.perf_counter() - t0) * 1e3)
                del out
            except Exception as e:  # noqa: BLE001
                row["error"] = short_error(e)
    for row, _ in pending:
        if "error" not in row and times[id(row)]:
            row["ms"], row["p20"], row["p80"] = quantiles(times[id(row)])


def run_case(case: Case, args, on_cuda, nograd_backends, timer, memory, peaks):
    device = "cuda" if on_cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    scale = case.d ** -0.5
    q, k, v, bias = make_inputs(case, dtype, device, args.seed)
    ref_bytes = (1 << 30) if on_cuda else (128 << 20)
    ref = reference(q, k, v, bias, case.causal, scale, ref_bytes)
    ref_nobias = None
    flops = 4 * case.b * case.h * visible_pairs(case.m, case.n, case.causal) * case.d
    elt = q.element_size()
    io_bytes = (2 * case.b * case.h_kv * case.n * case.d + 2 * case.b * case.h * case.m * case.d) * elt
    if case.bias:
        io_bytes += case.b * case.h * case.n * 4
    rows = []
    # CPU: time the providers round-robin, so that load from other processes hits them alike
    interleave = not on_cuda and not args.no_interleave
    pending = []
    keep = [s.strip() for s in args.providers.split(",") if s.strip()] if args.providers else None
    for name in provider_names(case, nograd_backends, on_cuda, keep):
        row = {"provider": name}
        rows.append(row)
        try:
            fn, setup, note = make_provider(name, case, q, k, v, bias, scale, args, timer.sync)
        except Skip as e:
            row["skip"] = str(e)
            continue
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e)
            continue
        row["setup"], row["note"] = setup, note
        try:
            timer.sync()
            t0 = time.perf_counter()
            out = fn()
            timer.sync()
            row["first"] = (time.perf_counter() - t0) * 1e3
            target = ref
            if name == FLOOR and case.bias:
                if ref_nobias is None:
                    ref_nobias = reference(q, k, v, None, case.causal, scale, ref_bytes)
                target = ref_nobias
            row["err"], ok = check(out, target, dtype, args.tol)
            del out
            if not ok:
                row["fail"] = True
                continue
            if name in (FLOOR, DENSE):
                row["note"] = ", ".join(x for x in (f"SDPA {sdpa_backend_used(fn)}", row["note"]) if x)
            # the memory call doubles as the warm-up of the timing
            if memory.mode == "subprocess":
                row["mem"] = subprocess_peak(case, name, args)
                del_out = fn()  # the warm-up the memory call gives in the other modes
                del del_out
            elif memory.mode == "off":
                row["mem"] = None
                del_out = fn()
                del del_out
            else:
                row["mem"] = memory(fn)
            if interleave:
                pending.append((row, fn))
            else:
                row["ms"], row["p20"], row["p80"] = timer(fn)
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e)
        finally:
            del fn
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
    if pending:
        interleaved_timing(pending, args)
        del pending
    floor = next((r.get("ms") for r in rows if r["provider"] == FLOOR), None)
    flex = next((r.get("ms") for r in rows if r["provider"] == FLEX), None)
    for r in rows:
        ms = r.get("ms")
        if ms:
            r["x_floor"] = ms / floor if floor else None
            r["x_flex"] = ms / flex if flex else None
            r["tflops"] = flops / (ms * 1e-3) / 1e12
            r["pct_peak"] = 100 * r["tflops"] / peaks[0] if peaks[0] and dtype != torch.float32 else None
            r["gbs"] = io_bytes / (ms * 1e-3) / 1e9
            r["pct_bw"] = 100 * r["gbs"] / (peaks[1] * 1e3) if peaks[1] else None
    del q, k, v, bias, ref, ref_nobias
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return rows, flops


def table(case: Case, rows, flops, on_cuda, peaks) -> str:
    decode = case.m == 1
    cols = ["provider", "ms (median)", "p20–p80 ms", "× floor", "× flex", "TFLOP/s"]
    if on_cuda:
        cols.append("% of bf16 peak")
    if decode:
        cols.append("GB/s")
        if on_cuda:
            cols.append("% of HBM")
    cols += ["peak MB", "max abs err", "first call ms", "setup ms", "notes"]
    lines = [f"#### {case.title()}", "",
             f"visible-pair FLOPs {flops / 1e9:.2f} G" + ("; GB/s counts q, K, V, out and the bias once" if decode
                                                          else ""), "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = {"provider": r["provider"]}
        if "skip" in r:
            cells["ms (median)"] = "skipped"
            cells["notes"] = r["skip"]
        elif "error" in r:
            cells["ms (median)"] = "ERROR"
            cells["notes"] = r["error"].replace("|", "/")
        elif r.get("fail"):
            cells["ms (median)"] = "FAIL"
            cells["max abs err"] = fmt(r.get("err"), ".2e", "nan")
            cells["first call ms"] = fmt(r.get("first"), ".1f")
            cells["notes"] = "output differs from the fp32 reference: not timed"
        else:
            prec = ".3f" if r["ms"] < 10 else ".1f"
            cells.update({
                "ms (median)": format(r["ms"], prec),
                "p20–p80 ms": f"{r['p20']:{prec}}–{r['p80']:{prec}}",
                "× floor": fmt(r.get("x_floor")),
                "× flex": fmt(r.get("x_flex")),
                "TFLOP/s": fmt(r.get("tflops"), ".3f" if r["tflops"] < 10 else ".1f"),
                "% of bf16 peak": fmt(r.get("pct_peak"), ".1f"),
                "GB/s": fmt(r.get("gbs"), ".1f"),
                "% of HBM": fmt(r.get("pct_bw"), ".1f"),
                "peak MB": fmt(r.get("mem"), ".0f"),
                "max abs err": fmt(r.get("err"), ".1e"),
                "first call ms": fmt(r.get("first"), ".1f"),
                "setup ms": fmt(r.get("setup"), ".1f"),
                "notes": r.get("note", "") + ("; vs no-bias reference" if r["provider"] == FLOOR and case.bias
                                              else ""),
            })
        lines.append("| " + " | ".join(str(cells.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def summary(results, nograd_names, stat: str = "ms") -> str:
    """One row per case: each provider's ``stat`` (``"ms"``: the median; ``"p20"``: the 20th percentile, which load
    from other processes on a shared CPU inflates least) over the floor's."""
    cols = ["case", f"floor {'ms' if stat == 'ms' else stat + ' ms'}", DENSE, FLEX, EAGER] + nograd_names
    title = ("#### Summary: time ÷ SDPA-no-bias time (lower is better; FAIL / ERROR / skip shown as such)"
             if stat == "ms" else f"#### Summary by {stat}: {stat} time ÷ SDPA-no-bias {stat} time (lower is better)")
    lines = [title, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for case, rows in results:
        by = {r["provider"]: r for r in rows}
        floor = by.get(FLOOR, {})
        cells = [case.title(), fmt(floor.get(stat), ".3f")]
        for name in cols[2:]:
            r = by.get(name)
            if r is None:
                cells.append("")
            elif "skip" in r:
                cells.append("skip")
            elif "error" in r:
                cells.append("ERROR")
            elif r.get("fail"):
                cells.append("FAIL")
            elif stat == "ms":
                cells.append(fmt(r.get("x_floor")))
            else:
                cells.append(fmt(r[stat] / floor[stat] if r.get(stat) and floor.get(stat) else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# main

def parse_args(argv=None):
    on_cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n", type=int, nargs="+", help="sequence lengths of the prefill grid "
                   "(default: CPU 1024 2048; CUDA 1024 2048 4096 8192)")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims of the prefill grid")
    p.add_argument("--heads", type=int, help="H of the prefill grid (default: CPU 8; CUDA 2048 // D)")
    p.add_argument("--batch", type=int, help="B of the prefill grid (default: CPU 1; CUDA 16384 // N)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--bias", choices=["both", "yes", "no"], default="both")
    p.add_argument("--cases", default=None, help=f"comma list of {','.join(CASE_KINDS)} "
                   "(default: CPU prefill,gqa,decode; CUDA all)")
    p.add_argument("--gqa-n", type=int, nargs="+", help="N of the GQA causal prefill cases (H=28/4, 32/8, D=128; "
                   "default: CPU 1024; CUDA 1024 4096 16384)")
    p.add_argument("--decode-n", type=int, nargs="+", help="N of the M=1 decode cases (H=32/8, D=128; "
                   "default: CPU 4096 16384; CUDA 4096 32768)")
    p.add_argument("--decode-b", type=int, nargs="+", help="B of the decode cases (default: CPU 1; CUDA 1 8)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: CPU float32, CUDA bfloat16")
    p.add_argument("--providers", help="comma list of substrings; keep only providers whose name contains one "
                   "(the floor is always kept)")
    p.add_argument("--nograd-backends", help=f"comma list (default: those of {NOGRAD_BACKENDS} in "
                   "nograd.kernels.BACKENDS)")
    p.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per provider (at least)")
    p.add_argument("--min-time-ms", type=float, default=500,
                   help="CPU: keep adding timing rounds (up to 50) until they took this long")
    p.add_argument("--warmup", type=int, default=0, help="CPU: extra untimed calls before timing (the first call, "
                   "which is checked, and the peak-memory call already precede it)")
    p.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warm-up (ms)")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench repetition time (ms)")
    p.add_argument("--no-interleave", action="store_true",
                   help="CPU: time each provider in one block instead of round-robin across providers")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--cpu-mem", choices=["auto", "reset", "subprocess", "off"], default="auto",
                   help="CPU peak-memory method (auto: reset if /proc/self/clear_refs works, else subprocess)")
    p.add_argument("--max-dense-gb", type=float, help="skip dense-mask / eager providers needing more "
                   "(default: CPU 4, CUDA 60)")
    p.add_argument("--flex-dynamic", choices=["none", "true", "false"], default="false",
                   help="torch.compile(flex_attention, dynamic=...) for the 'flex compiled' row (false, as nograd's "
                   "flex backend; none = torch's default, which fails to compile GQA + score_mod on CPU in 2.13)")
    p.add_argument("--tol", type=float, help="check tolerance × max(1, max|ref|) (default fp32 1e-4, half 5e-2)")
    p.add_argument("--budget-s", type=float, default=0, help="start no new case after this many seconds (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="append the environment line and the tables to this file")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--one-provider", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_provider:
        return args, False
    if args.device == "cuda" and not on_cuda:
        p.error("--device cuda but torch.cuda.is_available() is False")
    on_cuda = on_cuda and args.device != "cpu"
    dflt = {"n": ([1024, 2048, 4096, 8192], [1024, 2048]), "gqa_n": ([1024, 4096, 16384], [1024]),
            "decode_n": ([4096, 32768], [4096, 16384]), "decode_b": ([1, 8], [1]),
            "dtype": ("bfloat16", "float32"), "max_dense_gb": (60.0, 4.0),
            "cases": ("prefill,gqa,decode,dit", "prefill,gqa,decode")}
    for key, (gpu, cpu) in dflt.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if on_cuda else cpu)
    unknown = set(args.cases.split(",")) - set(CASE_KINDS)
    if unknown:  # a typo would run nothing and exit 0, losing a GPU run's bench step
        p.error(f"unknown cases {sorted(unknown)}; known: {','.join(CASE_KINDS)}")
    if args.repeats < 1 or args.budget_s < 0:
        p.error("--repeats >= 1 and --budget-s >= 0")
    args.flex_dynamic = {"none": None, "true": True, "false": False}.get(args.flex_dynamic, args.flex_dynamic)
    return args, on_cuda


def main(argv=None):
    args, on_cuda = parse_args(argv)
    if args.one_provider:
        one_provider_main(args.one_provider)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = build_cases(args, on_cuda)
    if args.list:
        for c in cases:
            print(c.title())
        return 0

    notes = []
    try:
        from nograd import kernels

        available = tuple(getattr(kernels, "BACKENDS", ()))
    except Exception as e:  # noqa: BLE001
        available = ()
        notes.append(f"note: cannot import nograd.kernels ({type(e).__name__}: {e}); no nograd rows")
    wanted = args.nograd_backends.split(",") if args.nograd_backends else list(NOGRAD_BACKENDS)
    nograd_backends = []
    for b in wanted:
        if b not in available:
            notes.append(f"note: nograd backend {b!r} is not in nograd.kernels.BACKENDS {available}: skipped")
        elif b == "triton" and not on_cuda:
            notes.append("note: nograd backend 'triton' skipped: not on CUDA (the CPU interpreter is far too slow "
                         "to time)")
        else:
            nograd_backends.append(b)
    raise_recompile_limits()
    timer = Timer(on_cuda, args)
    memory = Memory(on_cuda, args.cpu_mem)
    peaks = gpu_peaks(on_cuda)
    env = environment_line(args, on_cuda, nograd_backends, timer, memory)
    header = [env] + notes
    if on_cuda and peaks[0] is None:
        header.append("note: not an H100/H200 by name: no % of peak")
    print("\n".join(header), flush=True)

    def emit(text):
        print(text, flush=True)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(text + "\n")

    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n### nograd attention benchmark, {datetime.date.today().isoformat()}\n\n"
                    + "\n\n".join(f"`{h}`" for h in header) + "\n\n")
    start = time.perf_counter()
    results = []
    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        if args.budget_s and elapsed > args.budget_s:
            left = cases[i:]
            emit(f"budget of {args.budget_s:.0f} s reached after {elapsed:.0f} s: {len(left)} case(s) not run: "
                 + "; ".join(c.title() for c in left) + "\n")
            break
        t0 = time.perf_counter()
        try:
            rows, flops = run_case(case, args, on_cuda, nograd_backends, timer, memory, peaks)
        except Exception as e:  # noqa: BLE001  (inputs or reference failed, e.g. out of memory)
            emit(f"#### {case.title()}\n\ncase failed before any provider ran: {short_error(e)}\n")
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
            continue
        results.append((case, rows))
        emit(table(case, rows, flops, on_cuda, peaks)
             + f"\n_case took {time.perf_counter() - t0:.0f} s_\n")
    names = [f"nograd {b}" for b in nograd_backends if b != "triton" or on_cuda]
    emit(summary(results, names))
    emit(summary(results, names, stat="p20"))
    emit(f"total {time.perf_counter() - start:.0f} s for {len(results)} case(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
