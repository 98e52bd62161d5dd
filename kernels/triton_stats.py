"""Attention statistics in Triton, without the (M, N) matrix (spec ``shared/specs/kernels.md`` §4).

- ``_key_mass``: one program per (key tile, batch x head) walks the query tiles that can see it and adds
  ``exp(s - lse_row)``: the attention each key receives (column sums), and how many queries see it (for means).
  The row LSE comes from the forward kernel (``attention_triton(..., return_lse=True)``).
- ``_probabilities``: the softmax rows of a few queries, each with its own causal position: a first pass over the
  keys computes the row LSE (skipped when the caller has it, e.g. the image->text block of MM-DiT joint attention,
  whose LSE is that of the full joint row), a second writes ``exp(s - lse)`` for every key of the requested span.

PyTorch references: ``nograd.kernels.stats``; equality is tested under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from .triton_attention import LOG2E, attention_triton, interpreting, kernel_bias, triton

if triton is not None:
    import triton.language as tl

    from .triton_attention import _dot, _tile_scores

    @triton.jit
    def _key_mass(
        Q, K, Bias, Lse, Mass, Count,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_bb, stride_bh, stride_bn,
        stride_lb, stride_lh,
        H, GROUPS, M, N, HEAD_DIM, qk_scale, window,
        HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        col_ok = cols < N
        dim_ok = dims < HEAD_DIM
        shift = N - M
        k = tl.load(K + b * stride_kb + (h // GROUPS) * stride_kh + cols[None, :] * stride_kn + dims[:, None],
                    mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        bias = tl.zeros([BLOCK_N], tl.float32)
        if HAS_BIAS:
            bias = tl.load(Bias + b * stride_bb + h * stride_bh + cols * stride_bn, mask=col_ok, other=0.0) * 1.4426950408889634
        mass = tl.zeros([BLOCK_N], tl.float32)
        count = tl.zeros([BLOCK_N], tl.float32)
        lo = 0
        if CAUSAL:
            lo = tl.maximum(0, pid_n * BLOCK_N - shift)
            lo = (lo // BLOCK_M) * BLOCK_M
        for start in range(lo, M, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                        mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            scores = _dot(q, k, IEEE) * qk_scale + bias[None, :]
            lse = tl.load(Lse + b * stride_lb + h * stride_lh + rows, mask=row_ok, other=float("-inf"))
            visible = row_ok[:, None] & col_ok[None, :] & (lse > float("-inf"))[:, None] & (scores > float("-inf"))
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + shift)
            if HAS_WINDOW:
                visible = visible & (cols[None, :] > rows[:, None] + shift - window)
            lse2 = tl.where(lse > float("-inf"), lse * 1.4426950408889634, 0.0)
            p = tl.where(visible, tl.exp2(scores - lse2[:, None]), 0.0)
            mass += tl.sum(p, 0)
            count += tl.sum(visible.to(tl.float32), 0)
        tl.store(Mass + pid_bh * N + cols, mass, mask=col_ok)
        tl.store(Count + pid_bh * N + cols, count, mask=col_ok)

    @triton.jit
    def _probabilities(
        Q, K, Bias, Positions, LseIn, Out,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_bb, stride_bh, stride_bn,
        stride_lb, stride_lh,
        stride_ob, stride_oh, stride_om,
        H, GROUPS, R, N, KEY_START, KEY_STOP, HEAD_DIM, qk_scale, window,
        HAS_BIAS: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_LSE: tl.constexpr, HAS_WINDOW: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < R
        dim_ok = dims < HEAD_DIM
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        at = tl.full([BLOCK_R], N - 1, tl.int64)
        if HAS_POSITIONS:
            at = tl.load(Positions + rows, mask=row_ok, other=-1).to(tl.int64)
        k_base = K + b * stride_kb + (h // GROUPS) * stride_kh
        bias_base = Bias + b * stride_bb + h * stride_bh

        if HAS_LSE:
            lse2 = tl.load(LseIn + b * stride_lb + h * stride_lh + rows, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        else:
            m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_R], tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                scores = _tile_scores(q, k_base, stride_kn, cols, dims, col_ok, dim_ok, bias_base, stride_bn, qk_scale,
                                      HAS_BIAS, UPCAST, IEEE)
                visible = col_ok[None, :] & row_ok[:, None] & (cols[None, :] <= at[:, None])
                if HAS_WINDOW:
                    visible = visible & (cols[None, :] > at[:, None] - window)
                scores = tl.where(visible, scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(scores - m_safe[:, None]), 1)
                m_i = m_new
            lse2 = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))

        lse_safe = tl.where(lse2 > float("-inf"), lse2, 0.0)
        for start in range(KEY_START, KEY_STOP, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < KEY_STOP
            scores = _tile_scores(q, k_base, stride_kn, cols, dims, col_ok, dim_ok, bias_base, stride_bn, qk_scale,
                                  HAS_BIAS, UPCAST, IEEE)
            visible = col_ok[None, :] & row_ok[:, None] & (cols[None, :] <= at[:, None]) & (lse2 > float("-inf"))[:, None]
            if HAS_WINDOW:
                visible = visible & (cols[None, :] > at[:, None] - window)
            p = tl.where(visible, tl.exp2(scores - lse_safe[:, None]), 0.0)
            tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + (cols - KEY_START)[None, :], p,
                     mask=row_ok[:, None] & col_ok[None, :])


def _common(q, k, key_bias):
    b, h, _, d = q.shape
    n = k.shape[2]
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    if key_bias is not None:
        bias, strides = kernel_bias(key_bias, b, h, n)
        bias_args = (bias, *strides)
    else:
        bias_args = (q, 0, 0, 0)
    block_d = max(16, triton.next_power_of_2(d))
    flags = dict(UPCAST=interpreting() and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32)
    return q, k, bias_args, block_d, flags


def key_attention_mass_triton(q, k, lse=None, *, key_bias=None, causal=False, scale=None, window=None,
                              query_valid=None, reduce="sum"):
    """Triton ``key_attention_mass``: (B, H, N) fp32; the LSE is computed by the forward kernel when not given.
    A query outside ``query_valid`` (B, M) gets the LSE of a row that sees no key (-inf), which the kernel skips."""
    b, h, m, d = q.shape
    n = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    if lse is None:
        _, lse = attention_triton(q, k, k, key_bias=key_bias, causal=causal, scale=scale, window=window,
                                  return_lse=True)
    lse = lse.float()
    if query_valid is not None:
        lse = lse.masked_fill(~query_valid[:, None].to(lse.device), float("-inf"))
    lse = lse.contiguous()  # the kernel steps over rows with unit stride
    q, k, bias_args, block_d, flags = _common(q, k, key_bias)
    mass = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    count = torch.empty_like(mass)
    block_m, block_n = (32, 32) if interpreting() else (64, 64)
    _key_mass[(triton.cdiv(n, block_n), b * h)](
        q, k, bias_args[0], lse, mass, count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *bias_args[1:],
        lse.stride(0), lse.stride(1),
        h, h // k.shape[1], m, n, d, scale * LOG2E, window or 0,
        HAS_BIAS=key_bias is not None, CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **flags,
    )
    return mass if reduce == "sum" else mass / count.clamp(min=1)


def attention_probabilities_triton(q_rows, k, *, lse=None, positions=None, key_bias=None, scale=None, window=None,
                                   keys: slice | None = None):
    """Softmax probabilities (B, H, R, len(keys)) fp32 of ``q_rows`` over the key span ``keys`` (default all).

    ``lse`` (B, H, R): the rows' normalisers when the caller has them (the full joint row of an MM-DiT); otherwise
    computed over all keys visible to each row (``positions``: causal limit per row; ``window`` with it).
    """
    b, h, r, d = q_rows.shape
    n = k.shape[2]
    start, stop, _ = (keys or slice(None)).indices(n)  # a contiguous span: ``attention_block`` refuses a step
    stop = max(stop, start)
    lse = None if lse is None else lse.float().contiguous()  # the kernel steps over rows with unit stride
    scale = d ** -0.5 if scale is None else scale
    q_rows, k, bias_args, block_d, flags = _common(q_rows, k, key_bias)
    out = torch.empty((b, h, r, stop - start), device=q_rows.device, dtype=torch.float32)
    block_r = 16
    block_n = 32 if interpreting() else 64
    positions_arg = positions.to(device=q_rows.device, dtype=torch.int64).contiguous() if positions is not None else out
    lse_args = (lse, lse.stride(0), lse.stride(1)) if lse is not None else (out, 0, 0)
    _probabilities[(triton.cdiv(r, block_r), b * h)](
        q_rows, k, bias_args[0], positions_arg, lse_args[0], out,
        q_rows.stride(0), q_rows.stride(1), q_rows.stride(2), k.stride(0), k.stride(1), k.stride(2), *bias_args[1:],
        *lse_args[1:], out.stride(0), out.stride(1), out.stride(2),
        h, h // k.shape[1], r, n, start, stop, d, scale * LOG2E, window or 0,
        HAS_BIAS=key_bias is not None, HAS_POSITIONS=positions is not None, HAS_LSE=lse is not None,
        HAS_WINDOW=window is not None and positions is not None,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, **flags,
    )
    return out
