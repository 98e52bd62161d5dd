"""Scale the attention weights of a set of keys row by row and give the difference to the other keys (ACT).

ACT (Yu et al., ICML 2024, arXiv 2406.15765; spec ``extras-and-patch-points.md`` §1.2) calibrates each row i of a
head: the weights of the sink keys S become ``f * A_is`` and the other keys share what they gave up in proportion
to their weights, ``A_ij * (1 - f * m_i) / (1 - m_i)`` with ``m_i = sum_{s in S} A_is``. That depends on the row
through m_i, so it is not a key bias; it is computed exactly from two passes of ``attention`` that never hold the
matrix: the row restricted to S (normalised output O_S, LSE_S) and the row restricted to the rest (O_R, LSE_R), with
``m = sigmoid(LSE_S - LSE_R)``: ``O' = f * m * O_S + (1 - f * m) * O_R``. A row whose visible keys are all in S
(no rest: LSE_R = -inf) keeps its attention O_S; no term divides by ``1 - m``, so rounding is never amplified. Its
reference (``rescaled_set_eager``, also the CPU path) reweights the weights once, a block of query rows at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import (_check, _grouped_matmul, attention, query_block_mask, query_blocks, resolve_backend,
                        scaled_logits, softmax_rows)
from .broadcast import per_key


def attention_rescaled_set(q, k, v, *, key_set: torch.Tensor, factor: float, key_bias=None, causal=False, scale=None,
                           mask=None, softcap=None, window=None, edit=None, backend="auto", dropout=0.0):
    """``attention(q, k, v, key_bias=..., ...)`` with the weights of ``key_set`` (bool, broadcastable to (B, H, N))
    scaled by ``factor`` in every row and the rest renormalised; also returns ``m`` (B, H, M), the mass each row had
    on the set before. A row that sees no key outside the set is left unchanged. Where the LSE comes from the fp32
    reference anyway (``backend`` resolves to ``"eager"``: CPU), the reference reweights the rows in one pass
    (``rescaled_set_eager``) instead of two. ``dropout`` (training) runs there too, on the rescaled weights."""
    _check(q, k, v, key_bias, None, backend, window, dropout, mask)
    common = dict(causal=causal, scale=scale, mask=mask, softcap=softcap, window=window, edit=edit)
    backend = resolve_backend(backend, q, k, v, key_bias=key_bias, edit=edit, mask=mask, softcap=softcap,
                              return_lse=True, dropout=dropout)
    if backend == "eager":
        return rescaled_set_eager(q, k, v, key_set=key_set, factor=factor, key_bias=key_bias, dropout=dropout,
                                  **common)
    passes = []
    for hidden in (torch.where(key_set, 0.0, -math.inf), torch.where(key_set, -math.inf, 0.0)):  # the set, the rest
        passes.append(attention(q, k, v, key_bias=hidden if key_bias is None else key_bias + hidden, return_lse=True,
                                backend=backend, dropout=dropout, **common))  # dropout: refused by this backend
    (out_set, lse_set), (out_rest, lse_rest) = passes
    has_set, has_rest = torch.isfinite(lse_set), torch.isfinite(lse_rest)
    # the set's share of the row; the where()s keep exp(-inf - -inf) = NaN out of values and gradients
    mass = torch.where(has_set & has_rest, torch.sigmoid(torch.where(has_set & has_rest, lse_set - lse_rest, 0.0)),
                       has_set.float())
    on_set = torch.where(has_rest, factor * mass, 1.0)[..., None]
    result = on_set * out_set.float() + (1 - on_set) * out_rest.float()
    return result.to(out_set.dtype), mass


def rescaled_set_eager(q, k, v, *, key_set: torch.Tensor, factor: float, key_bias=None, causal=False, scale=None,
                       mask=None, softcap=None, window=None, edit=None, dropout=0.0):
    """The reference of ``attention_rescaled_set``: the fp32 weights of every row, those of the set times ``factor``
    and the others times ``(1 - factor * m) / r``, where ``r`` is the rest's own sum (``1 - m`` up to rounding, so
    each row sums to 1 again), then the weighted sum of the values. One block of ``QUERY_BLOCK`` query rows at a
    time over the keys they can see (O(block x N) memory, never the whole matrix), except with ``dropout``, which
    draws its mask over the whole matrix as eager attention does."""
    if dropout:
        return _rescaled_rows(q, k, v, key_set, factor, key_bias=key_bias, causal=causal, mask=mask, edit=edit,
                              dropout=dropout, scale=scale, softcap=softcap, window=window)
    m, n = q.shape[2], k.shape[2]
    out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device)
    mass = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    for r0, r1, hi in query_blocks(m, n, causal):
        positions, block_mask = query_block_mask(mask, r0, r1, hi, m, n, causal, window, q.device)
        out[:, :, r0:r1], mass[:, :, r0:r1] = _rescaled_rows(
            q[:, :, r0:r1], k[:, :, :hi], v[:, :, :hi], _first_keys(key_set, n, hi), factor,
            key_bias=_first_keys(key_bias, n, hi), edit=None if edit is None else edit.first_keys(hi),
            mask=block_mask, positions=positions, scale=scale, softcap=softcap)
    return out, mass


def _first_keys(values, n: int, hi: int):
    """``values`` broadcastable to (..., N) for the first ``hi`` keys."""
    return values[..., :hi] if values is not None and values.shape[-1] == n else values


def _rescaled_rows(q, k, v, key_set, factor, *, key_bias=None, dropout=0.0, **kwargs):
    logits = scaled_logits(q, k, key_bias=key_bias, **kwargs)
    probs = softmax_rows(logits)
    on = per_key(key_set)[..., None, :].to(probs.device)
    mass = (probs * on).sum(dim=-1)
    rest = (probs * ~on).sum(dim=-1)
    movable = rest > 0  # a row that sees no key outside the set keeps its weights
    rest_factor = torch.where(movable, (1 - factor * mass) / torch.where(movable, rest, 1.0), 1.0)
    weights = probs * torch.where(on, torch.where(movable, factor, 1.0)[..., None], rest_factor[..., None])
    weights = F.dropout(weights, p=dropout) if dropout else weights
    return _grouped_matmul(weights, v.float()).to(q.dtype), mass
