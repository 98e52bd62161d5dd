"""nograd.kernels.attention and its statistics against an independent reference, for every backend."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from checks import host_reads
from nograd import kernels

# (B, H, H_kv, M, N, D): spec kernels.md §3.4, plus odd sizes
SHAPES = [(1, 2, 2, 32, 32, 64), (2, 4, 2, 37, 37, 64), (1, 3, 1, 45, 100, 40), (1, 2, 2, 17, 83, 64),
          (1, 2, 2, 1, 67, 64), (2, 4, 1, 5, 5, 16), (2, 8, 2, 1, 37, 16)]
BACKENDS = ["sdpa", "eager"]
attention_module = importlib.import_module("nograd.kernels.attention")
triton_attention = importlib.import_module("nograd.kernels.triton_attention")  # the package exports the function by the name


def reference(q, k, v, key_bias=None, causal=False, scale=None):
    """Dense-mask SDPA with repeated K/V (the spec's reference) and the explicit LSE."""
    b, h, m, d = q.shape
    n = k.shape[2]
    k, v = k.repeat_interleave(h // k.shape[1], 1).double(), v.repeat_interleave(h // v.shape[1], 1).double()
    bias = torch.zeros(b, h, m, n, dtype=torch.float64)
    if key_bias is not None:
        bias = bias + key_bias.double()[..., None, :]
    if causal:
        visible = torch.arange(n)[None, :] <= torch.arange(m)[:, None] + n - m
        bias = bias.masked_fill(~visible, -math.inf)
    scale = d ** -0.5 if scale is None else scale
    logits = q.double() @ k.transpose(-1, -2) * scale + bias
    lse = torch.logsumexp(logits, -1)
    probs = torch.nan_to_num(torch.exp(logits - lse[..., None]), nan=0.0)
    return (probs @ v).float(), lse.float()


def inputs(shape, seed=0, dtype=torch.float32):
    b, h, h_kv, m, n, d = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, m, d, generator=g).to(dtype), torch.randn(b, h_kv, n, d, generator=g).to(dtype),
            torch.randn(b, h_kv, n, d, generator=g).to(dtype))


def bias_of(kind, b, h, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = {"BHN": (b, h, n), "B1N": (b, 1, n), "1HN": (1, h, n)}[kind]
    bias = torch.randn(shape, generator=g)
    bias[..., ::3] = -math.inf  # a third of the keys hard-masked
    return bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_kind", [None, "BHN", "B1N", "1HN"])
def test_matches_reference(backend, shape, causal, bias_kind):
    q, k, v = inputs(shape)
    b, h, _, m, n, _ = shape
    bias = None if bias_kind is None else bias_of(bias_kind, b, h, n)
    out, lse = kernels.attention(q, k, v, key_bias=bias, causal=causal, backend=backend, return_lse=True)
    want, want_lse = reference(q, k, v, bias, causal)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_and_minus_inf(backend):
    q, k, v = inputs((2, 2, 1, 4, 6, 16))
    bias = torch.zeros(2, 1, 6)
    bias[1] = -math.inf
    out, lse = kernels.attention(q, k, v, key_bias=bias, backend=backend, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all()
    # bottom-right causal with M > N: the first M - N queries see nothing
    out, lse = kernels.attention(q, k[:, :, :2], v[:, :, :2], causal=True, backend=backend, return_lse=True)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2])) and torch.isneginf(lse[:, :, :2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_hf_layout(backend):
    """(B, S, H, D) tensors viewed as (B, H, S, D), as transformers produces them, give the same result."""
    q, k, v = inputs((2, 4, 2, 9, 9, 16))
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not strided[0].is_contiguous()
    bias = bias_of("BHN", 2, 4, 9)
    want = kernels.attention(q, k, v, key_bias=bias, causal=True, backend=backend)
    torch.testing.assert_close(kernels.attention(*strided, key_bias=bias, causal=True, backend=backend), want,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, atol):
    q, k, v = inputs((1, 4, 2, 16, 16, 32), dtype=dtype)
    bias = bias_of("B1N", 1, 4, 16)
    want, _ = reference(q.float(), k.float(), v.float(), bias, True)
    for backend in BACKENDS:
        out = kernels.attention(q, k, v, key_bias=bias, causal=True, backend=backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), want, atol=atol, rtol=0)


def test_key_bias_is_post_softmax_reweighting():
    q, k, v = inputs((1, 2, 2, 8, 8, 16))
    scale = torch.rand(1, 2, 8) + 0.1
    scale[..., 0] = 4.0
    logits = (q @ k.transpose(-1, -2)) / 4.0
    weights = logits.softmax(-1) * scale[..., None, :]
    want = (weights / weights.sum(-1, keepdim=True)) @ v
    got = kernels.attention(q, k, v, key_bias=kernels.reweight_to_bias(scale), backend="eager")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_mask_bool_and_float(backend):
    q, k, v = inputs((2, 2, 2, 6, 6, 16))
    allowed = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed[..., 0] = True
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, -math.inf)
    want = kernels.attention(q, k, v, mask=additive, backend="eager")
    torch.testing.assert_close(kernels.attention(q, k, v, mask=allowed, backend=backend), want, atol=1e-6, rtol=0)
    logits = (q @ k.transpose(-1, -2)) / 4.0 + additive
    torch.testing.assert_close(want, logits.softmax(-1) @ v, atol=1e-6, rtol=0)


def test_softcap_only_in_eager_and_matches_formula():
    q, k, v = inputs((1, 2, 1, 5, 5, 16))
    got = kernels.attention(q, k, v, softcap=2.0)  # auto -> eager
    logits = torch.tanh((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4.0 / 2.0) * 2.0
    torch.testing.assert_close(got, logits.softmax(-1) @ v.repeat_interleave(2, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="softcap"):
        kernels.attention(q, k, v, softcap=2.0, backend="sdpa")


@pytest.mark.parametrize("backend", BACKENDS)
def test_blend(backend):
    q, k, v = inputs((2, 4, 2, 7, 9, 16))
    plain = kernels.attention(q, k, v, causal=True, backend=backend)
    zero = kernels.attention(q, k, v, causal=True, backend=backend, blend=torch.zeros(4))
    assert torch.equal(zero, plain)
    one = kernels.attention(q, k, v, causal=True, backend=backend, blend=torch.ones(2, 4))
    assert torch.equal(one, v.repeat_interleave(2, 1)[:, :, 2:])
    u = torch.rand(2, 4)
    mixed = kernels.attention(q, k, v, causal=True, backend=backend, blend=u)
    torch.testing.assert_close(mixed, torch.lerp(plain, v.repeat_interleave(2, 1)[:, :, 2:], u[..., None, None]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(backend="triton-ish"), "backend"),
        (dict(key_bias=torch.zeros(3, 1, 9)), "key_bias"),
        (dict(blend=torch.zeros(3)), "blend"),
        (dict(window=0, causal=True), "window must be an int number of positions >= 1"),
        (dict(window=2.5, causal=True), r"window must be an int .* got 2\.5"),
        (dict(v_dtype=torch.float64), "q, k, v must share a dtype and a device"),
        (dict(mask=torch.ones(9, 9, dtype=torch.long)), r"mask is boolean .* additive float mask; got torch\.int64"),
        (dict(key_bias=torch.zeros(9, device="meta")), "key_bias is on meta, q on "),
        (dict(mask=torch.ones(9, 9, dtype=torch.bool, device="meta")), "mask is on meta, q on "),
    ],
)
def test_bad_arguments(kwargs, words):
    q, k, v = inputs((2, 4, 2, 9, 9, 16))
    v = v.to(kwargs.pop("v_dtype", v.dtype))
    with pytest.raises(ValueError, match=words):
        kernels.attention(q, k, v, **kwargs)


def test_gqa_heads_must_divide():
    q, k, v = inputs((1, 3, 2, 4, 4, 16))
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention(q, k[:, :2], v[:, :2])


def test_attention_rows_are_softmax_rows():
    q, k, _ = inputs((2, 4, 2, 11, 11, 16))
    bias = bias_of("BHN", 2, 4, 11)
    rows = torch.tensor([3, 10])
    got = kernels.attention_rows(q[:, :, rows], k, positions=rows, key_bias=bias)
    logits = kernels.scaled_logits(q, k, key_bias=bias, causal=True)
    torch.testing.assert_close(got, logits.softmax(-1)[:, :, rows], atol=1e-6, rtol=0)
    assert torch.equal(got[:, :, 0, 4:], torch.zeros_like(got[:, :, 0, 4:]))


def test_key_mass_sum_mean_and_planted_sink():
    q, k, _ = inputs((1, 2, 2, 12, 12, 16))
    bias = torch.zeros(1, 2, 12)
    bias[0, 1, 5] = 20.0  # plant a sink in head 1
    probs = kernels.scaled_logits(q, k, key_bias=bias, causal=True).softmax(-1).nan_to_num()
    total = kernels.key_attention_mass(q, k, key_bias=bias, causal=True)
    torch.testing.assert_close(total, probs.sum(2), atol=1e-5, rtol=0)
    mean = kernels.key_attention_mass(q, k, key_bias=bias, causal=True, reduce="mean")
    torch.testing.assert_close(mean, probs.sum(2) / torch.arange(12, 0, -1), atol=1e-6, rtol=0)
    assert int(mean[0, 1].argmax()) == 5 and mean[0, 1, 5] > 0.99
    _, lse = kernels.attention(q, k, k, key_bias=bias, causal=True, return_lse=True)
    torch.testing.assert_close(kernels.key_attention_mass(q, k, lse, key_bias=bias, causal=True), total,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("valid", [torch.ones(1, 12, dtype=torch.long), torch.ones(1, 13, dtype=torch.bool),
                                   torch.ones(12, dtype=torch.bool), [True] * 12])
def test_key_mass_refuses_a_query_valid_of_another_shape_or_dtype(valid):
    """A (B, N) attention mask or a 0/1 int mask was taken (its first M columns, or a masked_fill error)."""
    q, k, _ = inputs((1, 2, 2, 12, 12, 16))
    with pytest.raises(ValueError, match=r"query_valid must be a bool tensor of shape \(B, M\) = \(1, 12\)"):
        kernels.key_attention_mass(q, k, causal=True, query_valid=valid)


def test_key_mass_counts_only_the_valid_queries():
    """The last 4 queries (a right-padded row's pads) neither add weight nor count in the mean."""
    q, k, _ = inputs((1, 2, 2, 12, 12, 16))
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, 8:] = False
    probs = kernels.scaled_logits(q, k, causal=True).softmax(-1)[:, :, :8]
    for lse in (None, kernels.attention(q, k, k, causal=True, return_lse=True)[1]):
        total = kernels.key_attention_mass(q, k, lse, causal=True, query_valid=valid)
        torch.testing.assert_close(total, probs.sum(2), atol=1e-5, rtol=0)
        mean = kernels.key_attention_mass(q, k, lse, causal=True, query_valid=valid, reduce="mean")
        torch.testing.assert_close(mean, probs.sum(2) / torch.arange(8, -4, -1).clamp(min=1), atol=1e-6, rtol=0)


def test_sdpa_broadcast_bias_matches_torch_sdpa():
    """Non-causal/decode with a key bias is a broadcast mask for SDPA: the same numbers as calling it directly."""
    q, k, v = inputs((2, 4, 4, 1, 50, 32))
    bias = bias_of("B1N", 2, 4, 50)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :, None, :])
    torch.testing.assert_close(kernels.attention(q, k, v, key_bias=bias, backend="sdpa", causal=True), want,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n", [(9, 9), (3, 9), (1, 9)])
def test_sliding_window_matches_transformers_definition(backend, m, n):
    """transformers' sliding window: query at position p sees keys j with p - window < j <= p."""
    q, k, v = inputs((1, 2, 2, m, n, 16))
    window = 4
    positions = torch.arange(m) + n - m
    visible = (torch.arange(n)[None, :] <= positions[:, None]) & (torch.arange(n)[None, :] > positions[:, None] - window)
    want = kernels.attention(q, k, v, mask=visible[None, None], backend="eager")
    got = kernels.attention(q, k, v, causal=True, window=window, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    rows = kernels.attention_rows(q, k, positions=positions, window=window)
    torch.testing.assert_close(rows, kernels.scaled_logits(q, k, mask=visible[None, None]).softmax(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("m, n", [(13, 13), (6, 17), (11, 6), (1, 9)])
@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 5), (False, 5)])
@pytest.mark.parametrize("extra", [None, "mask", "edit"])
def test_key_mass_in_query_blocks_equals_the_whole_matrix(monkeypatch, m, n, causal, window, extra):
    """The CPU key mass, read one block of 4 query rows at a time, equals the sum (and per-key mean) over the whole
    (B, H, M, N) matrix, with a dense per-query mask, a score edit, or the call's LSE."""
    q, k, _ = inputs((2, 4, 2, m, n, 16))
    bias = bias_of("B1N", 2, 4, n)
    bias[..., -1] = 0.0  # every row sees a key
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(2, 1, m, n, generator=g) > 0.3) | (torch.arange(n) == n - 1) if extra == "mask" else None
    edit = kernels.ScoreEdit(abs_coef=torch.rand(2, 1, n, generator=g), mul_coef=torch.rand(1, 4, n, generator=g) - 0.5,
                             rows_from=torch.tensor([n - 2, 0])) if extra == "edit" else None
    args = dict(key_bias=bias, causal=causal, window=window, mask=mask, edit=edit)
    logits = kernels.scaled_logits(q, k, **args)
    probs = logits.softmax(-1).nan_to_num()
    lse = torch.logsumexp(logits, -1)
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 4)
    torch.testing.assert_close(kernels.key_attention_mass(q, k, **args), probs.sum(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(kernels.key_attention_mass(q, k, lse, **args), probs.sum(2), atol=1e-5, rtol=0)
    mean = probs.sum(2) / torch.isfinite(logits).sum(2).clamp(min=1)
    torch.testing.assert_close(kernels.key_attention_mass(q, k, reduce="mean", **args), mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES + [(2, 4, 2, 11, 6, 16)])
@pytest.mark.parametrize("bias_kind", [None, "BHN", "B1N"])
@pytest.mark.parametrize("window", [None, 6])
def test_sdpa_query_blocks_match_the_reference(monkeypatch, shape, bias_kind, window):
    """A causal edge with a bias (or a window) runs SDPA on blocks of query rows over only the keys each block sees;
    with blocks of 4 rows (several blocks, a partial last one, blocks left of the window, rows before the first key
    when M > N) it equals the reference."""
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 4)
    q, k, v = inputs(shape)
    b, h, _, _, n, _ = shape
    bias = None if bias_kind is None else bias_of(bias_kind, b, h, n)
    want = kernels.attention(q, k, v, key_bias=bias, causal=True, window=window, backend="eager")
    got = kernels.attention(q, k, v, key_bias=bias, causal=True, window=window, backend="sdpa")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("m", [2048, 1748])
def test_sdpa_causal_bias_is_not_quadratic(monkeypatch, m):
    """Causal attention with a key bias on the sdpa backend allocates nothing of size M x N. With M == N the bias
    rides along as an extra head dimension of q and k: one SDPA call, its own causal kernel, no mask. A chunk of
    queries over a longer cache (M < N) runs one call per block of query rows, each over the keys up to its causal
    edge, with GQA heads packed as rows. The call's peak memory (profiler, allocations in order) stays below one
    head's M x N matrix either way."""
    from torch.profiler import ProfilerActivity, profile

    n = 2048
    q, k, v = inputs((1, 4, 2, m, n, 32))
    bias = bias_of("B1N", 1, 4, n)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        calls.append((tuple(query.shape[1:]), tuple(key.shape[1:]), attn_mask is None, is_causal))
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = kernels.attention(q, k, v, key_bias=bias, causal=True, backend="sdpa")
    monkeypatch.undo()
    block = attention_module.QUERY_BLOCK
    if m == n:
        assert calls == [((4, m, 40), (2, n, 40), True, True)]  # D = 32, one bias dimension, padded to 8
    else:
        assert calls == [((2, 2 * min(block, m - r), 32), (2, min(r + block + n - m, n), 32), False, False)
                         for r in range(0, m, block)]
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    in_use = peak = 0
    for event in events:
        in_use += event.self_cpu_memory_usage
        peak = max(peak, in_use)
    assert 0 < peak < m * n * 4, peak
    want = kernels.attention(q[:, :, -64:], k, v, key_bias=bias, causal=True, backend="eager")  # the last rows
    torch.testing.assert_close(got[:, :, -64:], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias_kind", ["BHN", "B1N", "1HN"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_folded_key_bias_is_the_bias(bias_kind, dtype, atol):
    """q' k'^T (the bias as extra head dimensions, one per head of a GQA group when it differs between them) is
    the biased logits; -inf keys get a finite logit far below every real one, never NaN."""
    q, k, _ = inputs((2, 6, 2, 9, 9, 16), dtype=dtype)
    bias = bias_of(bias_kind, 2, 6, 9)
    folded_q, folded_k = attention_module.fold_key_bias(q, k, bias, 0.25)
    logits = (folded_q.float() @ folded_k.float().repeat_interleave(3, 1).transpose(-1, -2)) * 0.25
    want = (q.float() @ k.float().repeat_interleave(3, 1).transpose(-1, -2)) * 0.25 + bias[..., None, :]
    finite = torch.isfinite(want)
    assert not torch.isnan(logits).any() and bool((logits[~finite] < -1000).all())
    torch.testing.assert_close(logits[finite], want[finite], atol=atol * 10, rtol=atol)


@pytest.mark.parametrize("shape", [(7,), (4, 7), (1, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_low_dimensional_key_bias_broadcasts(shape, causal):
    q, k, v = inputs((2, 4, 2, 7, 7, 16))
    bias = torch.randn(shape)
    bias[..., 2] = -math.inf
    want = kernels.attention(q, k, v, key_bias=bias, causal=causal, backend="eager")
    torch.testing.assert_close(kernels.attention(q, k, v, key_bias=bias, causal=causal, backend="sdpa"), want,
                               atol=1e-5, rtol=0)


def test_a_key_bias_with_a_query_axis_is_refused():
    q, k, v = inputs((1, 2, 2, 4, 4, 8))
    with pytest.raises(ValueError, match=r"key_bias \(1, 1, 1, 4\) does not broadcast to \(B, H, N\)"):
        kernels.attention(q, k, v, key_bias=torch.zeros(1, 1, 1, 4))


@pytest.mark.parametrize("dtype, constant, scale, atol", [
    (torch.float16, -3000.0, None, 2e-3),   # finite biases below fp16's stand-in for -inf: not folded
    (torch.float64, None, None, 1e-6),      # fp64 q: the fold's floor fits the bias (eager is fp32)
    (torch.float32, None, 0.0, 1e-6),       # scale 0: nothing to divide by, not folded
])
def test_causal_bias_fold_only_where_exact(dtype, constant, scale, atol):
    q, k, v = inputs((1, 4, 2, 9, 9, 16), dtype=dtype)
    bias = bias_of("B1N", 1, 4, 9)
    if constant is not None:  # a large constant (exact in fp16) on the finite keys: the softmax ignores it
        bias = torch.where(torch.isfinite(bias), torch.full_like(bias, constant), bias)
    want = kernels.attention(q, k, v, key_bias=bias, causal=True, scale=scale, backend="eager")
    got = kernels.attention(q, k, v, key_bias=bias, causal=True, scale=scale, backend="sdpa")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=0)


def test_triton_where_it_cannot_run(monkeypatch):
    """``use_backend("triton")`` falls back where Triton cannot run; ``backend="triton"`` there names the reason."""
    monkeypatch.setattr(triton_attention, "available", lambda device=None: False)
    q, k, v = inputs((1, 2, 2, 4, 4, 16))
    with kernels.use_backend("triton"):
        assert kernels.choose_backend(q) == "sdpa"
        torch.testing.assert_close(kernels.attention(q, k, v, causal=True),
                                   kernels.attention(q, k, v, causal=True, backend="eager"), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        kernels.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        kernels.attention_rows(q, k, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA choice (bench/gpu.sh runs it on a lent GPU)")
def test_auto_choice_on_cuda():
    """Decode without an edit: SDPA (its broadcast mask is O(N)); with a score edit: the Triton kernel, which fuses
    it (SDPA would run the edited row on the reference, a dozen small kernels)."""
    q = torch.randn(1, 2, 1, 16, device="cuda")
    edit = kernels.ScoreEdit(abs_coef=torch.ones(1, 1, 4, device="cuda"))
    fused = "triton" if triton_attention.available(q.device) else "sdpa"
    assert kernels.choose_backend(q) == "sdpa"
    assert kernels.choose_backend(q, edit=edit) == fused
    assert kernels.choose_backend(q.expand(1, 2, 4, 16), edit=edit) == fused


def test_a_biased_decode_step_reads_nothing_back():
    """The sdpa path of a decode step with a key bias (ZeroTuning's, ACT's, a padded batch's) zeroes the rows that
    see no key without asking first whether there are any (that question was a sync at every layer)."""
    q, k, v = inputs((2, 4, 2, 1, 33, 16))
    bias = torch.zeros(2, 1, 33)
    bias[1] = -math.inf  # row 1 sees nothing
    out = kernels.attention(q, k, v, key_bias=bias, backend="sdpa")
    assert host_reads(lambda: kernels.attention(q, k, v, key_bias=bias, backend="sdpa")) == 0
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], kernels.attention(q[:1], k[:1], v[:1], backend="eager"), atol=1e-5, rtol=0)


def test_auto_choice_on_cpu():
    q, k, _ = inputs((1, 2, 2, 4, 4, 16))
    assert kernels.choose_backend(q) == "sdpa"
    assert kernels.choose_backend(q, return_lse=True) == "eager"
    assert kernels.choose_backend(q, softcap=2.0) == "eager"
    assert kernels.choose_backend(q, edit=kernels.ScoreEdit(abs_coef=torch.ones(1, 1, 4))) == "sdpa"
    with kernels.use_backend("triton"):  # preferred where it can run (CPU tensors: only under TRITON_INTERPRET=1)
        assert kernels.choose_backend(q) == ("triton" if triton_attention.available(q.device) else "sdpa")
        assert kernels.choose_backend(q, mask=torch.ones(1, 1, 4, 4, dtype=torch.bool)) == "sdpa"
        wide = torch.zeros(1, 2, 4, 320)  # a head dim past the kernel's 256: a preference it cannot serve (it raised)
        assert kernels.choose_backend(wide) == "sdpa"
        torch.testing.assert_close(kernels.attention(wide, wide, wide), kernels.attention(wide, wide, wide,
                                                                                          backend="eager"))
    assert kernels.choose_backend(q) == "sdpa"
    with pytest.raises(ValueError, match="backend"):
        with kernels.use_backend("cuda-magic"):
            pass


def test_autograd_never_meets_the_forward_only_triton_kernel():
    """The Triton kernels have no backward: under autograd ``auto`` (even with Triton preferred) runs a backend that
    has one, with the reference's gradients; asking for ``backend="triton"`` there is a ValueError; under
    ``torch.no_grad()`` the preference holds again."""
    q, k, v = (t.requires_grad_() for t in inputs((1, 4, 2, 6, 9, 16)))
    bias = torch.randn(1, 4, 9).requires_grad_()
    with kernels.use_backend("triton"):
        assert kernels.choose_backend(q, grad=True) == "sdpa"
        out = kernels.attention(q, k, v, key_bias=bias, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, bias))
    want = torch.autograd.grad(kernels.attention(q, k, v, key_bias=bias, causal=True, backend="eager").square().sum(),
                               (q, k, v, bias))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="backend='triton' is forward-only"):
        kernels.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' is forward-only"):
        kernels.attention_rows(q, k, backend="triton")
    rows = kernels.attention_rows(q, k, key_bias=bias)
    assert rows.grad_fn is not None
    if triton_attention.available(q.device):
        with torch.no_grad(), kernels.use_backend("triton"):
            assert kernels.choose_backend(q) == "triton"
            kernels.attention(q, k, v, backend="triton")


def test_autograd_never_meets_flex_on_cpu():
    """torch's FlexAttention has no backward on CPU: a flex preference under autograd runs a backend that has one
    (it failed with torch's NotImplementedError), an explicit ``backend="flex"`` there is a ValueError saying so."""
    q, k, v = (t.requires_grad_() for t in inputs((1, 4, 2, 6, 9, 16)))
    with kernels.use_backend("flex"):
        assert kernels.choose_backend(q, grad=True) == "sdpa" and kernels.choose_backend(q) == "flex"
        out = kernels.attention(q, k, v, causal=True)
    want = kernels.attention(q, k, v, causal=True, backend="eager")
    torch.testing.assert_close(torch.autograd.grad(out.sum(), q)[0], torch.autograd.grad(want.sum(), q)[0],
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="backend='flex' has no backward on CPU"):
        kernels.attention(q, k, v, backend="flex")


@pytest.mark.slow
def test_flex_backend_matches_reference():
    """Compiled FlexAttention (tens of seconds to compile on CPU: one shape, causal with a bias and a window)."""
    q, k, v = inputs((1, 4, 2, 24, 40, 32))
    bias = bias_of("B1N", 1, 4, 40)
    for kwargs in (dict(causal=True), dict(causal=True, window=9)):
        out, lse = kernels.attention(q, k, v, key_bias=bias, backend="flex", return_lse=True, **kwargs)
        want, want_lse = reference(q, k, v, bias, **kwargs) if "window" not in kwargs else \
            kernels.attention(q, k, v, key_bias=bias, backend="eager", return_lse=True, **kwargs)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
        finite = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("m, n, causal, window", [(6, 6, True, None), (8, 5, True, None), (5, 9, True, 3),
                                                  (4, 7, False, None), (1, 7, True, 2), (1, 7, True, None)])
def test_dead_rows_equals_a_dense_scan(m, n, causal, window):
    from nograd.kernels.attention import dead_rows, logit_bias

    bias = torch.zeros(2, 3, n)
    bias[0, 1, :] = -math.inf
    bias[1, 2, : n // 2] = -math.inf
    q, k = torch.zeros(2, 3, m, 4), torch.zeros(2, 3, n, 4)
    for key_bias in (bias, None, bias[1], bias[0, 1]):  # (B, H, N), none, (H, N), (N,)
        dense = logit_bias(q, k, key_bias=key_bias, causal=causal, window=window)
        want = torch.isneginf(dense).all(-1, keepdim=True) if dense is not None else torch.zeros(1, 1, m, 1, dtype=torch.bool)
        got = dead_rows(key_bias, m, n, causal, window)
        assert torch.equal(got.expand(2, 3, m, 1), want.expand(2, 3, m, 1))


def edit_of(b, h, n, m, seed=4):
    g = torch.Generator().manual_seed(seed)
    abs_coef = torch.zeros(b, 1, n)
    abs_coef[..., 2:7] = 0.7
    mul_coef = (torch.rand(1, h, n, generator=g) - 0.5) * 0.3
    rows_from = torch.tensor([n - 1, n - m + 2][:b])
    return kernels.ScoreEdit(abs_coef=abs_coef, mul_coef=mul_coef, rows_from=rows_from)


def edit_reference(q, k, v, edit, key_bias=None, causal=True):
    """The official PAI/PAINT edit, written out: eager scores, ``s + a|s| + m s`` on rows at or after the start."""
    b, h, m, _ = q.shape
    n = k.shape[2]
    groups = h // k.shape[1]
    s = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
    delta = edit.abs_coef[..., None, :] * s.abs() + edit.mul_coef[..., None, :] * s
    rows = torch.arange(m) + n - m
    on = rows[None, :] >= edit.rows_from[:, None]
    s = s + torch.where(on[:, None, :, None], delta, torch.zeros(()))
    if key_bias is not None:
        s = s + key_bias[..., None, :]
    if causal:
        s = s.masked_fill(~(torch.arange(n)[None, :] <= rows[:, None]), -math.inf)
    return s.softmax(-1) @ v.repeat_interleave(groups, 1)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
@pytest.mark.parametrize("m, n", [(9, 9), (1, 12), (4, 11)])
def test_score_edit_matches_the_official_rule(backend, m, n):
    q, k, v = inputs((2, 4, 2, m, n, 16))
    edit = edit_of(2, 4, n, m)
    bias = bias_of("B1N", 2, 4, n)
    bias[..., :2] = 0.0
    got = kernels.attention(q, k, v, key_bias=bias, causal=True, edit=edit, backend=backend)
    torch.testing.assert_close(got, edit_reference(q, k, v, edit, bias), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("m, n", [(9, 9), (4, 11)])
def test_score_edit_without_a_causal_edge(m, n, window):
    """Non-causal calls: the rows before the first edited one still see every key (and the window's)."""
    q, k, v = inputs((2, 4, 2, m, n, 16))
    edit = edit_of(2, 4, n, m)
    bias = bias_of("B1N", 2, 4, n)
    bias[..., :2] = 0.0
    want = kernels.attention(q, k, v, key_bias=bias, window=window, edit=edit, backend="eager")
    torch.testing.assert_close(kernels.attention(q, k, v, key_bias=bias, window=window, edit=edit, backend="sdpa"),
                               want, atol=1e-5, rtol=0)


def test_score_edit_only_touches_rows_from_the_start():
    q, k, v = inputs((2, 4, 2, 9, 9, 16))
    edit = edit_of(2, 4, 9, 9)
    plain = kernels.attention(q, k, v, causal=True, backend="sdpa")
    edited = kernels.attention(q, k, v, causal=True, backend="sdpa", edit=edit)
    torch.testing.assert_close(edited[0, :, :8], plain[0, :, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(edited[1, :, :2], plain[1, :, :2], atol=1e-6, rtol=0)
    assert (edited[0, :, 8] - plain[0, :, 8]).abs().max() > 1e-4 and (edited[1, :, 2] - plain[1, :, 2]).abs().max() > 1e-4


@pytest.mark.parametrize("shape, causal, bias_shape, use_mask", [
    ((3, 4, 4, 9, 9, 16), False, None, False),          # DiT-like: M == N, no GQA
    ((3, 4, 2, 7, 11, 16), True, (3, 1, 11), False),    # GQA, bottom-right causal, padding-like bias
    ((3, 4, 4, 9, 9, 16), False, (3, 4, 9), True),      # per-head bias and a dense per-head mask
])
def test_blend_skips_identity_heads(monkeypatch, shape, causal, bias_shape, use_mask):
    """u = 1 heads give exactly their own values and SDPA never computes them; the rest equals the reference."""
    b, h, h_kv, m, n, d = shape
    q, k, v = inputs(shape)
    g = torch.Generator().manual_seed(1)
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g)
    mask = torch.rand(b, h, m, n, generator=g) > 0.3 if use_mask else None
    if mask is not None:
        mask[..., -1] = True
    u = torch.zeros(b, h)
    u[1, [0, 2]] = 1.0       # a row with some u = 1 heads (SoftPAG)
    u[1, 3] = 0.25
    u[2] = 1.0               # a row with every head at u = 1 (layer-level PAG's perturbed row)
    computed = []
    sdpa = F.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        computed.append(query.numel() // (m * d))  # (batch, query head) pairs, GQA-packed rows included
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    got = kernels.attention(q, k, v, key_bias=bias, mask=mask, causal=causal, blend=u, backend="sdpa")
    monkeypatch.undo()
    want = kernels.attention(q, k, v, key_bias=bias, mask=mask, causal=causal, blend=u, backend="eager")
    own = v.repeat_interleave(h // h_kv, 1)[:, :, n - m:]
    identity = u == 1
    assert torch.equal(got[identity], own[identity])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert sum(computed) == int((~identity).sum())  # 4 + 2 of 12 (batch, head) pairs: none with u = 1


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("pattern", ["skip heads", "skip rows", "blend only", "none"])
def test_a_host_blend_beside_device_inputs_reads_nothing_back(backend, pattern):
    """A blend on the host beside inputs on another device (``meta`` here, which raises on any read back, as a
    sync on CUDA, and on any tensor left on the host) is read where it lies: which heads are skipped or blended costs
    no device read (SoftPAG hands its weights over so)."""
    u = {"skip heads": [[0, 1, 0.5, 1], [0, 0, 0, 0]], "skip rows": [[1, 1, 1, 1], [0, 0.5, 0, 0]],
         "blend only": [[0, 0.5, 0.25, 0], [0, 0, 0, 0]], "none": [[0, 0, 0, 0], [0, 0, 0, 0]]}[pattern]
    q, k, v = (t.to("meta") for t in inputs((2, 4, 2, 6, 6, 16)))
    out = kernels.attention(q, k, v, key_bias=torch.zeros(2, 1, 6, device="meta"), blend=torch.tensor(u),
                            backend=backend)
    assert out.shape == q.shape and out.device.type == "meta"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])  # FlexAttention has no backward on CPU (torch's own error)
def test_a_row_that_sees_no_key_has_finite_gradients(backend):
    """A pad query of a left-padded batch sees no key: its output is 0 and its LSE -inf, and its gradient is 0 (not
    the NaN of ``torch.logsumexp``'s backward, which would reach every parameter under training); the other rows'
    gradients equal those computed without the dead row."""
    q, k, v = (t.requires_grad_() for t in inputs((1, 4, 2, 6, 9, 16)))
    bias = torch.zeros(1, 1, 9)
    bias[..., :4] = -float("inf")  # causal, M=6 < N=9: query 0 sees keys 0..3 only
    out, lse = kernels.attention(q, k, v, key_bias=bias, causal=True, return_lse=True, backend=backend)
    assert torch.isneginf(lse[..., 0]).all() and not out[:, :, 0].any()
    loss = out.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads) and not grads[0][:, :, 0].any()
    live = kernels.attention(q[:, :, 1:], k, v, key_bias=bias, causal=True, return_lse=True, backend="eager")
    want = torch.autograd.grad(live[0].square().sum() + live[1].sum(), (q, k, v))
    torch.testing.assert_close(grads[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1], want[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[2], want[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "eager"])
def test_blend_gradients_equal_the_references(backend):
    """SoftPAG weights that require grad (u = 0, 1 and between): the backends with a backward give eager's gradients,
    d/du of a u = 1 head included (its identity shortcut is skipped), and never fail on an in-place write."""
    q, k, v = (t.requires_grad_() for t in inputs((1, 4, 2, 6, 6, 16)))
    u = torch.tensor([0.0, 1.0, 0.5, 0.0], requires_grad=True)
    out = kernels.attention(q, k, v, blend=u, causal=True, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, u))
    reference = kernels.attention(q, k, v, causal=True, backend="eager")
    want_out = torch.lerp(reference.float(), v.repeat_interleave(2, 1).float(), u[None, :, None, None])
    want = torch.autograd.grad(want_out.square().sum(), (q, k, v, u))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_score_edit_coefficients_that_require_grad_never_meet_triton():
    q, k, v = inputs((1, 4, 2, 6, 9, 16))
    coef = torch.full((1, 4, 9), 0.3, requires_grad=True)
    edit = kernels.ScoreEdit(abs_coef=coef)
    with pytest.raises(ValueError, match="forward-only"):
        kernels.attention(q, k, v, edit=edit, backend="triton")
    with kernels.use_backend("triton"):
        out = kernels.attention(q, k, v, edit=edit, causal=True)
    got = torch.autograd.grad(out.square().sum(), coef)[0]
    want = torch.autograd.grad(kernels.attention(q, k, v, edit=edit, causal=True, backend="eager").square().sum(),
                               coef)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_half_precision_biases_and_biases_past_the_half_range(backend, return_lse):
    """An fp16 key bias runs on every backend (the cap was computed in fp16 and overflowed: "value cannot be
    converted to type c10::Half"); a finite bias below fp16's range (-7e4, uniform: the softmax is unchanged) is no
    -inf on the SDPA path, which zeroed the rows while the LSE stayed finite."""
    q, k, v = inputs((1, 2, 2, 4, 6, 16), dtype=torch.float16)
    plain = kernels.attention(q, k, v, backend="eager")
    for bias in (torch.zeros(1, 1, 6, dtype=torch.float16, device=q.device), torch.full((6,), -7e4, device=q.device)):
        out = kernels.attention(q, k, v, key_bias=bias, backend=backend, return_lse=return_lse)
        out, lse = out if return_lse else (out, None)
        # (-7e4 + a logit in fp32, as the reference adds them, keeps the logit to 0.008)
        torch.testing.assert_close(out.float(), plain.float(), atol=1e-2, rtol=0)
        if lse is not None:
            assert torch.isfinite(lse).all() and (lse < -6e4).all() == bool(bias.min() < -1e4)


def test_huge_finite_negative_logits_are_normalised():
    """A row whose keys all carry a float mask's ``finfo.min`` (or -1e9): the reference normalises it by its own sum,
    as SDPA does (was: every weight exp(0) = 1, since the LSE rounds to the logits)."""
    q, k, v = inputs((1, 2, 2, 5, 20, 16))
    for value in (torch.finfo(torch.float32).min, -1e9):
        bias = torch.zeros(1, 2, 20)
        bias[0, 0] = value
        eager = kernels.attention(q, k, v, key_bias=bias, backend="eager")
        torch.testing.assert_close(eager, kernels.attention(q, k, v, key_bias=bias, backend="sdpa"), atol=1e-5,
                                   rtol=0)
        rows = kernels.attention_rows(q, k, key_bias=bias, backend="torch")
        torch.testing.assert_close(rows.sum(-1), torch.ones(1, 2, 5), atol=1e-5, rtol=0)


def test_inputs_outside_the_signature_are_refused():
    q, k, v = inputs((1, 2, 2, 4, 6, 16))
    with pytest.raises(ValueError, match=r"do not fit q .*\(B, H_kv, N, D\) with the D of q"):
        kernels.attention(q, k, v[..., :8])
    with pytest.raises(ValueError, match="key_bias is a logit bias"):
        kernels.attention(q, k, v, key_bias=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_bias \(\) does not broadcast"):
        kernels.attention(q, k, v, key_bias=torch.tensor(1.0))


def test_a_one_column_bias_on_a_window_past_the_first_keys():
    """A (B, H, 1) bias (one value for every key) on the blocked sliding-window path, whose blocks start past key 0."""
    q, k, v = inputs((1, 2, 2, 300, 300, 16))
    bias = torch.randn(1, 2, 1)
    got = kernels.attention(q, k, v, key_bias=bias, causal=True, window=40, backend="sdpa")
    want = kernels.attention(q, k, v, causal=True, window=40, backend="eager")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="blend needs every query to have its own key"):
        kernels.attention(q, k[:, :, :10], v[:, :, :10], blend=torch.ones(2), backend="sdpa")


def test_dropout_drops_the_weights_as_eager_attention_does():
    """``dropout`` (training): the same seed gives ``F.dropout`` of the reference's weights, on ``auto`` (which runs
    the reference) and in the set rescale; a backend without it, or a p outside [0, 1), raises."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    bias = torch.randn(2, 4, 5, generator=g)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5 + bias[:, :, None, :]
    torch.manual_seed(3)
    expected = F.dropout(logits.softmax(-1), p=0.4) @ v.repeat_interleave(2, 1)
    torch.manual_seed(3)
    got = kernels.attention(q, k, v, key_bias=bias, dropout=0.4)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    key_set = torch.zeros(5, dtype=torch.bool)
    key_set[0] = True
    torch.manual_seed(3)
    kept, _ = kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=1.0, key_bias=bias, dropout=0.4)
    torch.testing.assert_close(kept, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="backend='sdpa' does not apply dropout"):
        kernels.attention(q, k, v, dropout=0.4, backend="sdpa")
    with pytest.raises(ValueError, match="backend='sdpa' does not apply dropout"):
        kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=0.5, dropout=0.4, backend="sdpa")
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
        kernels.attention(q, k, v, dropout=1.0)


@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e38), (torch.float16, 2e4), (torch.float16, 1e38)])
@pytest.mark.parametrize("m, n, causal", [(4, 4, True), (1, 6, True), (3, 7, True), (5, 5, False)])
def test_a_huge_finite_positive_bias_takes_the_row_on_every_backend(dtype, big, m, n, causal):
    """A finite bias beyond what the dtype's mask (or a folded bias / scale) can hold: SDPA gave NaN rows (the cast
    made it +inf); capped, the key still takes every row that sees it, as in the fp32 reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, rows, 16, generator=g) for rows in (m, n, n))
    bias = torch.zeros(1, 2, n)
    bias[..., 1] = big
    expected = kernels.attention(q, k, v, key_bias=bias, causal=causal, backend="eager")
    for backend in ("sdpa", "eager", "auto"):  # flex adds the bias in fp32 (and compiles per shape: slow here)
        got = kernels.attention(q.to(dtype), k.to(dtype), v.to(dtype), key_bias=bias, causal=causal, backend=backend)
        torch.testing.assert_close(got.float(), expected, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)
