"""Attention statistics read out of one attention call (spec: ``shared/specs/kernels.md`` §4).

- ``attention_rows``: the softmax rows of a few chosen queries (e.g. the last text token over image tokens).
- ``key_attention_mass``: the attention each key receives, summed or averaged over the queries that see it, per
  head (sink detection, KV scoring).

Both take the same bias/causal/mask arguments as ``nograd.kernels.attention`` so that they describe exactly the
distribution that call used. These are the PyTorch references; they materialise one (B, H, R|M, N) block.
"""

from __future__ import annotations

import torch

from .attention import scaled_logits


def _probs(logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    return torch.exp(logits - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])


def attention_rows(q_rows, k, *, positions=None, key_bias=None, scale=None, mask=None, softcap=None, window=None) -> torch.Tensor:
    """Softmax attention rows (B, H, R, N) fp32 of the queries ``q_rows`` (B, H, R, D).

    ``positions`` (R,): the key index each query sits at; a query sees keys ``<= position`` (causal). ``None``: every
    key is visible (non-causal, or the rows are decode queries). ``window`` (with ``positions``): it also sees only
    the ``window`` most recent keys.
    """
    if positions is not None:
        keys = torch.arange(k.shape[2], device=k.device)[None, :]
        at = positions.to(k.device)[:, None]
        visible = (keys <= at) & (keys > at - window) if window is not None else keys <= at
        mask = visible if mask is None else (mask & visible if mask.dtype == torch.bool else mask.masked_fill(~visible, -torch.inf))
    return _probs(scaled_logits(q_rows, k, key_bias=key_bias, scale=scale, mask=mask, softcap=softcap))


def key_attention_mass(q, k, lse=None, *, key_bias=None, causal=False, scale=None, mask=None, softcap=None,
                       window=None, reduce="sum") -> torch.Tensor:
    """Attention received by each key, per head: (B, H, N) fp32.

    ``reduce="sum"`` adds the weights over all M queries; ``"mean"`` divides by the number of queries that can see
    the key (``N - j`` for key j under a full causal prefill: ACT's per-key mean). ``lse`` (B, H, M) from the
    attention call avoids recomputing the normalisers.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce={reduce!r} is not one of ('sum', 'mean')")
    logits = scaled_logits(q, k, key_bias=key_bias, causal=causal, scale=scale, mask=mask, softcap=softcap,
                           window=window)
    mass = _probs(logits, lse).sum(dim=2)
    if reduce == "sum":
        return mass
    seen = torch.isfinite(logits).sum(dim=2)
    return mass / seen.clamp(min=1)


__all__ = ["attention_rows", "key_attention_mass"]
