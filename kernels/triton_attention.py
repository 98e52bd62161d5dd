"""Fused attention forward in Triton: key bias, GQA by index, bottom-right causal / sliding window, LSE, SoftPAG.

One program computes ``BLOCK_M`` query rows of one (batch, head) with the FlashAttention-2 online softmax in the
log2 domain (spec ``shared/specs/kernels.md`` §3.3 and §5, the score edit of ``paint.md`` §5.3; the loop structure
of Triton's fused-attention tutorial, rewritten with plain pointer arithmetic since ``tl.make_block_ptr`` is gone in
Triton 3.9). Per key tile it applies the score edit ``s + a|s| + m s`` to the rows at or after ``rows_from``
(homogeneous, so valid on log2-scaled scores), adds ``key_bias * log2(e)`` (broadcast strides, 0 for broadcast
dimensions: the bias is never materialised), masks keys past the bottom-right causal edge or outside the window,
and keeps running max / sum. The epilogue writes the natural-log LSE and applies the SoftPAG blend
``(1 - u) * out + u * v_self``; a head with u = 1 reads no key tile (unless the LSE is asked for) and outputs
``v_self`` exactly; a row that sees no key gives 0 and -inf.

Memory: inputs, the output and the (B, H, M) LSE; nothing of size M x N. The PyTorch reference is
``nograd.kernels.attention(..., backend="eager")``; ``tests/kernels/test_triton_attention.py`` holds them equal under
``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import os

import torch

from .broadcast import per_key
from .identity_skip import per_pair_blend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

LOG2E = 1.4426950408889634
BIAS_LIMIT = torch.finfo(torch.float32).max / 4
"""The largest key bias magnitude the kernels take as is, as the torch path's ``bias_in`` in fp32 (scaled by
log2(e), it leaves room for the scores)."""


def available(device: torch.device | str | None = None) -> bool:
    """True where the Triton kernel can run: CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    if interpreting():
        return True
    return device is not None and torch.device(device).type == "cuda"


def records_grad(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (``None`` ignored). The Triton kernels are forward-only,
    so they are never chosen for such a call: their output would silently carry no gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``tl.dot`` with fp32 inputs computed exactly (no TF32) when ``IEEE``."""
        if IEEE:
            product = tl.dot(a, b, input_precision="ieee")
        else:
            product = tl.dot(a, b)
        return product

    @triton.jit
    def _tile_logits(q, k_base, stride_kn, cols, dims, col_ok, dim_ok, qk_scale, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr):
        """Log2-domain scaled scores (rows, BLOCK_N) of the query tile ``q`` against the key tile ``cols``."""
        k = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        return _dot(q, k, IEEE) * qk_scale

    @triton.jit
    def _tile_scores(q, k_base, stride_kn, cols, dims, col_ok, dim_ok, bias_base, stride_bn, qk_scale,
                     HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """``_tile_logits`` plus the key bias."""
        scores = _tile_logits(q, k_base, stride_kn, cols, dims, col_ok, dim_ok, qk_scale, UPCAST, IEEE)
        if HAS_BIAS:
            bias = tl.load(bias_base + cols * stride_bn, mask=col_ok, other=0.0)
            scores += bias[None, :] * 1.4426950408889634
        return scores

    @triton.jit
    def _attention_forward(
        Q, K, V, Bias, Blend, Out, Lse, EditAbs, EditMul, EditFrom,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_bb, stride_bh, stride_bn,
        stride_ub, stride_uh,
        stride_ob, stride_oh, stride_om,
        stride_lb, stride_lh,
        stride_ab, stride_ah, stride_an,
        stride_mb, stride_mh, stride_mn,
        H, GROUPS, M, N, HEAD_DIM, qk_scale, window,
        HAS_BIAS: tl.constexpr, HAS_BLEND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        RETURN_LSE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        EDIT_ABS: tl.constexpr, EDIT_MUL: tl.constexpr, EDIT_FROM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kv_h = h // GROUPS
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        cols_in_tile = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        dim_ok = dims < HEAD_DIM
        shift = N - M  # bottom-right alignment: query i sits at key position i + N - M

        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + kv_h * stride_kh
        v_base = V + b * stride_vb + kv_h * stride_vh
        bias_base = Bias + b * stride_bb + h * stride_bh

        lo = 0
        hi = N
        if CAUSAL:
            hi = tl.minimum(N, pid_m * BLOCK_M + BLOCK_M + shift)
        if HAS_WINDOW:
            lo = tl.maximum(0, pid_m * BLOCK_M + shift - window + 1)
            lo = (lo // BLOCK_N) * BLOCK_N
        if HAS_BLEND:
            u = tl.load(Blend + b * stride_ub + h * stride_uh)
            if not RETURN_LSE:
                hi = tl.where(u == 1.0, lo, hi)  # a u = 1 head outputs its own value: no key tile is read

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            cols = start + cols_in_tile
            col_ok = cols < N
            scores = _tile_logits(q, k_base, stride_kn, cols, dims, col_ok, dim_ok, qk_scale, UPCAST, IEEE)
            if EDIT_ABS or EDIT_MUL:
                # s + a|s| + m s is homogeneous, so it applies to the log2-scaled scores unchanged
                delta = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                if EDIT_ABS:
                    a = tl.load(EditAbs + b * stride_ab + h * stride_ah + cols * stride_an, mask=col_ok, other=0.0)
                    delta += a[None, :] * tl.abs(scores)
                if EDIT_MUL:
                    mul = tl.load(EditMul + b * stride_mb + h * stride_mh + cols * stride_mn, mask=col_ok, other=0.0)
                    delta += mul[None, :] * scores
                if EDIT_FROM:
                    delta = tl.where((rows + shift >= tl.load(EditFrom + b))[:, None], delta, 0.0)
                scores += delta
            if HAS_BIAS:
                bias = tl.load(bias_base + cols * stride_bn, mask=col_ok, other=0.0)
                scores += bias[None, :] * 1.4426950408889634
            visible = col_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + shift)
            if HAS_WINDOW:
                visible = visible & (cols[None, :] > rows[:, None] + shift - window)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :],
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        if HAS_BLEND:
            self_rows = rows + shift
            v_self = tl.load(v_base + self_rows[:, None] * stride_vn + dims[None, :],
                             mask=row_ok[:, None] & dim_ok[None, :] & (self_rows >= 0)[:, None], other=0.0)
            out = out * (1.0 - u) + u * v_self.to(tl.float32)
        tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        if RETURN_LSE:
            lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(Lse + b * stride_lb + h * stride_lh + rows, lse, mask=row_ok)


def _blocks(m: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): powers of two >= 16 (the 16-bit ``tl.dot`` minimum)."""
    block_m = 16 if m <= 16 else 64 if (m <= 64 or interpreting()) else 128
    block_n = 32 if interpreting() else (64 if d <= 64 else 32 if block_m == 128 else 64)
    return block_m, block_n, 4 if d <= 64 else 8, 2 if interpreting() else 3


def kernel_bias(key_bias: torch.Tensor, b: int, h: int, n: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The key bias as the kernels read it, with its (B, H, N) strides (0 where it broadcasts): fp32, finite values
    within +-``BIAS_LIMIT`` (the kernels scale it by log2(e), which takes a bias near the fp32 range to +-inf: a
    row of HF-style ``finfo.min`` biases became fully masked, a +3e38 one NaN); -inf stays (masked)."""
    bias = key_bias.float()
    return _bias_strides(torch.where(bias == -torch.inf, bias, bias.clamp(-BIAS_LIMIT, BIAS_LIMIT)), b, h, n)


def _bias_strides(values: torch.Tensor, b: int, h: int, n: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Per-key ``values`` as fp32 (B, H, N) by broadcast strides."""
    values = per_key(values.float()).expand(b, h, n)
    return values, values.stride()


def attention_triton(q, k, v, *, key_bias=None, causal=False, scale=None, blend=None, return_lse=False,
                     window=None, edit=None):
    """The Triton forward. Same arguments and results as ``nograd.kernels.attention`` (no ``mask``/``softcap``)."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install nograd[triton])")
    b, h, m, d = q.shape
    n = k.shape[2]
    if d > 256:
        raise ValueError(f"backend='triton' supports head dims up to 256, got {d}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, m), device=q.device, dtype=torch.float32) if return_lse else out
    bias, bias_strides = (kernel_bias(key_bias, b, h, n) if key_bias is not None else (out, (0, 0, 0)))
    edit_abs = edit_mul = edit_from = None
    if edit is not None:
        edit_abs, edit_mul, edit_from = edit.abs_coef, edit.mul_coef, edit.rows_from
    abs_coef, abs_strides = _bias_strides(edit_abs, b, h, n) if edit_abs is not None else (out, (0, 0, 0))
    mul_coef, mul_strides = _bias_strides(edit_mul, b, h, n) if edit_mul is not None else (out, (0, 0, 0))
    rows_from = edit_from.to(device=q.device, dtype=torch.int64).contiguous() if edit_from is not None else out
    if blend is not None:
        u = per_pair_blend(blend.to(q.device), b, h)
        blend_strides = u.stride()
    else:
        u, blend_strides = out, (0, 0)
    block_m, block_n, warps, stages = _blocks(m, d)
    block_d = max(16, triton.next_power_of_2(d))
    scale = d ** -0.5 if scale is None else scale
    upcast = interpreting() and q.dtype == torch.bfloat16
    grid = (triton.cdiv(m, block_m), b * h)
    _attention_forward[grid](
        q, k, v, bias, u, out, lse, abs_coef, mul_coef, rows_from,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *bias_strides, *blend_strides,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        *abs_strides, *mul_strides,
        h, h // k.shape[1], m, n, d, scale * LOG2E, window or 0,
        HAS_BIAS=key_bias is not None, HAS_BLEND=blend is not None, CAUSAL=bool(causal),
        HAS_WINDOW=window is not None, RETURN_LSE=return_lse, UPCAST=upcast, IEEE=q.dtype == torch.float32,
        EDIT_ABS=edit_abs is not None, EDIT_MUL=edit_mul is not None, EDIT_FROM=edit_from is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return (out, lse) if return_lse else out
