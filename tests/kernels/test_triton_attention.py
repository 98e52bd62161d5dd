"""The Triton attention kernel against its PyTorch reference (CPU: under TRITON_INTERPRET=1, set in conftest).

Skipped only where triton is not installed; where it is, the kernel must be runnable (CUDA or the interpreter),
else the tests fail. Inputs are slices of NaN-filled buffers, so a read outside a tensor shows up as NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from nograd import kernels  # noqa: E402
from checks import DEVICE, guarded, inputs  # noqa: E402
from nograd.kernels import triton_attention  # noqa: E402

# (B, H, H_kv, M, N, D): spec kernels.md §3.4 (non-multiples of the blocks, M=1, M<N, M>N, GQA, D not a power of 2)
SHAPES = [(1, 2, 2, 32, 32, 64), (2, 4, 2, 37, 37, 64), (1, 3, 1, 45, 100, 40), (1, 2, 2, 17, 83, 64),
          (1, 2, 2, 1, 67, 64), (2, 2, 2, 100, 100, 128), (2, 2, 1, 7, 3, 16)]


def test_kernel_is_runnable_here():
    assert triton_attention.available(DEVICE), "triton is installed: the kernel must run (CUDA or TRITON_INTERPRET=1)"


def bias_of(kind, b, h, n):
    shape = {"BHN": (b, h, n), "B1N": (b, 1, n), "1HN": (1, h, n)}[kind]
    bias = guarded(shape, seed=7)
    bias[..., ::3] = -math.inf
    return bias


def reference(q, k, v, **kwargs):
    return kernels.attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), backend="eager", return_lse=True,
                             **{key: (val.cpu() if torch.is_tensor(val) else val) for key, val in kwargs.items()})


def close(got, want, atol):
    got = got.float().cpu()
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_kind", [None, "BHN", "B1N", "1HN"])
def test_matches_reference_fp32(shape, causal, bias_kind):
    q, k, v = inputs(shape)
    b, h, _, _, n, _ = shape
    bias = None if bias_kind is None else bias_of(bias_kind, b, h, n)
    out, lse = kernels.attention(q, k, v, key_bias=bias, causal=causal, backend="triton", return_lse=True)
    want, want_lse = reference(q, k, v, key_bias=bias, causal=causal)
    close(out, want, 1e-5)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.cpu()[finite], want_lse[finite], atol=1e-5, rtol=0)


def test_fully_masked_rows():
    q, k, v = inputs((2, 2, 1, 5, 6, 16))
    bias = torch.zeros(2, 1, 6, device=DEVICE)
    bias[1] = -math.inf
    out, lse = kernels.attention(q, k, v, key_bias=bias, backend="triton", return_lse=True)
    assert torch.equal(out[1].cpu(), torch.zeros(2, 5, 16)) and torch.isneginf(lse[1]).all()
    out, lse = kernels.attention(q, k[:, :, :2], v[:, :, :2], causal=True, backend="triton", return_lse=True)
    assert torch.equal(out[:, :, :3].cpu(), torch.zeros(2, 2, 3, 16)) and torch.isneginf(lse[:, :, :3]).all()


@pytest.mark.parametrize("bias", [[torch.finfo(torch.float32).min] * 4, [0.0, 0.0, 3e38, 0.0]])
def test_biases_near_the_fp32_range_match_the_torch_path(bias):
    """The kernels scale the bias by log2(e): an HF-style finfo.min on every key became -inf (a row of zeros, where
    eager gives a softmax) and +3e38 became +inf (NaN). They take it within the torch path's limits now."""
    q, k, v = inputs((1, 1, 1, 2, 4, 16))
    bias = torch.tensor(bias, device=q.device)
    out, lse = kernels.attention(q, k, v, key_bias=bias, return_lse=True, backend="triton")
    expected, expected_lse = reference(q, k, v, key_bias=bias)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.cpu(), expected_lse, rtol=1e-6, atol=0)


def test_hf_strided_layout():
    """(B, S, H, D) storage viewed as (B, H, S, D): taken without a copy."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs((2, 4, 2, 9, 9, 16)))
    bias = bias_of("BHN", 2, 4, 9)
    close(kernels.attention(q, k, v, key_bias=bias, causal=True, backend="triton"),
          reference(q, k, v, key_bias=bias, causal=True)[0], 1e-5)


@pytest.mark.parametrize("m, n", [(20, 20), (6, 20), (1, 20)])
def test_sliding_window(m, n):
    q, k, v = inputs((1, 2, 2, m, n, 32))
    close(kernels.attention(q, k, v, causal=True, window=5, backend="triton"),
          reference(q, k, v, causal=True, window=5)[0], 1e-5)


def test_blend():
    q, k, v = inputs((2, 4, 2, 7, 9, 16))
    plain = kernels.attention(q, k, v, causal=True, backend="triton")
    assert torch.equal(kernels.attention(q, k, v, causal=True, backend="triton", blend=torch.zeros(4, device=DEVICE)),
                       plain)
    ones = kernels.attention(q, k, v, causal=True, backend="triton", blend=torch.ones(2, 4, device=DEVICE))
    assert torch.equal(ones, v.repeat_interleave(2, 1)[:, :, 2:])
    u = torch.rand(2, 4, device=DEVICE)
    close(kernels.attention(q, k, v, causal=True, backend="triton", blend=u),
          torch.lerp(plain, v.repeat_interleave(2, 1)[:, :, 2:], u[..., None, None]).float().cpu(), 1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_blend_identity_heads_read_no_keys(causal):
    """A head with u = 1 reads no key tile: NaN keys of that head leave its output exactly its own values."""
    q, k, v = inputs((2, 3, 3, 21, 21, 16))
    k = k.clone()
    k[1, 0] = float("nan")
    u = torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.0, 0.7]], device=DEVICE)
    got = kernels.attention(q, k, v, causal=causal, backend="triton", blend=u)
    assert torch.equal(got[1, 0], v[1, 0]) and torch.equal(got[0, 2], v[0, 2])
    k[1, 0] = 0.0
    close(got, kernels.attention(q, k, v, causal=causal, backend="eager", blend=u).float().cpu(), 1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, atol):
    """bf16 goes through the kernel's upcast-before-dot switch in the interpreter (spec kernels.md §7)."""
    q, k, v = inputs((1, 4, 2, 33, 33, 32), dtype)
    bias = bias_of("B1N", 1, 4, 33)
    out = kernels.attention(q, k, v, key_bias=bias, causal=True, backend="triton")
    assert out.dtype == dtype
    close(out, reference(q, k, v, key_bias=bias, causal=True)[0], atol)


def test_backends_agree_on_the_same_inputs():
    q, k, v = inputs((2, 4, 2, 21, 21, 32))
    bias = bias_of("BHN", 2, 4, 21)
    outs = {b: kernels.attention(q, k, v, key_bias=bias, causal=True, backend=b).float().cpu()
            for b in ("triton", "sdpa", "eager")}
    for name in ("triton", "sdpa"):
        torch.testing.assert_close(outs[name], outs["eager"], atol=1e-5, rtol=0)


def test_no_quadratic_allocation():
    """Peak-memory accounting: the kernel allocates the output and the LSE, nothing of size M x N."""
    from torch.profiler import ProfilerActivity, profile

    m = n = 256
    q, k, v = (x.contiguous() for x in inputs((1, 2, 2, m, n, 64)))
    bias = torch.randn(1, 1, n, device=DEVICE)
    activity = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity], profile_memory=True) as prof:
        kernels.attention(q, k, v, key_bias=bias, causal=True, backend="triton", return_lse=True)
    usage = [max(e.cpu_memory_usage, e.device_memory_usage) for e in prof.events()]
    allocated = sum(u for u in usage if u > 0)
    output_and_lse = q.numel() * 4 + 2 * m * 4
    assert allocated <= output_and_lse + 4096, allocated
    assert allocated < 2 * m * n * 4


def test_triton_rejects_what_it_does_not_do():
    q, k, v = inputs((1, 2, 2, 4, 4, 16))
    with pytest.raises(ValueError, match="softcap"):
        kernels.attention(q, k, v, softcap=3.0, backend="triton")
    with pytest.raises(ValueError, match="mask"):
        kernels.attention(q, k, v, mask=torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE), backend="triton")


@pytest.mark.parametrize("m, n", [(9, 9), (1, 40), (37, 45)])
def test_score_edit(m, n):
    q, k, v = inputs((2, 4, 2, m, n, 32))
    abs_coef = torch.zeros(2, 1, n, device=DEVICE)
    abs_coef[..., 3:20] = 0.7
    mul_coef = torch.linspace(-0.2, 0.2, n, device=DEVICE).expand(1, 4, n)
    edit = kernels.ScoreEdit(abs_coef=abs_coef, mul_coef=mul_coef,
                             rows_from=torch.tensor([n - 1, n - m + m // 2], device=DEVICE))
    bias = bias_of("B1N", 2, 4, n)
    out, lse = kernels.attention(q, k, v, key_bias=bias, causal=True, edit=edit, backend="triton", return_lse=True)
    cpu_edit = kernels.ScoreEdit(abs_coef=abs_coef.cpu(), mul_coef=mul_coef.cpu(), rows_from=edit.rows_from.cpu())
    want, want_lse = reference(q, k, v, key_bias=bias, causal=True, edit=cpu_edit)
    close(out, want, 1e-5)
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.cpu()[finite], want_lse[finite], atol=1e-5, rtol=0)
