"""The one shared attention path of nograd: interventions, the call they see, and ``attend``.

``attend`` is where every method's attention runs, on transformers models (here) and on diffusers MM-DiTs
(``dit_attention.py``). On transformers models, a single function per base implementation (``nograd_sdpa``, ``nograd_eager``, ``nograd_flash_attention_2``...) is
registered in transformers' ``AttentionInterface`` **and** ``AttentionMaskInterface`` (with the base's own mask
function, so padding and sliding windows arrive exactly as the base expects them), and the decoder stack is switched
to it with ``set_attn_implementation`` (a ``{"text_config": ...}`` dict for VLMs).

Per attention module, methods add ``Intervention`` objects. For one call the function asks each of them for
(a) an additive per-(batch, head, key) logit bias, (b) a pointwise per-key score edit ``s + a|s| + m s`` on the rows
from a position on, (c) a per-head SoftPAG blend toward identity, and (d) whether it observes the call (a read-out of
attention rows or per-key mass). With nothing to do the call goes to the base
implementation unchanged, so an unused layer is bit-identical; otherwise it goes to ``nograd.kernels.attention``.

State for one forward pass (the batch's 2-D padding mask) is captured by a pre-hook on the decoder stack and lives
on the model's ``AttentionPatch``; nothing outlives the last handle that uses it.
"""

from __future__ import annotations

import inspect
import itertools
import math
import sys
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import kernels
from .forward_inputs import bound_inputs, cache_of, cached_length, checkpointing
from .handle import calls_running
from .kernels.attention import causal_visibility
from .kernels.broadcast import fits_per_key

PREFIX = "nograd_"


# ---- what a method plugs in --------------------------------------------------------------------------------------
class Intervention:
    """One method's action on one attention module. Override what applies; the defaults do nothing."""

    observes: bool = False
    """True if ``observe`` must be called (read-outs)."""

    def key_bias(self, call: "AttentionCall") -> torch.Tensor | None:
        """An additive logit bias broadcastable to (B, H, N), natural log units (-inf masks a key), or None."""
        return None

    def score_edit(self, call: "AttentionCall") -> kernels.ScoreEdit | None:
        """A pointwise edit of the scaled scores (``nograd.kernels.ScoreEdit``), or None. At most one intervention
        per layer may edit scores (methods that do claim the ``score_edit`` resource)."""
        return None

    def set_rescale(self, call: "AttentionCall") -> tuple[torch.Tensor, float] | None:
        """``(key_set, factor)``: scale the weights of ``key_set`` (bool, broadcastable to (B, H, N)) by ``factor`` in
        every row and renormalise the rest (ACT; ``nograd.kernels.attention_rescaled_set``), or None. Called after
        the mask and biases are known, so ``call.key_mass()`` reads this call's attention before the rescale."""
        return None

    def blend(self, call: "AttentionCall") -> torch.Tensor | None:
        """SoftPAG weights u, (H,) or (B, H): ``out = (1 - u) * attention + u * v_self``; or None."""
        return None

    def output_edit(self, call: "AttentionCall") -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function applied to this call's attention output (B, H, M, D) after the blend (targets no logit bias
        can express, e.g. SoftPAG's image-only identity on joint attention), or None."""
        return None

    def observe(self, call: "AttentionCall") -> None:
        """Read statistics of the call (``call.attention_rows``, ``call.key_mass``) after it ran."""


@dataclass
class BatchInfo:
    """Facts about the batch of the current forward pass, captured before the decoder stack runs."""

    padding_mask: torch.Tensor | None = None
    """The (B, T) 2-D attention mask the decoder received (1 = real token), or None (no padding)."""
    text_len: int = 0
    """(MM-DiTs) the number of text tokens in the joint sequence of the current forward pass."""
    length: int | None = None
    """(decoders) the positions the current forward pass covers: cached tokens plus new ones (None: unknown)."""
    forward: int = 0
    """(decoders) a number of the current forward pass, new at every forward (what per-forward memos key on)."""

    def key_offset(self, n_keys: int) -> int:
        """The position of key 0 of a call with ``n_keys`` keys: above 0 on a sliding-window layer whose cache has
        dropped the oldest positions (its keys are the last ``n_keys`` of ``length``)."""
        return max(self.length - n_keys, 0) if self.length is not None else 0

    def first_real_position(self, batch: int, device) -> torch.Tensor:
        """(B,) the position of each row's first real (non-pad) token (0 without a 2-D padding mask)."""
        mask = self.padding_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return (mask != 0).int().argmax(dim=1).to(device)


def keys_from(values: torch.Tensor, start: int, n_keys: int) -> torch.Tensor:
    """``values`` given per key position (..., T) for the ``n_keys`` keys from position ``start`` on (a sliding
    window's keys start later), zero past the last position (keys generated after the prompt)."""
    values = values[..., start:start + n_keys]
    if values.shape[-1] < n_keys:
        values = torch.nn.functional.pad(values, (0, n_keys - values.shape[-1]))
    return values


def recomputing() -> bool:
    """True while autograd runs a backward pass: a forward called then is gradient checkpointing's recomputation of
    one already made, which ``h.stats`` must not count again."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class AttentionCall:
    """One attention call of one layer, as interventions see it. Shapes: q (B, H, M, D), k/v (B, H_kv, N, D)."""

    module: nn.Module
    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    batch: BatchInfo
    softcap: float | None = None
    window: int | None = None
    causal: bool = True
    dropout: float = 0.0
    """Attention dropout (the module's in training), applied as its eager attention does."""
    key_bias: torch.Tensor | None = None
    edit: kernels.ScoreEdit | None = None
    mask: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, M, N)."""
        b, h, m, _ = self.query.shape
        return b, h, m, self.key.shape[2]

    @property
    def key_offset(self) -> int:
        """The position of key 0 (above 0 on a sliding-window layer whose cache dropped the oldest positions)."""
        return self.batch.key_offset(self.key.shape[2])

    def attention_rows(self, rows: torch.Tensor, edited: bool = True) -> torch.Tensor:
        """The softmax rows (B, H, R, N) of the queries at indices ``rows`` (into M), as this call computed them
        (``edited=False``: without its score edit)."""
        _, _, m, n = self.shape
        rows = rows.to(self.query.device)
        positions = rows + (n - m) if self.causal else None
        mask = None if self.mask is None else self.mask[..., rows, :] if self.mask.shape[-2] > 1 else self.mask
        window = self.window if positions is not None else None  # non-causal: a window is in the mask (Gemma3's)
        return kernels.attention_rows(self.query[:, :, rows], self.key, positions=positions, key_bias=self.key_bias,
                                      scale=self.scaling, mask=mask, softcap=self.softcap, window=window,
                                      edit=self.edit if edited else None, edit_positions=rows + (n - m))

    def key_mass(self, reduce: str = "sum") -> torch.Tensor:
        """Attention received by each key (B, H, N), summed (or averaged) over this call's real queries (the pad
        queries of a right-padded row see the real keys, and are left out)."""
        return kernels.key_attention_mass(self.query, self.key, key_bias=self.key_bias, causal=self.causal,
                                          scale=self.scaling, mask=self.mask, softcap=self.softcap,
                                          window=self.window, edit=self.edit, query_valid=self.real_queries(),
                                          reduce=reduce)

    def real_queries(self) -> torch.Tensor | None:
        """(B, M) bool, False at this call's pad queries; None where every query is real (or it is not known)."""
        mask, length = self.batch.padding_mask, self.batch.length
        b, _, m, _ = self.shape
        if mask is None or mask.dim() != 2 or length is None or mask.shape != (b, length) or m > length:
            return None
        real = mask[:, length - m:] != 0
        return None if bool(real.all()) else real.to(self.query.device)


# ---- transformers masks -> (padding, causal, residual) -------------------------------------------------------------
def split_mask(mask: torch.Tensor | None, m: int, n: int, causal: bool):
    """Reduce a transformers 4-D attention mask to ``(key_valid (B, N) | None, causal, residual | None)``.

    Masks that are "causal + key padding" or "key padding" (what decoders build for a padded batch) become a
    padding vector and a causal flag, which the kernels handle in O(N) memory. Anything else (sliding windows,
    bidirectional image blocks, custom float masks) is passed through as ``residual`` with ``causal=False``; a float
    residual's "masked" entries (the dtype's minimum, as eager masks write them) become ``-inf``, the kernels' mark of
    a hidden key, so a row that sees no key (a pad query) reads nothing and statistics count only the keys a query
    sees (ACT's mean received attention).
    """
    if mask is None:
        return None, causal, None
    if mask.dim() == 2:  # flash-attention bases: a (B, N) padding mask, causality is the layer's own
        key_valid = mask.bool()
        return (None if bool(key_valid.all()) else key_valid), causal, None
    if mask.dtype == torch.bool:
        allowed, hidden = mask, None
    else:
        hidden = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | hidden).all()):
            return None, False, residual_mask(mask, hidden)
        allowed = mask == 0
    if allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[-2:] != (m, n):
        return None, False, residual_mask(mask, hidden)
    allowed = allowed[:, 0]
    key_valid = allowed.any(dim=1)
    if torch.equal(allowed, causal_visibility(m, n, allowed.device)[None] & key_valid[:, None, :]):
        return (None if bool(key_valid.all()) else key_valid), True, None
    if torch.equal(allowed, key_valid[:, None, :].expand_as(allowed)):
        return (None if bool(key_valid.all()) else key_valid), False, None
    return None, False, residual_mask(mask, hidden)


def residual_mask(mask: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """``mask`` as the kernels take it: a boolean one (``hidden`` None) as it is; a float one with its ``hidden``
    entries (the dtype's minimum) as ``-inf``."""
    return mask if hidden is None else mask.masked_fill(hidden, -math.inf)


# ---- the registered function ---------------------------------------------------------------------------------------
_PATCH_OF_MODULE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[AttentionPatch]]" = weakref.WeakKeyDictionary()
"""Attention module -> its model's patch, both held weakly (the model holds the patch: ``ModelPatch.acquire``)."""
_REGISTERED: dict[str, int] = {}


def base_function(base: str, module: nn.Module) -> Callable:
    """The attention function the model would call under ``base`` (its own ``eager_attention_forward`` for eager)."""
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_function(base: str) -> Callable:
    # torch.compile runs it outside the graph: traced, the lookup by module was specialised to the first layer's
    # interventions (every layer ran layer 0's; ACT's decode then used stale sinks)
    @torch.compiler.disable
    def nograd_attention(module, query, key, value, attention_mask, **kwargs):
        ref = _PATCH_OF_MODULE.get(module)
        patch = ref() if ref is not None else None
        interventions = patch.interventions.get(module) if patch is not None else None
        def run_base():
            return base_function(base, module)(module, query, key, value, attention_mask, **kwargs)

        if interventions:
            result = patch.run(module, interventions, query, key, value, attention_mask, kwargs, run_base)
            if result is not None:
                return result
        return run_base()

    nograd_attention.__name__ = f"{PREFIX}{base}"
    return nograd_attention


def _register(base: str) -> str:
    name = PREFIX + base
    if _REGISTERED.get(name, 0) == 0:
        AttentionInterface.register(name, _make_function(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    _REGISTERED[name] = _REGISTERED.get(name, 0) + 1
    return name


def _unregister(name: str) -> None:
    _REGISTERED[name] -= 1
    if _REGISTERED[name] == 0:
        del _REGISTERED[name]
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def _unregister_all(names: list[str]) -> None:
    for name in names:
        _unregister(name)


def registered_names() -> list[str]:
    """The nograd names currently registered in transformers' interfaces (empty when no model is patched)."""
    return sorted(_REGISTERED)


UNSUPPORTED_IMPLEMENTATIONS = {"flex_attention": "BlockMasks, whose padding nograd cannot read"}
"""transformers attention implementations nograd's attention path refuses, and why."""


def refuse_unsupported_call(bound: dict, config) -> None:
    """Raise ``NotImplementedError`` for a forward that nograd's attention path would get silently wrong: a fixed-size
    (compileable) KV cache (its 4-D masks hide the padding the methods need) or ``output_attentions`` (layers a method
    changes have no attention weights to return)."""
    cache = cache_of(bound)
    if getattr(cache, "is_compileable", False):
        raise NotImplementedError(
            f"nograd: a fixed-size KV cache ({type(cache).__name__}, as generate(cache_implementation='static' or "
            "'sliding_window') builds) is not supported while a method is attached; use the default dynamic cache "
            "(it keeps sliding-window layers' windows too)")
    if bound.get("output_attentions", getattr(config, "output_attentions", False)):
        raise NotImplementedError("nograd: output_attentions=True is not supported while a method is attached (the "
                                  "layers it changes return no attention weights); read them with the model alone, "
                                  "or through the method's h.stats / nograd.observe")


# ---- one model's patch -------------------------------------------------------------------------------------------
def _config_implementations(model: nn.Module) -> dict[int, tuple[object, str | None]]:
    """id(config) -> (config, its _attn_implementation_internal) for the model's config and every sub-config."""
    found, stack = {}, [model.config]
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = (config, config._attn_implementation_internal)
        stack.extend(sub for key in getattr(config, "sub_configs", {}) if (sub := getattr(config, key, None)) is not None)
    return found


class ModelPatch:
    """What nograd installs on one model to run interventions, shared by every handle on it.

    One instance per model and subclass, reference-counted by interventions: ``acquire`` installs it with the first,
    ``discard`` of the last calls ``_uninstall``, which restores exactly what ``__init__`` replaced. The model holds
    its patches (attribute ``PATCHES``, gone with the last one), so nothing global keeps a model alive.
    """

    PATCHES = "_nograd_patches"

    def __init__(self, model: nn.Module, adapter):
        self.model = model
        self.adapter = adapter
        self.interventions: dict[nn.Module, list[Intervention]] = {}
        self.holders: list = []
        """Handles that keep the patch installed without an intervention (``hold``)."""
        self.batch = BatchInfo()
        self._splits: list[tuple] = []
        """(mask, (m, n, causal), split) of the masks split in the current forward, the newest last (at most
        ``SPLITS_KEPT``; emptied when a forward starts and when it ends)."""

    @classmethod
    def acquire(cls, model: nn.Module, adapter) -> "ModelPatch":
        patch = model.__dict__.get(cls.PATCHES, {}).get(cls)
        if patch is None:
            patch = cls(model, adapter)
            model.__dict__.setdefault(cls.PATCHES, {})[cls] = patch
        return patch

    def add(self, module: nn.Module, intervention: Intervention) -> None:
        self.interventions.setdefault(module, []).append(intervention)

    def discard(self, module: nn.Module, intervention: Intervention) -> None:
        """Take one intervention off; when none is left on the model, uninstall everything."""
        ours = self.interventions.get(module, [])
        # by identity: two equal interventions (a dataclass author's, say) are still two methods' own
        self.interventions[module] = ours = [iv for iv in ours if iv is not intervention]
        if not ours:
            self.interventions.pop(module, None)
        self._uninstall_if_unused()

    def hold(self, handle) -> None:
        """Keep the patch installed for ``handle`` without an intervention, until ``release``."""
        self.holders.append(handle)

    def release(self, handle) -> None:
        self.holders = [held for held in self.holders if held is not handle]
        self._uninstall_if_unused()

    def _uninstall_if_unused(self) -> None:
        patches = self.model.__dict__.get(self.PATCHES, {})
        if not self.interventions and not self.holders and patches.get(type(self)) is self:
            del patches[type(self)]
            if not patches:
                del self.model.__dict__[self.PATCHES]
            self._uninstall()

    def _uninstall(self) -> None:
        raise NotImplementedError

    def split_mask(self, mask, m: int, n: int, causal: bool):
        """``split_mask``, computed once per mask: every layer of one forward pass receives one of a few mask tensors
        (Gemma's and Mistral's sliding and full layers alternate two), and splitting one reads the device."""
        for kept, shape, result in self._splits:
            if kept is mask and shape == (m, n, causal):
                return result
        result = split_mask(mask, m, n, causal)
        self._splits = [*self._splits[1 - SPLITS_KEPT:], (mask, (m, n, causal), result)]
        return result


class AttentionPatch(ModelPatch):
    """nograd's registered attention function on one transformers model.

    The decoder stack is switched at install; a VLM's vision tower only when an intervention is added to one of its
    attention modules (read-outs of the vision attention, e.g. PAINT's CLS rows).
    """

    def __init__(self, model: nn.Module, adapter):
        super().__init__(model, adapter)
        self._saved = _config_implementations(model)
        self.names = [self._switch(adapter.attn_config_key, adapter.attn_implementation, adapter.attention_modules)]
        self._unregister = weakref.finalize(self, _unregister_all, self.names)
        """Drops the registrations once: at ``_uninstall``, or when a model dropped with a method attached is freed."""
        self._vision: set[nn.Module] = set()
        batch_module = adapter.padding_mask_module
        self._signature = inspect.signature(batch_module.forward)
        self._forwards = itertools.count(1)
        self._outer: list[tuple] = []
        """The batch state of the forwards this one runs inside (a forward of the model within its own forward)."""
        self._checkpointed: list[tuple] = []
        """(weak reference to a mask, batch state) of the latest checkpointed training forwards (``_batch_of_call``;
        at most ``CHECKPOINTED_KEPT``; the checkpoint keeps a mask alive until its recomputation)."""
        self._hooks = (batch_module.register_forward_pre_hook(self._capture_batch, with_kwargs=True),
                       batch_module.register_forward_hook(self._restore_batch, always_call=True))

    def _switch(self, config_key: str | None, base: str, modules) -> str:
        if base in UNSUPPORTED_IMPLEMENTATIONS:
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"nograd cannot act through attn_implementation={base!r} (its masks are {UNSUPPORTED_IMPLEMENTATIONS[base]}); "
                "switch first, e.g. model.set_attn_implementation('sdpa'), or load with attn_implementation='sdpa'")
        if base.startswith(PREFIX):  # this model's own patch switches a config once: another model set this one
            from .errors import IncompatibleMethodsError

            raise IncompatibleMethodsError(
                f"nograd: the config of this {type(self.model).__name__} is shared with another model that carries "
                f"nograd methods (its attn_implementation is {base!r}; a config passed to two models, or from_config "
                "of another model's config); one config holds one attention implementation, so give this model its "
                "own (build it from copy.deepcopy(config)) or remove the other model's methods first")
        name = _register(base)
        self.model.set_attn_implementation(name if config_key is None else {config_key: name})
        for module in modules:
            _PATCH_OF_MODULE[module] = weakref.ref(self)
        self._ours = [config for config, implementation in _config_implementations(self.model).values()
                      if implementation is not None and implementation.startswith(PREFIX)]
        return name

    def _replaced(self) -> list:
        """The configs whose implementation is no longer the nograd name set at install (a user's
        ``set_attn_implementation`` after ``apply``)."""
        return [config for config in self._ours
                if not (config._attn_implementation_internal or "").startswith(PREFIX)]

    def add(self, module: nn.Module, intervention: Intervention) -> None:
        if not self._vision and module in getattr(self.adapter, "vision_attention_modules", ()):
            self._vision = set(self.adapter.vision_attention_modules)
            key = self.adapter.vision_attn_config_key
            base = getattr(self.model.config, key)._attn_implementation
            self.names.append(self._switch(key, base, self._vision))
        super().add(module, intervention)

    def _uninstall(self) -> None:
        """Restore every config's implementation name, drop the hook and (with the last model) the registrations."""
        for hook in self._hooks:
            hook.remove()
        for module in [*self.adapter.attention_modules, *self._vision]:
            _PATCH_OF_MODULE.pop(module, None)
        replaced = {id(config) for config in self._replaced()}
        for key, (config, implementation) in self._saved.items():
            if key not in replaced:  # an implementation the user set after apply stays
                config._attn_implementation_internal = implementation
        self._unregister()

    def _capture_batch(self, module, args, kwargs):
        if self._outer and calls_running(module, sys._getframe()) <= 1:
            self._outer.clear()  # an outermost forward: what is left was pushed by forwards an interrupt ended
        self._outer.append((self.batch.padding_mask, self.batch.length, self.batch.forward))
        replaced = self._replaced()
        if replaced:
            now = ", ".join(sorted({repr(config._attn_implementation_internal) for config in replaced}))
            raise RuntimeError(f"nograd: the attention implementation of {type(self.model).__name__} was set to {now} "
                               "after nograd.apply (set_attn_implementation?), so the attached methods would not run; "
                               "remove the handles, set the implementation, then apply the methods again")
        bound = bound_inputs(self._signature, args, kwargs)
        refuse_unsupported_call(bound, self.model.config)
        mask = bound.get("attention_mask")
        self.batch.padding_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.batch.length = self._length(bound)
        self.batch.forward = next(self._forwards)
        self._splits = []  # a forward starts with none (a checkpointed backward's recomputation may have left some)

    def _restore_batch(self, module, args, output) -> None:
        """After a forward: its split masks dropped (no mask outlives its forward); after one run inside another
        forward of the model, the outer one's batch state again (nothing when ``_capture_batch`` never ran: an
        earlier pre-hook raised)."""
        self._splits = []
        state = self._outer.pop() if self._outer else None
        if state is not None and self._outer:
            self.batch.padding_mask, self.batch.length, self.batch.forward = state

    @staticmethod
    def _length(bound: dict) -> int | None:
        """Cached plus new positions of this forward: the 2-D mask's length, else the cache's plus the input's."""
        mask = bound.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return int(mask.shape[1])
        new = next((x.shape[1] for x in (bound.get("input_ids"), bound.get("inputs_embeds"))
                    if isinstance(x, torch.Tensor)), None)
        return None if new is None else cached_length(bound) + int(new)

    def _batch_of_call(self, attention_mask) -> BatchInfo:
        """The batch state of the forward this attention call belongs to. Gradient checkpointing recomputes a layer
        in the backward, after other forwards may have run (two losses summed before one backward, an evaluation
        forward in between): the recomputation gets the same mask object as its forward, so the state is recorded
        per mask in a checkpointed training forward and found by it again (a call without a mask has no padding)."""
        if recomputing():
            if attention_mask is None:
                return BatchInfo()
            return next((batch for mask, batch in self._checkpointed if mask() is attention_mask), self.batch)
        if attention_mask is not None and self.model.training and checkpointing(self.model):
            if not any(mask() is attention_mask for mask, _ in self._checkpointed):
                self._checkpointed = [*self._checkpointed[1 - CHECKPOINTED_KEPT:],
                                      (weakref.ref(attention_mask), replace(self.batch))]
        return self.batch

    def run(self, module, interventions, query, key, value, attention_mask, kwargs, run_base):
        """Attention with the interventions of ``module`` in transformers' (B, M, H, D) output layout, or None."""
        call = AttentionCall(module=module, layer_idx=getattr(module, "layer_idx", -1), query=query, key=key,
                             value=value, scaling=kwargs.get("scaling") or query.shape[-1] ** -0.5,
                             batch=self._batch_of_call(attention_mask), softcap=kwargs.get("softcap"),
                             window=kwargs.get("sliding_window"),
                             causal=kwargs.get("is_causal", getattr(module, "is_causal", True)),
                             dropout=float(kwargs.get("dropout") or 0.0))
        out = attend(call, interventions, attention_mask, self.split_mask, base=lambda: run_base()[0].transpose(1, 2))
        return None if out is None else (out.transpose(1, 2).contiguous(), None)


SPLITS_KEPT = 4
"""How many of the last masks split ``ModelPatch.split_mask`` keeps (a forward's layers share two or three)."""
CHECKPOINTED_KEPT = 16
"""Masks of checkpointed training forwards whose batch state is kept for their recomputation (several per forward
on models with a mask per layer type; a few forwards before one backward)."""

EDITED_ROWS_OVER_BASE = 16
"""A score edit on at most this many rows runs the base implementation and recomputes only those rows."""


def attend(call: AttentionCall, interventions: list[Intervention], mask: torch.Tensor | None = None,
           split: Callable = split_mask, base: Callable | None = None):
    """Run ``call`` with ``interventions`` through ``nograd.kernels.attention``: (B, H, M, D), or None when none of
    them acts on this call (the caller then runs its base attention, bit-identical).

    ``mask`` is the caller's mask (transformers' 4-D format); ``call.causal`` says whether the layer is causal;
    ``split`` reduces the mask (``split_mask``, or a caching wrapper of it); ``base`` computes the caller's own
    attention (B, H, M, D): when a score edit is all there is and it starts at the last few rows (the prompt's last
    row at prefill, the new row at decode), the base runs and only the edited (row, head) entries are recomputed, so
    every other entry is exactly the base's (spec ``paint.md`` §5.3, the torch path).
    Biases add up; blends compose as ``1 - prod(1 - u)``; at most one score edit and one set rescale; observers run
    after the attention (with read-outs only, the caller's base implementation computes the output).
    """
    device = call.query.device.type
    # under autocast, as the model's own attention runs: in its dtype (RoPE's fp32 cos / sin leave q, k in fp32)
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        call.query, call.key, call.value = (x.to(dtype) for x in (call.query, call.key, call.value))
    biases = [_checked_bias(iv, b, call) for iv in interventions if (b := iv.key_bias(call)) is not None]
    edits = [e for iv in interventions if (e := iv.score_edit(call)) is not None]
    blends = [_checked_blend(iv, u, call) for iv in interventions if (u := iv.blend(call)) is not None]
    output_edits = [f for iv in interventions if (f := iv.output_edit(call)) is not None]
    observers = [iv for iv in interventions if iv.observes]
    if len(edits) > 1:
        raise RuntimeError("two interventions edit the scores of one layer; methods that edit scores must claim "
                           "the 'score_edit' resource")
    call.edit = edits[0] if edits else None
    _, _, m, n = call.shape
    key_valid, call.causal, call.mask = split(mask, m, n, call.causal)
    bias = sum(biases[1:], biases[0]) if biases else None
    if key_valid is not None:
        padding = kernels.padding_to_bias(key_valid)
        bias = padding if bias is None else bias + padding
    call.key_bias = bias
    rescales = [r for iv in interventions if (r := iv.set_rescale(call)) is not None]
    if len(rescales) > 1:
        raise RuntimeError("two interventions rescale key sets of one layer; such methods must claim 'score_edit'")
    if not (biases or edits or blends or rescales or output_edits):
        for iv in observers:
            iv.observe(call)
        return None  # nothing changes the output: the caller's base implementation computes it
    blend = None
    if blends:
        keep = torch.ones_like(blends[0], dtype=torch.float32)
        for u in blends:
            keep = keep * (1 - u.float())
        blend = 1 - keep
    common = dict(causal=call.causal, scale=call.scaling, mask=call.mask, softcap=call.softcap, window=call.window,
                  edit=call.edit, dropout=call.dropout)
    if base is not None and call.edit is not None and not (biases or blends or rescales or call.dropout) \
            and m - call.edit.first_row(m, n) <= EDITED_ROWS_OVER_BASE:
        out = _edited_rows_over(base, call)
    elif rescales:
        (key_set, factor), = rescales
        out, _ = kernels.attention_rescaled_set(call.query, call.key, call.value, key_set=key_set, factor=factor,
                                                key_bias=bias, **common)
        if blend is not None:
            out = kernels.soft_identity_blend(out, call.value, blend)
    else:
        out = kernels.attention(call.query, call.key, call.value, key_bias=bias, blend=blend, **common)
    for edit_output in output_edits:
        out = edit_output(out)
    for iv in observers:
        iv.observe(call)
    return out


def _checked_bias(intervention: Intervention, bias, call: AttentionCall) -> torch.Tensor:
    """An intervention's ``key_bias``, checked alone (summed with the padding bias first, a wrong one was read as
    something else: a bool mask as +1 logits) and named: a float tensor that broadcasts to (B, H, N)."""
    b, h, _, n = call.shape
    if not (isinstance(bias, torch.Tensor) and bias.is_floating_point()
            and fits_per_key(tuple(bias.shape), (b, h, n))):
        raise ValueError(f"{type(intervention).__name__}.key_bias returned {_described(bias)}; expected a float "
                         f"tensor that broadcasts to (B, H, N) = {(b, h, n)} (natural-log logits, -inf masks a key)")
    return bias


def _checked_blend(intervention: Intervention, blend, call: AttentionCall) -> torch.Tensor:
    """An intervention's ``blend``: float weights (H,) or (B, H) in [0, 1] (the range is read where the weights are on
    the host, as SoftPAG keeps them: on a GPU the read would wait for the device at every call)."""
    b, h = call.shape[:2]
    if not (isinstance(blend, torch.Tensor) and blend.is_floating_point() and tuple(blend.shape) in ((h,), (b, h))
            and (blend.device.type != "cpu" or bool(((blend >= 0) & (blend <= 1)).all()))):
        raise ValueError(f"{type(intervention).__name__}.blend returned {_described(blend)}; expected float weights "
                         f"(H,) or (B, H) = {(b, h)} in [0, 1]")
    return blend


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor ({str(value.dtype).removeprefix('torch.')}, shape {tuple(value.shape)})"
    return f"a {type(value).__name__}"


def _edited_rows_over(base: Callable, call: AttentionCall) -> torch.Tensor:
    """The caller's attention ``base()`` (B, H, M, D) with the rows and heads that ``call.edit`` changes recomputed
    (explicitly on CPU, by the Triton kernel on CUDA); ``base`` is not run where the edit says that it changes every
    row and head (``every_head_from``: a decode step of an edit on all heads)."""
    edit = call.edit
    _, _, m, n = call.shape
    first = edit.first_row(m, n)
    if first >= m:
        return base()
    mask = call.mask
    tail_mask = None if mask is None else mask[..., first:, :] if mask.shape[-2] > 1 else mask
    tail = kernels.attention(call.query[:, :, first:], call.key, call.value, key_bias=call.key_bias,
                             causal=call.causal, scale=call.scaling, mask=tail_mask, softcap=call.softcap,
                             window=call.window, edit=edit)
    if first == 0 and edit.every_head_from is not None and edit.every_head_from <= n - m:
        return tail
    positions = torch.arange(first, m, device=tail.device) + (n - m)
    if edit.rows_from is None:
        rows = torch.ones(1, m - first, dtype=torch.bool, device=tail.device)
    else:
        rows = positions[None, :] >= edit.rows_from.to(tail.device)[:, None]
    heads = sum((coef != 0).any(dim=-1) for coef in (edit.abs_coef, edit.mul_coef) if coef is not None) > 0
    changed = rows[:, None, :, None] & heads.to(tail.device)[..., None, None]
    base_out = base()
    return torch.cat([base_out[:, :, :first], torch.where(changed, tail, base_out[:, :, first:])], dim=2)


def intervene(handle, interventions: dict[nn.Module, Intervention]) -> None:
    """Add ``interventions`` (attention module -> Intervention) to the handle's model, undone by ``handle.remove()``."""
    if not interventions:
        return
    from .dit_attention import DiTAttentionPatch

    patch_cls = DiTAttentionPatch if handle.adapter.kind == "dit" else AttentionPatch
    patch = patch_cls.acquire(handle.model, handle.adapter)
    for module, intervention in interventions.items():
        patch.add(module, intervention)

    def undo():
        for module, intervention in interventions.items():
            patch.discard(module, intervention)

    handle.on_remove(f"attention on {len(interventions)} layers", undo)


def switch_attention(handle) -> None:
    """Switch the model to nograd's attention implementation with no intervention (attention runs as before, the
    base function called as is), undone by ``handle.remove()``: for a method that acts through hooks alone
    (token dropping). torch.compile does not guard a compiled graph on module hooks added later, but on the
    implementation name: a graph compiled before ``apply`` is retraced, with the hooks, instead of running stale."""
    patch = AttentionPatch.acquire(handle.model, handle.adapter)
    patch.hold(handle)
    handle.on_remove("attention implementation (held for torch.compile)", lambda: patch.release(handle))
