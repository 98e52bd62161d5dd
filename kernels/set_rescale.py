"""Scale the attention weights of a set of keys row by row and give the difference to the other keys (ACT).

ACT (Yu et al., ICML 2024, arXiv 2406.15765; spec ``extras-and-patch-points.md`` §1.2) calibrates each row i of a
head: the weights of the sink keys S become ``f * A_is`` and the other keys share what they gave up in proportion
to their weights, ``A_ij * (1 - f * m_i) / (1 - m_i)`` with ``m_i = sum_{s in S} A_is``. That depends on the row
through m_i, so it is not a key bias; it is computed exactly from two passes of ``attention`` that never hold the
matrix: the full row (out O, LSE) and the row restricted to S (out O_S / m_i, LSE_S), with ``m_i =
exp(LSE_S - LSE)``: ``O' = f * m * O_S_norm + (1 - f * m) / (1 - m) * (O - m * O_S_norm)``. Its reference
(``rescaled_set_eager``, also the CPU path, where the LSE needs the matrix anyway) reweights the matrix once.
"""

from __future__ import annotations

import math

import torch

from .attention import _grouped_matmul, attention, choose_backend, logsumexp_rows, scaled_logits, softmax_rows
from .broadcast import per_key


def _set_weights(mass: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(on the set, on the rest): the factors of each row's weights; a row with all its mass on the set (m = 1)
    keeps its weights."""
    movable = mass < 1.0
    rest = torch.where(movable, (1 - factor * mass) / (1 - mass).clamp(min=1e-12), 1.0)
    return torch.where(movable, factor, 1.0), rest


def attention_rescaled_set(q, k, v, *, key_set: torch.Tensor, factor: float, key_bias=None, backend="auto", **kwargs):
    """``attention(q, k, v, key_bias=..., **kwargs)`` with the weights of ``key_set`` (bool, broadcastable to
    (B, H, N)) scaled by ``factor`` in every row and the rest renormalised; also returns ``m`` (B, H, M), the
    mass each row had on the set before. A row with all its mass on the set (m = 1) is left unchanged. Where the
    LSE comes from the fp32 reference anyway (``backend`` resolves to ``"eager"``: CPU), the matrix is built once
    (``rescaled_set_eager``) instead of twice."""
    if backend == "auto":
        from .triton_attention import records_grad

        backend = choose_backend(q, mask=kwargs.get("mask"), softcap=kwargs.get("softcap"), return_lse=True,
                                 grad=records_grad(q, k, v, key_bias))
    if backend == "eager":
        return rescaled_set_eager(q, k, v, key_set=key_set, factor=factor, key_bias=key_bias, **kwargs)
    out, lse = attention(q, k, v, key_bias=key_bias, return_lse=True, backend=backend, **kwargs)
    only_set = torch.where(key_set, 0.0, -math.inf)
    set_bias = only_set if key_bias is None else key_bias + only_set
    out_set, lse_set = attention(q, k, v, key_bias=set_bias, return_lse=True, backend=backend, **kwargs)
    # exp(-inf) where a row sees no key: its mass is 0, and no NaN of exp(-inf - -inf) reaches autograd
    mass = torch.exp(torch.where(torch.isfinite(lse), lse_set - lse, -math.inf)).clamp(max=1.0)
    on_set, rest = _set_weights(mass, factor)
    out32, set32 = out.float(), out_set.float()
    result = (on_set * mass)[..., None] * set32 + rest[..., None] * (out32 - mass[..., None] * set32)
    return result.to(out.dtype), mass


def rescaled_set_eager(q, k, v, *, key_set: torch.Tensor, factor: float, key_bias=None, **kwargs):
    """The reference of ``attention_rescaled_set``: the fp32 weights of every row, those of the set times ``factor``
    and the others times ``(1 - factor * m) / (1 - m)``, then the weighted sum of the values (the matrix once)."""
    logits = scaled_logits(q, k, key_bias=key_bias, **kwargs)
    probs = softmax_rows(logits, logsumexp_rows(logits))
    on = per_key(key_set)[..., None, :].to(probs.device)
    mass = (probs * on).sum(dim=-1).clamp(max=1.0)
    on_set, rest = _set_weights(mass, factor)
    weights = probs * torch.where(on, on_set[..., None], rest[..., None])
    return _grouped_matmul(weights, v.float()).to(q.dtype), mass
