"""Scale the attention weights of a set of keys row by row and give the difference to the other keys (ACT).

ACT (Yu et al., ICML 2024, arXiv 2406.15765; spec ``extras-and-patch-points.md`` §1.2) calibrates each row i of a
head: the weights of the sink keys S become ``f * A_is`` and the other keys share what they gave up in proportion
to their weights, ``A_ij * (1 - f * m_i) / (1 - m_i)`` with ``m_i = sum_{s in S} A_is``. That depends on the row
through m_i, so it is not a key bias; it is computed exactly from two passes of ``attention`` that never hold the
matrix: the full row (out O, LSE) and the row restricted to S (out O_S / m_i, LSE_S), with ``m_i =
exp(LSE_S - LSE)``: ``O' = f * m * O_S_norm + (1 - f * m) / (1 - m) * (O - m * O_S_norm)``.
"""

from __future__ import annotations

import math

import torch

from .attention import attention


def attention_rescaled_set(q, k, v, *, key_set: torch.Tensor, factor: float, key_bias=None, **kwargs):
    """``attention(q, k, v, key_bias=..., **kwargs)`` with the weights of ``key_set`` (bool, broadcastable to
    (B, H, N)) scaled by ``factor`` in every row and the rest renormalised; also returns ``m`` (B, H, M), the
    mass each row had on the set before. A row with all its mass on the set (m = 1) is left unchanged."""
    out, lse = attention(q, k, v, key_bias=key_bias, return_lse=True, **kwargs)
    only_set = torch.where(key_set, 0.0, -math.inf)
    set_bias = only_set if key_bias is None else key_bias + only_set
    out_set, lse_set = attention(q, k, v, key_bias=set_bias, return_lse=True, **kwargs)
    mass = torch.where(torch.isfinite(lse_set) & torch.isfinite(lse), torch.exp(lse_set - lse), 0.0)
    mass = mass.clamp(max=1.0)
    movable = mass < 1.0
    rest = torch.where(movable, (1 - factor * mass) / (1 - mass).clamp(min=1e-12), 1.0)
    on_set = torch.where(movable, factor * mass, mass)
    out32, set32 = out.float(), out_set.float()
    result = on_set[..., None] * set32 + rest[..., None] * (out32 - mass[..., None] * set32)
    return result.to(out.dtype), mass
