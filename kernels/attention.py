"""Attention with an additive per-(batch, head, key) logit bias, a SoftPAG blend and the row log-sum-exp.

``attention(q, k, v, *, key_bias, causal, scale, blend, return_lse, backend)`` is the one entry point every nograd
method reaches attention through (spec: ``shared/specs/kernels.md`` §3.3). Conventions:

- ``q`` is (B, H, M, D); ``k`` and ``v`` are (B, H_kv, N, D) with ``H % H_kv == 0``. Query head ``h`` reads KV head
  ``h // (H // H_kv)`` (GQA by index).
- ``key_bias`` broadcasts to (B, H, N), natural-log units, added to the logits after scaling; ``-inf`` hard-masks a
  key. Scaling the post-softmax weight of key j by s_j and renormalising is exactly ``key_bias = log(s)``.
- ``causal`` is **bottom-right** aligned: query i sees key j iff ``j <= i + N - M`` (correct for prefill, chunked
  prefill over a cache, and decode). SDPA's ``is_causal`` is top-left; the two agree only when M == N.
- ``mask``: an extra mask as transformers builds it, broadcastable to (B, H, M, N), boolean (True = attend) or
  additive float. It is the slow path (dense): the shared attention path passes it only for patterns that are not
  "causal + padding" (sliding windows, bidirectional image blocks).
- ``window``: sliding-window attention as transformers defines it: a query sees only the ``window`` most recent
  keys, itself included (key j is visible to query i iff ``i + N - M - window < j``).
- ``blend`` (H,) or (B, H): SoftPAG's per-head weight u, ``out = (1 - u) * attn + u * v_self`` where ``v_self`` is
  the value at the query's own position ``i + N - M`` (needs M <= N). Heads with u = 1 skip the attention product
  (Triton: an empty key loop; SDPA / flex: ``identity_skip.py``); the reference computes it. It may be a host
  (CPU) tensor beside CUDA inputs: which heads are skipped or blended is then known without a device sync.
- ``softcap``: Gemma2's ``tanh`` logit soft-capping, applied before the bias.
- ``edit``: a ``ScoreEdit``, the per-key pointwise edit ``s + a|s| + m s`` of the scaled (soft-capped) scores of
  the query rows at or after a position (PAI / PAINT / ClearSight), applied before the bias and the masks.
- ``dropout``: attention dropout as transformers' eager attention applies it in training (``F.dropout`` of the
  weights before the weighted sum; ``lse`` is the undropped row's); it runs on the reference (``"auto"`` picks it).
- A row that sees no key returns 0 and ``lse = -inf``, never NaN.

Backends (one signature, results equal to the reference within float tolerance):
- ``"triton"``: the fused Triton forward (``triton_attention.py``), CUDA (or ``TRITON_INTERPRET=1``); the bias is
  read with broadcast strides, nothing of size M x N is allocated.
- ``"flex"``: compiled FlexAttention with the bias as ``score_mod`` and a causal / window ``BlockMask``.
- ``"sdpa"``: ``F.scaled_dot_product_attention`` with the bias as a broadcast (B, H, 1, N) mask where that is exact
  (non-causal, or M == 1). A causal prefill (M == N) with a bias folds it into q and k as extra head dimensions
  (``fold_key_bias``) and runs SDPA's own causal kernel with no mask. Any other causal edge or window with a bias
  runs per block of ``QUERY_BLOCK`` query rows, each over only the keys it sees with a mask of that block
  (O(block x N) memory, the upper triangle skipped). With a mask, GQA query heads run as rows of their KV head
  (``pack_gqa``), without repeating K/V. Only a per-query ``mask`` from transformers is passed dense (warned
  once).
- ``"eager"``: the fp32 reference; materialises the matrix.
- ``"auto"``: on CUDA the Triton kernel, except decode (M == 1) without a score edit, where SDPA's broadcast mask
  is already O(N); on CPU SDPA (a score edit's rows on the reference); the reference only for what no other backend
  does (``softcap``, LSE on CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F

from .broadcast import fits_per_key, per_key
from .identity_skip import attention_skipping_identity, per_pair_blend

BACKENDS = ("auto", "triton", "flex", "sdpa", "eager")


@dataclass(frozen=True)
class ScoreEdit:
    """``s' = s + abs_coef * |s| + mul_coef * s`` on the scaled scores (spec ``paint.md`` §5.1.2-5.1.3).

    ``abs_coef`` (PAI / PAINT's sign-aware margin) and ``mul_coef`` (ClearSight's ``enh - 1``) broadcast to
    (B, H, N). The edit applies to the query rows whose position ``i + N - M`` is at least ``rows_from[b]`` (B,);
    ``None`` edits every row. Unlike a key bias it depends on the score, so it is not a post-softmax reweighting.
    """

    abs_coef: torch.Tensor | None = None
    mul_coef: torch.Tensor | None = None
    rows_from: torch.Tensor | None = None
    rows_min: int | None = None
    """``int(rows_from.min())`` where the caller knows it (``first_row`` then reads no device value: no sync)."""
    every_head_from: int | None = None
    """Where the caller knows one: the first row position from which the edit changes every head of every batch row
    (the shared path then skips the caller's own attention for those rows without reading the device)."""

    @property
    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The coefficients (for autograd checks: a coefficient that requires grad needs a backend with a backward)."""
        return self.abs_coef, self.mul_coef

    def first_row(self, m: int, n: int) -> int:
        """The first query row (of M) that any batch row edits (M if none)."""
        if self.rows_from is None:
            return 0
        low = int(self.rows_from.min()) if self.rows_min is None else self.rows_min
        return min(max(low - (n - m), 0), m)

    def first_keys(self, n: int) -> "ScoreEdit":
        """The same edit over the first ``n`` keys only (the coefficients cut to them; no claim to cover every head,
        which the keys cut off may have made true)."""
        def cut(coef):
            return None if coef is None else coef[..., :n]

        return ScoreEdit(abs_coef=cut(self.abs_coef), mul_coef=cut(self.mul_coef), rows_from=self.rows_from,
                         rows_min=self.rows_min)

    def apply(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Edit fp32 ``logits`` (B, H, R, N) of the rows at key positions ``positions`` (R,)."""
        delta = torch.zeros((), device=logits.device)
        if self.abs_coef is not None:
            delta = delta + self.abs_coef.float()[..., None, :] * logits.abs()
        if self.mul_coef is not None:
            delta = delta + self.mul_coef.float()[..., None, :] * logits
        if self.rows_from is not None:
            on = positions.to(logits.device)[None, :] >= self.rows_from.to(logits.device)[:, None]
            delta = torch.where(on[:, None, :, None], delta, 0.0)
        return logits + delta


def padding_to_bias(key_valid: torch.Tensor) -> torch.Tensor:
    """A (B, N) boolean "this key is a real token" mask as an additive (B, 1, N) bias: 0 where valid, -inf where not."""
    zero = torch.zeros((), dtype=torch.float32, device=key_valid.device)
    return torch.where(key_valid, zero, -math.inf)[:, None, :]


def reweight_to_bias(scale: torch.Tensor) -> torch.Tensor:
    """Post-softmax reweighting factors s (renormalised) as the equivalent logit bias log(s); s = 0 gives -inf."""
    return torch.log(scale.float())


def restrict_mask(mask: torch.Tensor | None, visible: torch.Tensor | None) -> torch.Tensor | None:
    """A transformers-style mask (boolean, or additive float) further limited to ``visible`` (boolean)."""
    if visible is None or mask is None:
        return mask if visible is None else visible
    return mask & visible if mask.dtype == torch.bool else mask.masked_fill(~visible, -torch.inf)


def visible_keys(positions: torch.Tensor, keys: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor | None:
    """(R, K) boolean: whether the query at key position ``positions[r]`` sees key ``keys[j]`` (``keys[j] <= p`` if
    ``causal``; ``keys[j] > p - window`` with a ``window``, the ``window`` most recent positions); None if both are
    off (every key is visible)."""
    if not causal and window is None:
        return None
    at, keys = positions[:, None], keys.to(positions.device)[None, :]
    seen = keys <= at if causal else None
    if window is not None:
        inside = keys > at - window
        seen = inside if seen is None else seen & inside
    return seen


def causal_visibility(m: int, n: int, device=None) -> torch.Tensor:
    """(M, N) boolean, bottom-right aligned: query i sees key j iff j <= i + N - M."""
    return visible_keys(torch.arange(m, device=device) + (n - m), torch.arange(n, device=device), True, None)


def _check(q, k, v, key_bias, blend, backend, window=None, dropout=0.0, mask=None):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    check_inputs(q, k, v, key_bias, window, mask)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1); got {dropout!r}")
    if dropout and backend not in ("auto", "eager"):
        raise ValueError(f"backend={backend!r} does not apply dropout; use backend='eager' or 'auto'")
    b, h = q.shape[:2]
    if blend is not None and blend.shape not in ((h,), (b, h)):
        raise ValueError(f"blend must be (H,) or (B, H) = ({h},) or ({b}, {h}); got {tuple(blend.shape)}")
    if blend is not None and q.shape[2] > k.shape[2]:
        raise ValueError(f"blend needs every query to have its own key (M={q.shape[2]} > N={k.shape[2]})")


def check_inputs(q, k, v, key_bias=None, window=None, mask=None) -> None:
    """``ValueError`` naming what does not fit the signature (``attention``'s and the statistics'): 4-D q, k, v of
    one dtype and device with GQA by index, a float ``key_bias`` broadcastable to (B, H, N) on q's device, an integer
    ``window`` >= 1, a boolean or float ``mask`` on q's device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, M|N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, _, d = q.shape
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must share a dtype and a device; got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)} (k and v are "
                         "(B, H_kv, N, D) with the D of q)")
    if h % k.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    if key_bias is not None:
        if not key_bias.is_floating_point():
            raise ValueError(f"key_bias is a logit bias (floating point, -inf hides a key); got {key_bias.dtype} "
                             "(a boolean mask becomes one with nograd.kernels.padding_to_bias)")
        if not fits_per_key(tuple(key_bias.shape), (b, h, k.shape[2])):
            raise ValueError(f"key_bias {tuple(key_bias.shape)} does not broadcast to (B, H, N) = {(b, h, k.shape[2])}")
    if window is not None and not (isinstance(window, Integral) and not isinstance(window, bool) and window >= 1):
        raise ValueError(f"window must be an int number of positions >= 1 (or None); got {window!r}")
    if mask is not None and not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"mask is boolean (True = attend) or an additive float mask; got {mask.dtype} (a 0/1 "
                         "integer mask: .bool() of it)")
    for name, tensor in (("key_bias", key_bias), ("mask", mask)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device}, q on {q.device}: put it on q's device")


def visibility(m: int, n: int, causal: bool, window: int | None, device=None) -> torch.Tensor | None:
    """(M, N) boolean of the keys the (bottom-right) causal edge and the window leave visible, or None if they hide
    nothing."""
    if not (causal and m > 1) and window is None:
        return None
    return visible_keys(torch.arange(m, device=device) + (n - m), torch.arange(n, device=device), causal and m > 1,
                        window)


def logit_bias(q, k, *, key_bias=None, causal=False, mask=None, window=None,
               dtype=torch.float32) -> torch.Tensor | None:
    """Everything added to the scaled logits, as one ``dtype`` tensor broadcastable to (B, H, M, N) (None if
    nothing): the key bias, -inf past the causal edge / window, and the extra mask."""
    total = None if key_bias is None else bias_in(key_bias, dtype)[..., None, :]
    seen = visibility(q.shape[2], k.shape[2], causal, window, q.device)
    if seen is not None:
        total = torch.where(seen, torch.zeros((), dtype=dtype, device=q.device) if total is None else total, -math.inf)
    if mask is not None and mask.dtype == torch.bool:
        total = torch.where(mask, torch.zeros((), dtype=dtype, device=q.device) if total is None else total, -math.inf)
    elif mask is not None:
        total = mask.to(dtype) if total is None else total + mask.to(dtype)
    return total


def dead_rows(key_bias, m: int, n: int, causal: bool, window: int | None, device=None) -> torch.Tensor:
    """(B|1, H|1, M, 1) boolean: the queries that see no key (every visible key has a -inf bias), in O(B.H.(M+N))
    by counting finite biases in each row's visible key range with a cumulative sum; where every row sees every key
    (no window, and not causal or one query), one max over the keys (a decode step's few microseconds)."""
    if key_bias is not None and window is None and (not causal or m == 1) and n > 0:
        top = per_key(key_bias).amax(dim=-1)
        return torch.isneginf(top)[..., None, None].expand(*top.shape, m, 1)
    rows = torch.arange(m, device=device) + (n - m)
    last = rows.clamp(max=n - 1) if causal else torch.full_like(rows, n - 1)
    first = (rows - window + 1).clamp(min=0) if window is not None else torch.zeros_like(rows)
    if key_bias is None:
        count = (last - first + 1)[None, None]
    else:
        finite = torch.isfinite(key_bias).to(torch.int32)
        finite = per_key(finite)
        finite = finite.expand(*finite.shape[:-1], n)
        prefix = F.pad(finite.cumsum(-1), (1, 0))
        count = prefix[..., (last + 1).clamp(min=0)] - prefix[..., first.clamp(max=n)]
    return (count <= 0)[..., None]


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for (B, H, M, X) ``a`` and (B, H_kv, X, Y) ``b`` with query head h on KV head h // (H // H_kv): the
    G query heads of a KV head run as G x M rows of it (GQA by index, ``b`` never repeated)."""
    bsz, h, m, x = a.shape
    kv_heads = b.shape[1]
    if kv_heads == h:
        return torch.matmul(a, b)
    out = torch.matmul(a.reshape(bsz, kv_heads, (h // kv_heads) * m, x), b)
    return out.reshape(bsz, h, m, b.shape[-1])


def self_values(v: torch.Tensor, heads: int, m: int) -> torch.Tensor:
    """The value at each query's own position (i + N - M) for every query head: (B, H, M, D)."""
    n = v.shape[2]
    if m > n:
        raise ValueError(f"blend needs every query to have its own key (M={m} > N={n})")
    return _expand_kv(v[:, :, n - m :], heads)


def soft_identity_blend(out: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SoftPAG: ``(1 - u) * out + u * v_self`` per head, in fp32, in ``out.dtype``, written into ``out`` (a fresh
    attention output; a new tensor where autograd records ``out``, whose backward may need it) and returned. Only the
    (batch, head) pairs with u != 0 are read and written (every pair where u requires grad), so u = 0 leaves ``out``
    exactly as it was (a perturbed row among unperturbed ones costs one row's lerp)."""
    b, h, m, _ = out.shape
    weight = per_pair_blend(u, b, h)
    rows, heads = torch.nonzero(weight != 0, as_tuple=True)
    if rows.numel() == b * h or (weight.requires_grad and torch.is_grad_enabled()):  # every pair has a d/du
        return torch.lerp(out.float(), self_values(v, h, m).float(),
                          weight[..., None, None].to(out.device)).to(out.dtype)
    if rows.numel():
        n, groups = v.shape[2], h // v.shape[1]
        own = v[rows.to(v.device), (heads // groups).to(v.device), n - m:].float()
        weight = weight[rows, heads][:, None, None].to(out.device)
        rows, heads = rows.to(out.device), heads.to(out.device)
        blended = torch.lerp(out[rows, heads].float(), own, weight).to(out.dtype)
        if out.requires_grad:
            return out.index_put((rows, heads), blended)
        out[rows, heads] = blended
    return out


def attention_eager(q, k, v, *, key_bias=None, causal=False, scale=None, mask=None, softcap=None, window=None,
                    edit=None, dropout=0.0, return_lse=True):
    """The reference: explicit fp32 logits, softmax (``dropout`` of its weights) and weighted sum. Returns (out in
    q.dtype, lse fp32), the lse None unless ``return_lse``."""
    logits = scaled_logits(q, k, key_bias=key_bias, causal=causal, scale=scale, mask=mask, softcap=softcap,
                           window=window, edit=edit)
    out = _grouped_matmul(F.dropout(softmax_rows(logits), p=dropout) if dropout else softmax_rows(logits), v.float())
    return out.to(q.dtype), logsumexp_rows(logits) if return_lse else None


_dense_warned = False


def _warn_dense_once() -> None:
    global _dense_warned
    if not _dense_warned:
        _dense_warned = True
        warnings.warn("nograd.kernels.attention: the sdpa backend passes a per-query (B, H, M, N) mask to SDPA as it "
                      "is (dense); the Triton backend avoids it", stacklevel=3)


def attention_sdpa(q, k, v, *, key_bias=None, causal=False, scale=None, mask=None, window=None):
    """``F.scaled_dot_product_attention`` with the bias folded into ``attn_mask`` (broadcast where exact)."""
    b, h, m, _ = q.shape
    n = k.shape[2]
    gqa = {"enable_gqa": True} if k.shape[1] != h else {}
    needs_edge = (causal and m > 1) or window is not None
    if key_bias is None and mask is None and window is None:
        if not needs_edge:
            if m == 1 and gqa:
                return _packed(q, k, v, None, scale)
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **gqa)
        if m == n:  # top-left == bottom-right
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, **gqa)
    fold_scale = q.shape[-1] ** -0.5 if scale is None else scale  # explicit: the folded head dim is larger
    if needs_edge and mask is None and window is None and m == n and foldable(key_bias, q.dtype, fold_scale):
        folded_q, folded_k = fold_key_bias(q, k, key_bias, fold_scale)
        padded_v = F.pad(v, (0, folded_q.shape[-1] - v.shape[-1]))  # SDPA's fused kernels want one head dim
        out = F.scaled_dot_product_attention(folded_q, folded_k, padded_v, is_causal=True, scale=fold_scale, **gqa)
        out, dense = out[..., : v.shape[-1]], None
    elif needs_edge and mask is None:
        out, dense = _sdpa_in_query_blocks(q, k, v, key_bias, causal, window, scale), None
    else:
        if mask is not None and mask.shape[-2] > 1:
            _warn_dense_once()
        dense = logit_bias(q, k, key_bias=key_bias, causal=causal, mask=mask, window=window, dtype=q.dtype)
        out = _packed(q, k, v, dense, scale) if m == 1 else F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, scale=scale, **gqa)
    if mask is not None:
        dead = torch.isneginf(dense).all(dim=-1, keepdim=True)
    else:
        dead = dead_rows(key_bias, m, n, causal, window, q.device)
    return out.masked_fill(dead, 0.0)  # always: asking first whether any row is dead would read the device (a sync)


def _fold_floor(dtype: torch.dtype) -> float:
    """The finite value ``fold_key_bias`` gives a -inf bias / scale: far below any real logit, safe to add to."""
    return max(torch.finfo(dtype).min, torch.finfo(torch.float32).min) / 4


def bias_in(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``bias`` cast to ``dtype`` for an SDPA mask, its finite values kept (in fp32: an fp16 bias overflowed the
    clamp itself) within a quarter of the dtype's range both ways: a bias of 2e4 is +inf in fp16 after folding, and a
    mask of +inf, or one the logits overflow, gives NaN rows (a capped key still takes the whole row, as the exact
    bias does); a finite -7e4 was -inf in fp16, zeroing a row that the reference and the LSE keep. -inf stays."""
    wide = bias.to(torch.float64 if bias.dtype == torch.float64 else torch.float32)
    floor = _fold_floor(dtype)
    return torch.where(torch.isneginf(wide), wide, wide.clamp(min=floor, max=-floor)).to(dtype)


def foldable(key_bias, dtype: torch.dtype, scale: float) -> bool:
    """Whether ``fold_key_bias`` is exact for this bias: a positive scale, and every finite ``bias / scale`` above
    the finite stand-in for -inf (a huge negative finite bias in fp16 would otherwise mask like -inf)."""
    if key_bias is None or not scale > 0:
        return False
    finite = key_bias[torch.isfinite(key_bias)]
    return finite.numel() == 0 or float(finite.min()) / scale > _fold_floor(dtype) / 2


def fold_key_bias(q, k, key_bias, scale: float):
    """``(q', k')`` with the key bias as extra head dimensions, so that ``q' k'^T * scale = q k^T * scale + bias``
    (up to rounding) and SDPA runs its own causal kernel with no mask at all. A bias shared by the query heads of a
    KV head is one dimension (``q`` gets 1, ``k`` gets ``bias / scale``); per query head under GQA, one dimension
    per head of the group (``q`` gets its one-hot position in the group). ``-inf`` becomes a finite logit far below
    any real one (a one-hot 0 times -inf would be NaN); the rows that see no key are zeroed by the caller. The
    extra dimensions are zero-padded to a multiple of 8 (the head dims fused kernels take)."""
    b, h, m, _ = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    bias = per_key(key_bias)
    bias = bias.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    groups = 1 if bias.shape[1] == 1 else h // kv_heads
    bias = bias.expand(b, kv_heads * groups, n).reshape(b, kv_heads, groups, n).transpose(-1, -2) / scale
    extra_k = bias_in(bias.clamp(min=_fold_floor(q.dtype)), q.dtype)
    extra_q = torch.eye(groups, dtype=q.dtype, device=q.device).repeat(h // groups, 1)
    extra_q = extra_q[None, :, None, :].expand(b, h, m, groups)
    pad = -(q.shape[-1] + groups) % 8
    return (torch.cat([q, F.pad(extra_q, (0, pad))], dim=-1),
            torch.cat([k, F.pad(extra_k, (0, pad))], dim=-1))


QUERY_BLOCK = 256


def query_blocks(m: int, n: int, causal: bool):
    """``(r0, r1, hi)``: the query rows in blocks ``[r0, r1)`` of at most ``QUERY_BLOCK``, and the number of keys ``hi``
    the block can see (bottom-right causal: row i sees the keys before ``i + N - M + 1``). Each block over the keys
    ``[:hi]`` keeps the alignment of its rows. A block that sees no key (M > N) is left out."""
    for r0 in range(0, m, QUERY_BLOCK):
        r1 = min(r0 + QUERY_BLOCK, m)
        hi = min(r1 + n - m, n) if causal else n
        if hi > 0:
            yield r0, r1, hi


def query_block_mask(mask, r0: int, r1: int, hi: int, m: int, n: int, causal: bool, window: int | None, device):
    """(positions, mask) of the query rows ``[r0, r1)`` of a ``query_blocks`` block over the keys ``[:hi]``: each
    row's key position (``i + N - M``) and ``mask`` cut to the block and limited to the keys each row sees (its
    causal edge and window, placed by its own position)."""
    positions = torch.arange(r0, r1, device=device) + (n - m)
    block = None if mask is None else mask[..., r0:r1, :hi] if mask.shape[-2] > 1 else mask[..., :hi]
    return positions, restrict_mask(block, visible_keys(positions, torch.arange(hi), causal, window))


def _sdpa_in_query_blocks(q, k, v, key_bias, causal, window, scale):
    """A causal edge and/or window with a key bias, without the dense (B, H, M, N) mask: one SDPA call per block of
    ``QUERY_BLOCK`` query rows over only the keys its rows can see (so the causal upper triangle and the keys left
    of the window are skipped, as a flash kernel would) with a (B, H, rows, keys) mask of that block. GQA query
    heads are packed as rows of their KV head (``_packed``), so K/V are never repeated."""
    m, n = q.shape[2], k.shape[2]
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    for r0, r1, hi in query_blocks(m, n, causal):
        lo = max(r0 + n - m - window + 1, 0) if window is not None else 0
        seen = visible_keys(torch.arange(r0, r1, device=q.device) + (n - m), torch.arange(lo, hi), causal, window)
        bias = zero
        if key_bias is not None:  # a bias with one key column holds for every key
            bias = bias_in(key_bias[..., lo:hi] if key_bias.shape[-1] > 1 else key_bias, q.dtype)[..., None, :]
        out[:, :, r0:r1] = _packed(q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], torch.where(seen, bias, -math.inf),
                                   scale)
    return out


def _packed(q, k, v, bias, scale):
    """SDPA with a (broadcastable) mask and GQA: the G query heads of each KV head become G x M query rows of that
    head (transformers' ``pack_gqa``), so SDPA runs on the KV heads as they are instead of repeating them."""
    b, h, m, d = q.shape
    kv_heads = k.shape[1]
    if kv_heads == h:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    groups = h // kv_heads
    rows = q.reshape(b, kv_heads, groups * m, d)
    if bias is not None:  # one mask row per packed query row; a head-independent mask stays shared by the KV heads
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        heads = kv_heads if bias.shape[1] > 1 else 1
        bias = bias.reshape(bias.shape[0], heads, -1, bias.shape[-2], bias.shape[-1])
        bias = bias.expand(-1, -1, groups, m, -1).reshape(bias.shape[0], heads, groups * m, -1)
    return F.scaled_dot_product_attention(rows, k, v, attn_mask=bias, scale=scale).reshape(b, h, m, d)


_PREFERRED = contextvars.ContextVar("nograd_attention_backend", default="auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ``backend="auto"`` calls (every method's attention) prefer ``name`` wherever it can run
    the call (a dense ``mask`` or ``softcap`` still falls back to what can), in this thread and the tasks it starts
    (a context variable: a thread started inside the block keeps the default)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    token = _PREFERRED.set(name)
    try:
        yield
    finally:
        _PREFERRED.reset(token)


def choose_backend(q: torch.Tensor, *, mask=None, softcap=None, return_lse=False, grad=False, edit=None) -> str:
    """What ``backend="auto"`` runs for these arguments (see the module doc, and ``use_backend``); ``grad``: autograd
    records the call, so the forward-only Triton kernel is not chosen; ``edit``: a score edit, which only the Triton
    kernel fuses (elsewhere its rows run on the reference)."""
    from . import triton_attention

    preferred = _PREFERRED.get()
    runnable = (preferred != "triton" or (triton_attention.available(q.device) and not grad and q.shape[-1] <= 256)) \
        and not (preferred == "flex" and grad and not q.is_cuda)  # torch's FlexAttention has no backward on CPU
    if preferred != "auto" and softcap is None and not (mask is not None and preferred in ("triton", "flex")) and runnable:
        return preferred
    if softcap is not None:
        return "eager"
    if q.is_cuda and triton_attention.available(q.device) and mask is None and q.shape[-1] <= 256 and not grad:
        return "sdpa" if q.shape[2] == 1 and not return_lse and edit is None else "triton"
    return "eager" if return_lse else "sdpa"


def resolve_backend(backend: str, q, k, v, *, key_bias=None, blend=None, edit=None, mask=None, softcap=None,
                    return_lse=False, dropout=0.0) -> str:
    """The backend a call with ``backend`` runs: ``auto`` chosen by ``choose_backend`` (the reference for dropout),
    never a backend without a backward where autograd records one of the inputs: the forward-only Triton kernel,
    FlexAttention on CPU (an explicit one there raises ``ValueError``)."""
    if backend == "auto" and dropout:
        return "eager"
    if backend not in ("auto", "triton", "flex"):
        return backend
    from .triton_attention import records_grad

    grad = records_grad(q, k, v, key_bias, blend, *(edit.tensors if edit is not None else ()))
    if backend == "triton" and grad:
        raise ValueError("backend='triton' is forward-only (no backward): under autograd use backend='auto', "
                         "'sdpa', 'eager' or on CUDA 'flex', or run it in torch.no_grad()")
    if backend == "flex" and grad and not q.is_cuda:
        raise ValueError("backend='flex' has no backward on CPU (torch's FlexAttention): under autograd use "
                         "backend='auto', 'sdpa' or 'eager', or run it in torch.no_grad()")
    return choose_backend(q, mask=mask, softcap=softcap, return_lse=return_lse, grad=grad, edit=edit) \
        if backend == "auto" else backend


def attention(q, k, v, *, key_bias=None, causal=False, scale=None, blend=None, return_lse=False, backend="auto",
              mask=None, softcap=None, window=None, edit=None, dropout=0.0):
    """Scaled dot-product attention with a key bias, causal edge, SoftPAG blend and optional LSE (see module doc).

    Returns ``out`` (B, H, M, D) in ``q.dtype``, or ``(out, lse)`` with ``lse`` (B, H, M) fp32 when ``return_lse``.
    """
    _check(q, k, v, key_bias, blend, backend, window, dropout, mask)
    backend = resolve_backend(backend, q, k, v, key_bias=key_bias, blend=blend, edit=edit, mask=mask, softcap=softcap,
                              return_lse=return_lse, dropout=dropout)
    if softcap is not None and backend != "eager":
        raise ValueError(f"backend={backend!r} does not support softcap; use backend='eager' or 'auto'")
    if mask is not None and backend in ("triton", "flex"):
        raise ValueError(f"backend={backend!r} takes no dense mask; express it as key_bias/causal/window or use 'sdpa'")
    args = dict(key_bias=key_bias, causal=causal, scale=scale, window=window)
    if backend == "triton":
        from .triton_attention import attention_triton, available

        if not available(q.device):
            raise ValueError("backend='triton' runs on CUDA tensors (or anywhere under TRITON_INTERPRET=1, set before "
                             f"triton is imported); q is on {q.device}")
        return attention_triton(q, k, v, blend=blend, return_lse=return_lse, edit=edit, **args)
    if blend is not None and backend in ("sdpa", "flex") and edit is None and not return_lse \
            and not (blend.requires_grad and torch.is_grad_enabled()):  # u = 1 heads skipped would have no d/du
        u = per_pair_blend(blend, q.shape[0], q.shape[1])
        if bool((u == 1).any()):
            def run(q_, k_, v_, bias_, mask_, blend_):
                return attention(q_, k_, v_, key_bias=bias_, mask=mask_, blend=blend_, backend=backend,
                                 causal=causal, scale=scale, window=window)

            return attention_skipping_identity(q, k, v, u, key_bias, mask, run)
    if edit is not None and backend != "eager":
        out, lse = _attention_with_edited_tail(q, k, v, backend=backend, mask=mask, edit=edit,
                                               return_lse=return_lse, **args)
    elif backend == "flex":
        from .flex_attention import attention_flex

        out, lse = attention_flex(q, k, v, return_lse=return_lse, **args)
    elif backend == "eager":
        out, lse = attention_eager(q, k, v, mask=mask, softcap=softcap, edit=edit, dropout=dropout,
                                   return_lse=return_lse, **args)
    else:
        out = attention_sdpa(q, k, v, mask=mask, **args)
        lse = row_logsumexp(q, k, mask=mask, **args) if return_lse else None
    if blend is not None:
        out = soft_identity_blend(out, v, blend)
    return (out, lse) if return_lse else out


def _attention_with_edited_tail(q, k, v, *, backend, mask, edit, return_lse, key_bias, causal, scale, window):
    """For backends without the score edit: the rows before the first edited one through ``backend`` (over the keys
    they can see, so bottom-right alignment holds), the edited tail explicitly (few rows: the prompt's last row at
    prefill, the new row at decode)."""
    m, n = q.shape[2], k.shape[2]
    first = edit.first_row(m, n)
    if not causal and window is not None:
        first = 0  # a non-causal window's rows keep no alignment when cut: every row explicitly
    parts, lses = [], []
    if first > 0:
        seen = n - m + first if causal else n
        head_bias = None if key_bias is None else key_bias[..., :seen]
        head_mask = None if mask is None else mask[..., :first, :seen] if mask.shape[-2] > 1 else mask[..., :seen]
        head = attention(q[:, :, :first], k[:, :, :seen], v[:, :, :seen], key_bias=head_bias, causal=causal,
                         scale=scale, window=window, mask=head_mask, backend=backend, return_lse=return_lse)
        out, lse = head if return_lse else (head, None)
        parts.append(out)
        lses.append(lse)
    if first < m:
        tail_mask = None if mask is None else mask[..., first:, :] if mask.shape[-2] > 1 else mask
        out, lse = attention_eager(q[:, :, first:], k, v, key_bias=key_bias, causal=causal, scale=scale,
                                   window=window, mask=tail_mask, edit=edit, return_lse=return_lse)
        parts.append(out)
        lses.append(lse)
    if len(parts) == 1:
        return parts[0], lses[0]
    return torch.cat(parts, dim=2), (torch.cat(lses, dim=2) if return_lse else None)


def scaled_logits(q, k, *, key_bias=None, causal=False, scale=None, mask=None, softcap=None,
                  window=None, edit=None, positions=None) -> torch.Tensor:
    """The explicit (B, H, M, N) fp32 logits: q.k * scale, soft-capped, edited, plus every bias (-inf where not
    visible). ``positions`` (M,): the key position of each query row for ``edit`` (default ``i + N - M``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = _grouped_matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if edit is not None:
        m, n = q.shape[2], k.shape[2]
        rows = torch.arange(m, device=q.device) + (n - m) if positions is None else positions
        logits = edit.apply(logits, rows)
    bias = logit_bias(q, k, key_bias=key_bias, causal=causal, mask=mask, window=window)
    return logits if bias is None else logits + bias


def row_logsumexp(q, k, *, key_bias=None, causal=False, scale=None, mask=None, softcap=None,
                  window=None) -> torch.Tensor:
    """The (B, H, M) fp32 log-sum-exp of each query's biased logits (-inf for a row that sees nothing)."""
    logits = scaled_logits(q, k, key_bias=key_bias, causal=causal, scale=scale, mask=mask, softcap=softcap,
                           window=window)
    return logsumexp_rows(logits)


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp`` over the last dim, where a row of ``-inf`` (a query that sees no key) gives ``-inf`` and
    a zero gradient; ``torch.logsumexp``'s backward is NaN there (``exp(-inf - -inf)``), which would reach every
    parameter through autograd (a left-padded batch under training)."""
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return torch.logsumexp(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead[..., 0], -math.inf)


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``torch.softmax`` over the last dim, where a row of ``-inf`` (a query that sees no key) is 0 with a zero
    gradient. Normalised by its own sum, not by ``exp(logits - lse)``: a row of huge finite negatives (a float mask's
    ``finfo.min``) has an LSE that rounds to its logits, which would give every key weight 1."""
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
