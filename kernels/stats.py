"""Attention statistics read out of one attention call (spec: ``shared/specs/kernels.md`` §4).

- ``attention_rows``: the softmax rows of a few chosen queries (e.g. the last text token over image tokens).
- ``key_attention_mass``: the attention each key receives, summed or averaged over the queries that see it, per
  head (sink detection, KV scoring).
- ``attention_block``: the probabilities of some queries over a span of keys, normalised by a given row LSE (the
  image->text block of MM-DiT joint attention, whose normaliser is the full joint row).

They take the same bias/causal/mask arguments as ``nograd.kernels.attention`` so that they describe exactly the
distribution that call used. ``backend="auto"`` runs the Triton kernels (``triton_stats.py``) on CUDA, and the
PyTorch references here elsewhere; the references materialise one (B, H, R, N) block (``key_attention_mass``: one
block of ``QUERY_BLOCK`` query rows at a time).
"""

from __future__ import annotations

import torch

from .attention import (check_inputs, query_block_mask, query_blocks, restrict_mask, scaled_logits, softmax_rows,
                        visible_keys)


def _probs(logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """The rows' probabilities: normalised over ``logits`` themselves, or by a given row LSE (a block of a longer row)."""
    if lse is None:
        return softmax_rows(logits)
    return torch.exp(logits - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])


def _check(q, k, key_bias=None, lse=None, positions=None, window=None, mask=None, name="positions") -> None:
    """``ValueError`` naming what does not fit: q and k as ``attention``'s (k stands for v), ``lse`` (B, H, M) as
    that call returns it, one position per query row (a Triton kernel reads them all, out of bounds otherwise)."""
    check_inputs(q, k, k, key_bias, window, mask)
    b, h, m, _ = q.shape
    if lse is not None and tuple(lse.shape) != (b, h, m):
        raise ValueError(f"lse {tuple(lse.shape)} is not (B, H, M) = {(b, h, m)}, the row LSE of the attention call "
                         "(attention(..., return_lse=True))")
    if positions is not None and tuple(positions.shape) != (m,):
        raise ValueError(f"{name} {tuple(positions.shape)} is not (R,) = ({m},): one position per query row")


def _triton(q: torch.Tensor, backend: str, mask=None, softcap=None, edit=None, inputs=()) -> bool:
    """Whether to run the Triton kernel: asked for, or ``auto`` on CUDA; never with a dense mask, softcap or edit,
    nor where autograd records ``inputs`` (the kernels are forward-only)."""
    from . import triton_attention

    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not one of ('auto', 'triton', 'torch')")
    unsupported = mask is not None or softcap is not None or edit is not None
    if backend == "triton" and unsupported:
        raise ValueError("backend='triton' takes no dense mask, softcap or score edit; use backend='torch'")
    grad = triton_attention.records_grad(*inputs)
    if backend == "triton" and grad:
        raise ValueError("backend='triton' is forward-only (no backward): under autograd use backend='auto' or "
                         "'torch', or run it in torch.no_grad()")
    if backend == "auto":
        return q.is_cuda and triton_attention.available(q.device) and not unsupported and not grad
    if backend == "triton" and not triton_attention.available(q.device):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or under TRITON_INTERPRET=1); q is on {q.device}")
    return backend == "triton"


def attention_rows(q_rows, k, *, positions=None, key_bias=None, scale=None, mask=None, softcap=None, window=None,
                   edit=None, edit_positions=None, backend="auto") -> torch.Tensor:
    """Softmax attention rows (B, H, R, N) fp32 of the queries ``q_rows`` (B, H, R, D).

    ``positions`` (R,): the key index each query sits at; a query sees keys ``<= position`` (causal). ``None``: every
    key is visible (non-causal, or the rows are decode queries). ``window`` (with ``positions``): it also sees only
    the ``window`` most recent keys. ``edit`` (a ``ScoreEdit``) with ``edit_positions`` (R,), each row's position.
    """
    _check(q_rows, k, key_bias, positions=positions, window=window, mask=mask)
    if window is not None and positions is None:
        raise ValueError("attention_rows: window needs positions (the key each row sits at, where its window ends)")
    if edit_positions is not None:
        _check(q_rows, k, positions=edit_positions, name="edit_positions")
    if _triton(q_rows, backend, mask, softcap, edit, inputs=(q_rows, k, key_bias)):
        from .triton_stats import attention_probabilities_triton

        return attention_probabilities_triton(q_rows, k, positions=positions, key_bias=key_bias, scale=scale,
                                              window=window)
    if positions is not None:
        mask = restrict_mask(mask, visible_keys(positions.to(k.device), torch.arange(k.shape[2]), True, window))
    return _probs(scaled_logits(q_rows, k, key_bias=key_bias, scale=scale, mask=mask, softcap=softcap, edit=edit,
                                positions=edit_positions if edit_positions is not None else positions))


def key_attention_mass(q, k, lse=None, *, key_bias=None, causal=False, scale=None, mask=None, softcap=None,
                       window=None, edit=None, query_valid=None, reduce="sum", backend="auto") -> torch.Tensor:
    """Attention received by each key, per head: (B, H, N) fp32.

    ``reduce="sum"`` adds the weights over all M queries; ``"mean"`` divides by the number of queries that can see
    the key (``N - j`` for key j under a full causal prefill: ACT's per-key mean). ``lse`` (B, H, M) from the
    attention call avoids recomputing the normalisers. ``query_valid`` (B, M) bool: only these queries count (the
    pad queries at the end of a right-padded row see the real keys, but their weights are not the prompt's).
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce={reduce!r} is not one of ('sum', 'mean')")
    if query_valid is not None and not (isinstance(query_valid, torch.Tensor) and query_valid.dtype == torch.bool
                                        and tuple(query_valid.shape) == (q.shape[0], q.shape[2])):
        raise ValueError(f"query_valid must be a bool tensor of shape (B, M) = {(q.shape[0], q.shape[2])} (one flag "
                         f"per query; a 0/1 attention mask: .bool() of its last M columns); got "
                         f"{getattr(query_valid, 'dtype', type(query_valid).__name__)} "
                         f"{tuple(getattr(query_valid, 'shape', ()))}")
    _check(q, k, key_bias, lse, window=window, mask=mask)
    if _triton(q, backend, mask, softcap, edit, inputs=(q, k, key_bias, lse)):
        from .triton_stats import key_attention_mass_triton

        return key_attention_mass_triton(q, k, lse, key_bias=key_bias, causal=causal, scale=scale, window=window,
                                         query_valid=query_valid, reduce=reduce)
    b, h, m, _ = q.shape
    n = k.shape[2]
    mass = torch.zeros(b, h, n, dtype=torch.float32, device=q.device)
    seen = torch.zeros(b, h, n, dtype=torch.int64, device=q.device)
    for r0, r1, hi in query_blocks(m, n, causal):  # one (B, H, block, N) slice of the matrix at a time
        positions, block_mask = query_block_mask(mask, r0, r1, hi, m, n, causal, window, q.device)
        logits = scaled_logits(q[:, :, r0:r1], k[:, :, :hi], key_bias=None if key_bias is None else key_bias[..., :hi],
                               scale=scale, mask=block_mask, softcap=softcap,
                               edit=None if edit is None else edit.first_keys(hi), positions=positions)
        if query_valid is not None:  # a query that does not count sees no key
            logits = logits.masked_fill(~query_valid[:, None, r0:r1, None].to(logits.device), float("-inf"))
        mass[..., :hi] += _probs(logits, None if lse is None else lse[..., r0:r1]).sum(dim=2)
        seen[..., :hi] += torch.isfinite(logits).sum(dim=2)
    return mass if reduce == "sum" else mass / seen.clamp(min=1)


def attention_block(q, k, lse, *, keys: slice, key_bias=None, scale=None, backend="auto") -> torch.Tensor:
    """``exp(s - lse)`` (B, H, M, len(keys)) fp32: the probabilities of the queries ``q`` over the key span ``keys``,
    normalised by the row LSE (B, H, M) of the full attention call (``attention(..., return_lse=True)``). ``keys``
    is a contiguous span (``slice(start, stop)``, negative and open ends as in Python)."""
    if keys.step not in (None, 1):
        raise ValueError(f"keys must be a contiguous span slice(start, stop); got step {keys.step}")
    _check(q, k, key_bias, lse)
    if _triton(q, backend, inputs=(q, k, key_bias, lse)):
        from .triton_stats import attention_probabilities_triton

        return attention_probabilities_triton(q, k, lse=lse, key_bias=key_bias, scale=scale, keys=keys)
    span_bias = key_bias[..., keys] if key_bias is not None and key_bias.shape[-1] > 1 else key_bias  # (.., 1): all
    return _probs(scaled_logits(q, k[:, :, keys], key_bias=span_bias, scale=scale), lse)
