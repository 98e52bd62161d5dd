"""SoftPAG's u = 1 heads without the attention product, for the PyTorch backends (SDPA, FlexAttention).

A head blended with u = 1 outputs its own values: ``lerp(attn, v_self, 1) == v_self`` exactly, so its attention is
never needed (spec ``shared/specs/headhunter.md`` §5.3 step 4 and §5.7 item 1: head-subset SDPA for the perturbed
rows). ``attention_skipping_identity`` runs the backend only where it is needed:

- batch rows with no u = 1 head run as one call over a contiguous slice of the batch (a view, nothing copied), with
  the blend only where some u > 0;
- rows where every head has u = 1 (layer-level PAG's perturbed row) run nothing;
- rows with some u = 1 heads run the other heads as one gathered call.

The result equals ``attention(..., blend=u)`` of the same backend: bit-for-bit on the u = 1 heads, and on the others
up to the backend's batch-size dependence (none for SDPA on CPU). The Triton kernel skips such heads itself (its
key loop is empty for them), so this module serves only the PyTorch backends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .broadcast import per_key


def per_pair_blend(blend: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """A (H,) or (B, H) blend as (B, H) fp32."""
    return blend.float().reshape(-1 if blend.dim() == 2 else 1, heads).expand(batch, heads)


def _row_runs(rows: torch.Tensor) -> list[slice]:
    """The maximal runs of True in a (B,) boolean as slices."""
    runs, start = [], None
    for i, on in enumerate(rows.tolist() + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(slice(start, i))
            start = None
    return runs


def _select(x: torch.Tensor | None, rows, heads: torch.Tensor | None):
    """``x`` (broadcastable, batch dim 0 and head dim 1) restricted to ``rows`` (a slice) and ``heads``."""
    if x is None:
        return None
    if x.shape[0] > 1:
        x = x[rows]
    if heads is not None and x.shape[1] > 1:
        x = x[:, heads]
    return x


def attention_skipping_identity(q, k, v, u: torch.Tensor, key_bias, mask, run: Callable) -> torch.Tensor:
    """(B, H, M, D) = the blended attention of ``q, k, v`` with per-pair weights ``u`` (B, H), computing attention
    only for the (batch, head) pairs with u < 1. ``run(q, k, v, key_bias, mask, blend)`` is one backend call."""
    b, h, m, _ = q.shape
    n = k.shape[2]
    groups = h // k.shape[1]
    identity = (u == 1).cpu()
    out = q.new_empty(q.shape)
    rows, heads = torch.nonzero(identity, as_tuple=True)
    own = v[rows.to(v.device), (heads // groups).to(v.device), n - m:]
    out[rows.to(q.device), heads.to(q.device)] = own.to(out.dtype)
    bias = None if key_bias is None else per_key(key_bias)
    mask = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for part in _row_runs(~identity.any(dim=1)):
        weight = u[part]
        out[part] = run(q[part], k[part], v[part], _select(bias, part, None), _select(mask, part, None),
                        weight if bool(weight.any()) else None)
    for row in torch.nonzero(identity.any(dim=1) & ~identity.all(dim=1)).flatten().tolist():
        part = slice(row, row + 1)
        keep = torch.nonzero(~identity[row]).flatten()
        kv_keep = keep // groups
        on = keep.to(q.device)
        out[part, on] = run(q[part][:, on], k[part][:, kv_keep.to(k.device)], v[part][:, kv_keep.to(v.device)],
                            _select(bias, part, on), _select(mask, part, on), u[part][:, keep.to(u.device)])
    return out
