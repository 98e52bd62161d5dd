"""The same biased attention through PyTorch's compiled FlexAttention (``torch.nn.attention.flex_attention``).

The key bias is a ``score_mod`` that indexes the (broadcast) (B, H, N) bias; bottom-right causality and sliding
windows are a ``mask_mod`` turned into a ``BlockMask`` so fully masked tiles are skipped. Compiled per shape
(``torch.compile``, static shapes: each new (M, N) compiles; past dynamo's recompile limit, 8, torch runs it unfused
with a warning, so a decode loop, a new N per step, is no place for it). On CPU FlexAttention gives no LSE, so it
is computed by the reference there.
"""

from __future__ import annotations

import functools

import torch

from .broadcast import per_key


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _visibility(m: int, n: int, causal: bool, window: int | None):
    shift = n - m

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx + shift if causal else kv_idx >= 0
        if window is not None:
            visible = visible & (kv_idx > q_idx + shift - window)
        return visible

    return mask_mod


def attention_flex(q, k, v, *, key_bias=None, causal=False, scale=None, window=None, return_lse=False):
    """Compiled FlexAttention with the bias as ``score_mod``: ``(out, lse)``, ``lse`` None unless ``return_lse``."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, m, _ = q.shape
    n = k.shape[2]
    score_mod = None
    if key_bias is not None:
        bias = per_key(key_bias.float()).expand(b, h, n)

        def score_mod(score, bi, hi, q_idx, kv_idx):
            return score + bias[bi, hi, kv_idx]

    block_mask = None
    if (causal and m > 1) or window is not None:
        block_mask = create_block_mask(_visibility(m, n, causal, window), None, None, m, n, device=q.device)
    want_lse = return_lse and q.is_cuda
    result = _compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                         enable_gqa=k.shape[1] != h, return_lse=want_lse)
    out, lse = result if want_lse else (result, None)
    if return_lse and lse is None:
        from .attention import row_logsumexp

        lse = row_logsumexp(q, k, key_bias=key_bias, causal=causal, scale=scale, window=window)
    if lse is not None:
        out = out.masked_fill(torch.isneginf(lse)[..., None], 0.0)
    return out, (lse.float() if return_lse else None)
