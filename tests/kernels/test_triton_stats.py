"""Triton attention statistics (rows, per-key mass, LSE-normalised blocks) against the PyTorch references."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from nograd import kernels  # noqa: E402
from checks import DEVICE, guarded, inputs  # noqa: E402

SHAPES = [(2, 4, 2, 37, 45, 32), (1, 3, 1, 45, 45, 40), (1, 2, 2, 1, 67, 64), (1, 2, 2, 70, 70, 16)]


def with_bias(shape):
    b, h, _, _, n, _ = shape
    bias = guarded((b, 1, n), seed=5)
    bias[..., ::5] = -math.inf
    return bias


def cpu(x):
    return x.float().cpu() if torch.is_tensor(x) else x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_key_mass(shape, causal, reduce):
    q, k, _ = inputs(shape)
    bias = with_bias(shape)
    got = kernels.key_attention_mass(q, k, key_bias=bias, causal=causal, reduce=reduce, backend="triton")
    want = kernels.key_attention_mass(cpu(q), cpu(k), key_bias=cpu(bias), causal=causal, reduce=reduce,
                                      backend="torch")
    torch.testing.assert_close(cpu(got), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_key_mass_with_valid_queries(reduce):
    shape = (2, 4, 2, 37, 45, 32)
    q, k, _ = inputs(shape)
    valid = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    valid[0, 30:], valid[1, :5] = False, False
    got = kernels.key_attention_mass(q, k, causal=True, query_valid=valid, reduce=reduce, backend="triton")
    want = kernels.key_attention_mass(cpu(q), cpu(k), causal=True, query_valid=valid.cpu(), reduce=reduce,
                                      backend="torch")
    torch.testing.assert_close(cpu(got), want, atol=2e-5, rtol=0)
    assert not torch.equal(want, kernels.key_attention_mass(cpu(q), cpu(k), causal=True, reduce=reduce))


def test_key_mass_uses_the_given_lse_and_finds_a_planted_sink():
    q, k, v = inputs((1, 2, 2, 40, 40, 32))
    bias = torch.zeros(1, 2, 40, device=DEVICE)
    bias[0, 1, 7] = 30.0
    _, lse = kernels.attention(q, k, v, key_bias=bias, causal=True, backend="triton", return_lse=True)
    mean = kernels.key_attention_mass(q, k, lse, key_bias=bias, causal=True, reduce="mean", backend="triton")
    assert int(mean[0, 1].argmax()) == 7 and mean[0, 1, 7] > 0.99


@pytest.mark.parametrize("window", [None, 6])
def test_rows_with_positions(window):
    q, k, _ = inputs((2, 4, 2, 37, 45, 32))
    bias = with_bias((2, 4, 2, 37, 45, 32))
    rows = torch.tensor([0, 5, 36])
    positions = rows + 8
    got = kernels.attention_rows(q[:, :, rows], k, positions=positions, key_bias=bias, window=window, backend="triton")
    want = kernels.attention_rows(cpu(q[:, :, rows]), cpu(k), positions=positions, key_bias=cpu(bias), window=window,
                                  backend="torch")
    torch.testing.assert_close(cpu(got), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(cpu(got).sum(-1), torch.ones(2, 4, 3), atol=1e-5, rtol=0)


def test_image_to_text_block_of_joint_attention():
    """MM-DiT joint attention [text | image]: image queries over text keys, normalised over the whole joint row."""
    text, image = 7, 24
    q, k, v = inputs((1, 4, 4, text + image, text + image, 32))
    _, lse = kernels.attention(q, k, v, backend="triton", return_lse=True)
    keys = slice(0, text)
    got = kernels.attention_block(q[:, :, text:], k, lse[:, :, text:], keys=keys, backend="triton")
    full = kernels.scaled_logits(cpu(q), cpu(k)).softmax(-1)
    torch.testing.assert_close(cpu(got), full[:, :, text:, :text], atol=1e-6, rtol=0)
    torch.testing.assert_close(kernels.attention_block(cpu(q[:, :, text:]), cpu(k), cpu(lse[:, :, text:]), keys=keys,
                                                       backend="torch"), full[:, :, text:, :text], atol=1e-6, rtol=0)


def test_stats_backend_errors():
    q, k, _ = inputs((1, 2, 2, 4, 4, 16))
    with pytest.raises(ValueError, match="backend"):
        kernels.key_attention_mass(q, k, backend="cuda")
    with pytest.raises(ValueError, match="dense mask"):
        kernels.key_attention_mass(q, k, mask=torch.ones(1, 1, 4, 4, dtype=torch.bool), backend="triton")


@pytest.mark.parametrize("keys", [slice(-10, None), slice(None, -5), slice(30, 100), slice(12, 4)])
def test_block_keys_are_a_python_slice(keys):
    """Negative and open ends, and a stop past N, select what ``k[:, :, keys]`` does; a step is refused."""
    q, k, v = inputs((1, 2, 2, 6, 40, 16))
    _, lse = kernels.attention(q, k, v, backend="triton", return_lse=True)
    got = kernels.attention_block(q, k, lse, keys=keys, backend="triton")
    want = kernels.attention_block(cpu(q), cpu(k), cpu(lse), keys=keys, backend="torch")
    assert got.shape == want.shape == (1, 2, 6, len(range(40)[keys]))
    torch.testing.assert_close(cpu(got), want, atol=1e-6, rtol=0)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="contiguous span"):
            kernels.attention_block(q, k, lse, keys=slice(0, 40, 2), backend=backend)


def test_a_strided_lse_is_read_by_its_strides():
    """An LSE that is a (B, H, M) view of a (B, M, H) buffer gives the masses of its values."""
    q, k, v = inputs((1, 4, 2, 20, 20, 16))
    _, lse = kernels.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2)
    assert strided.stride(2) != 1
    for stats in (lambda x: kernels.key_attention_mass(q, k, x, causal=True, backend="triton"),
                  lambda x: kernels.attention_block(q, k, x, keys=slice(0, 7), backend="triton")):
        torch.testing.assert_close(stats(strided), stats(lse), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("call, words", [
    (lambda q, k, lse, be: kernels.attention_rows(q, k[..., :8], backend=be), "do not fit q"),  # another head dim
    (lambda q, k, lse, be: kernels.attention_rows(q, k.repeat(1, 2, 1, 1), backend=be),
     r"multiple of key/value heads \(4\)"),
    (lambda q, k, lse, be: kernels.attention_rows(q, k, positions=torch.tensor([5]), backend=be),
     r"positions \(1,\) is not \(R,\)"),
    (lambda q, k, lse, be: kernels.attention_block(q, k, lse[..., 0], keys=slice(0, 3), backend=be),
     r"lse \(1, 6\) is not \(B, H, M\)"),
    (lambda q, k, lse, be: kernels.key_attention_mass(q, k, lse[..., 1:], backend=be),
     r"lse \(1, 6, 2\) is not \(B, H, M\)"),
])
def test_statistics_refuse_inputs_outside_the_signature(backend, call, words):
    """The statistics check their inputs as ``attention`` does: the Triton kernels read whatever strides and sizes
    they are given (a head dim that differs, an LSE of other shape: rows summing to 8.5, masses above the query count,
    reads out of bounds on CUDA)."""
    q, k, _ = inputs((1, 6, 2, 3, 9, 16))
    lse = kernels.attention(q, k, k, return_lse=True, backend="eager")[1]
    with pytest.raises(ValueError, match=words):
        call(q, k, lse, backend)


def test_a_block_over_a_bias_broadcast_over_the_keys():
    """``attention_block``'s torch path cut a (B, H, 1) bias (one value for every key) by the key span: a crash, or
    an empty block for a span of one key; the Triton path and the full probabilities agree on it."""
    q, k, _ = inputs((1, 2, 2, 3, 10, 16))
    bias = torch.tensor([[[0.5], [-1.0]]], device=q.device)
    _, lse = kernels.attention(q, k, k, key_bias=bias, return_lse=True, backend="eager")
    full = kernels.attention_block(q, k, lse, keys=slice(0, 10), key_bias=bias, backend="torch")
    for keys in (slice(8, 10), slice(9, 10)):
        for backend in ("torch", "triton"):
            block = kernels.attention_block(q, k, lse, keys=keys, key_bias=bias, backend=backend)
            torch.testing.assert_close(block.cpu(), full[..., keys].cpu(), atol=1e-6, rtol=0)


def test_rows_with_a_window_need_positions():
    q, k, _ = inputs((1, 2, 2, 3, 10, 16))
    with pytest.raises(ValueError, match="window needs positions"):
        kernels.attention_rows(q, k, window=4)

