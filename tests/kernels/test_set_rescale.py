"""``attention_rescaled_set`` (ACT's row-wise set calibration): the two LSE passes that never hold the matrix equal
the reference that reweights it once (``rescaled_set_eager``), and the reference equals the calibration written out
on explicit weights. The two-pass path runs on the Triton backend (CPU: under ``TRITON_INTERPRET=1``, set in
conftest)."""

from __future__ import annotations

import importlib

import pytest
import torch

from nograd import kernels

set_rescale = importlib.import_module("nograd.kernels.set_rescale")
triton_attention = importlib.import_module("nograd.kernels.triton_attention")

CASES = [  # (B, H, H_kv, M, N, D), attention kwargs
    ((2, 4, 2, 9, 9, 16), dict(causal=True)),
    ((1, 4, 1, 1, 23, 16), dict(causal=True)),
    ((2, 2, 2, 5, 12, 16), dict(causal=True, window=4)),
    ((1, 4, 4, 7, 7, 32), dict()),
    ((1, 2, 1, 600, 600, 16), dict(causal=True)),  # three blocks of query rows
    ((1, 2, 2, 300, 700, 16), dict(causal=True, window=50)),  # a chunk over a longer cache
    ((1, 2, 2, 520, 520, 16), dict()),
    ((1, 2, 2, 300, 300, 16), dict(window=32)),  # a window without the causal edge (a sliding layer's float mask)
]


def case(shape, seed=0):
    b, h, h_kv, m, n, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g) for s in ((b, h, m, d), (b, h_kv, n, d), (b, h_kv, n, d)))
    key_set = torch.zeros(b, h, n, dtype=torch.bool)
    key_set[..., 1] = True
    key_set[0, 0, 3] = True
    bias = torch.zeros(b, 1, n)
    bias[-1, :, 0] = -float("inf")  # a padded key in the last row
    return q, k, v, key_set, bias


@pytest.mark.parametrize("shape, kwargs", CASES)
def test_reference_equals_the_calibration_on_explicit_weights(shape, kwargs):
    q, k, v, key_set, bias = case(shape)
    factor = 0.4
    got, mass = set_rescale.rescaled_set_eager(q, k, v, key_set=key_set, factor=factor, key_bias=bias, **kwargs)
    logits = kernels.scaled_logits(q, k, key_bias=bias, **kwargs)
    weights = torch.softmax(logits, dim=-1).nan_to_num()  # a row that sees no key: all 0
    on = key_set[..., None, :]
    m = (weights * on).sum(-1, keepdim=True)
    calibrated = torch.where(on, factor * weights, weights * (1 - factor * m) / (1 - m))
    calibrated = torch.where(m < 1, calibrated, weights)  # all of a row's mass on the set: left as it is
    groups = q.shape[1] // k.shape[1]
    want = calibrated @ v.repeat_interleave(groups, dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(mass, m[..., 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, kwargs", CASES)
def test_two_lse_passes_equal_the_reference(shape, kwargs):
    if not triton_attention.available(torch.device("cpu")):
        pytest.skip("triton is not installed (the two-pass path needs a backend that returns the LSE)")
    q, k, v, key_set, bias = case(shape, seed=1)
    want, want_mass = set_rescale.rescaled_set_eager(q, k, v, key_set=key_set, factor=0.4, key_bias=bias, **kwargs)
    got, mass = kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=0.4, key_bias=bias,
                                               backend="triton", **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(mass, want_mass, atol=1e-5, rtol=0)
    auto, _ = kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=0.4, key_bias=bias, **kwargs)
    assert torch.equal(auto, want)  # CPU: auto takes the reference (the LSE needs the matrix there anyway)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_a_row_that_sees_no_key_has_finite_gradients(backend):
    """ACT under training on a left-padded batch: a pad query sees no key; its gradient is 0, never NaN."""
    q, k, v, key_set, _ = case((1, 4, 2, 6, 9, 16))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    bias = torch.zeros(1, 1, 9)
    bias[..., :4] = -float("inf")  # causal, M=6 < N=9: query 0 sees keys 0..3 only
    out, mass = kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=0.4, key_bias=bias, causal=True,
                                               backend=backend)
    assert not out[:, :, 0].any() and not mass[:, :, 0].any()
    grads = torch.autograd.grad(out.square().sum() + mass.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads) and not grads[0][:, :, 0].any()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
def test_a_row_that_sees_only_the_set_is_unchanged(backend):
    """Causal rows whose visible keys are all in the set have nothing to give their mass to: they keep their
    attention exactly, whatever the rounding of their mass on the set (was: the eager path scaled them by factor)."""
    if backend == "triton" and not triton_attention.available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    q, k, v, _, _ = case((1, 4, 2, 9, 9, 16), seed=2)
    key_set = torch.zeros(1, 4, 9, dtype=torch.bool)
    key_set[..., :3] = True  # rows 0..2 see only set keys
    out, mass = kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=0.5, causal=True, backend=backend)
    plain = kernels.attention(q, k, v, causal=True, backend="eager")
    torch.testing.assert_close(out[:, :, :3], plain[:, :, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(mass[:, :, :3], torch.ones(1, 4, 3), atol=1e-6, rtol=0)
    assert (out[:, :, 3:] - plain[:, :, 3:]).abs().max() > 1e-3


def test_the_reference_never_holds_the_matrix():
    """CPU (the reference is ACT's path there): one block of query rows at a time, so the call's peak memory stays
    below the (B, H, M, N) fp32 matrix it used to build several times."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, key_set, bias = case((1, 2, 1, 2048, 2048, 16))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got, _ = kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=0.4, key_bias=bias, causal=True)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    in_use = peak = 0
    for event in events:
        in_use += event.self_cpu_memory_usage
        peak = max(peak, in_use)
    assert 0 < peak < 2 * 2048 * 2048 * 4, peak
    rows = slice(-64, None)  # the last rows, written out on their own
    want, _ = set_rescale.rescaled_set_eager(q[:, :, rows], k, v, key_set=key_set, factor=0.4, key_bias=bias,
                                             causal=True)
    torch.testing.assert_close(got[:, :, rows], want, atol=1e-5, rtol=0)



@pytest.mark.parametrize("options, match", [(dict(dropout=1.5), r"dropout must be a probability in \[0, 1\)"),
                                            (dict(dropout=0.1, backend="sdpa"), "does not apply dropout"),
                                            (dict(backend="cuda"), "is not one of")])
def test_bad_arguments_are_refused_as_by_attention(options, match):
    """The eager path took any dropout (a p of 1.5 reached F.dropout's own error)."""
    q, k, v, key_set, bias = case((1, 2, 1, 5, 5, 16))
    with pytest.raises(ValueError, match=match):
        kernels.attention_rescaled_set(q, k, v, key_set=key_set, factor=0.4, key_bias=bias, **options)
