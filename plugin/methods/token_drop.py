"""Staged visual-token dropping inside the decoder: the engine PyramidDrop and FastV share (spec ``pyramiddrop.md``
§1.2-§1.4, §5.2-§5.4).

At each stage boundary ``l_s`` of a prefill, the decoder's visual tokens are ranked by one softmax row: the query of
each row's last prompt token over every visible key (``nograd.kernels.attention_rows``, fp32, the mean over heads),
computed apart from the attention call so any attention implementation keeps working. PyramidDrop scores with the
input norm, Q/K projections and RoPE of layer ``l_s`` itself on its input (the official ``rank_layer =
layer_idx + 1``); FastV with those of layer ``l_s - 1`` on *its* input (the official code reads layer ``K - 1``'s
``output_attentions``). The top ``K_{b,s}`` visual tokens of a row stay, in their original order; text tokens
always stay. The hidden states and the rotary cos/sin are gathered (one ``index_select`` each) into the stage's
shorter sequence, as long as its longest row now is; rows that keep fewer tokens get *left* pad slots (their own pads
dropped, new ones added as needed), so the batch stays rectangular.

Every layer from ``l_1`` on gets, through a forward pre-hook, its stage's hidden states, mask
(``create_causal_mask(..., layer_idx=i)`` from the stage's 2-D padding mask, sized against that layer's own KV
cache), position embeddings and ``position_ids=None`` (a gap in positions would read as a packed sequence, §5.1).
A stage's layers therefore cache only its kept tokens; decode steps reuse the prefill's layouts. Positions:
``"original"`` keeps each kept token's RoPE phase (correct for Qwen2-VL's M-RoPE as well); ``"compact"`` renumbers
the kept tokens contiguously as the official code does (1-D RoPE only). A later forward of
``generate(use_cache=False)`` (``use_cache=False``, the recorded prompt plus generated tokens) reuses the prompt's
keep sets; any other forward that extends the last prompt is a new prompt.

The final norm and ``lm_head`` see the last stage's shorter sequence: ``model(**inputs).logits`` has that length
(the last position is still each row's last token, which is all ``generate()`` reads).

Families: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL / 2.5-VL, Idefics3 / SmolVLM (a Llama decoder; only the
``<image>`` tokens are visual, the ``<fake_token_around_image>``, ``<row_r_col_c>`` and ``<global-img>`` tags are
text and stay), InternVL-hf (a Qwen2 decoder; ``<img>`` ``</img>`` stay) and Mistral3 (a Mistral decoder,
refused by ``check_model`` when its ``sliding_window`` is set; ``[IMG_BREAK]`` ``[IMG_END]`` stay): all with 1-D
RoPE over padding-aware ``position_ids`` that ``generate()`` passes, so both ``positions`` modes hold. Qwen3-VL
(a Qwen3 decoder with interleaved M-RoPE: ``positions="original"`` only) runs when every boundary comes after its
deepstack layers: ``Qwen3VLTextModel.forward`` adds visual features at the full-length image-token positions
(``visual_pos_masks``) to the outputs of layers ``0 .. D - 1``, ``D = len(vision_config.deepstack_visual_indexes)``,
and reads neither ``visual_pos_masks`` nor the features later (``generate()`` passes no pixels at decode steps, so a
decode step adds none). A boundary is the first layer that sees the shorter sequence, so with every boundary
``>= D`` the gather takes layer ``D - 1``'s output or a later one, after every addition on the full sequence;
``check_model`` refuses an earlier boundary, naming the option that places it.

Gemma3 (``LAYER_TYPED``): its decoder interleaves sliding-window and full-attention layers
(``text_config.layer_types``) and hands each layer the mask and the RoPE (one rotary embedding per layer type) of
its type; with ``token_type_ids`` at the prefill, the image tokens of one image attend to each other
bidirectionally. Each stage therefore gets one mask per layer type over its kept sequence, built with transformers'
own functions as ``Gemma3Model`` builds them: full, ``create_causal_mask`` with the image blocks
(``block_sequence_ids``, the prompt's blocks gathered onto the kept slots, pads and later tokens ``-1``); sliding,
``create_causal_mask`` with ``or_mask_function=blockwise_overlay`` and ``and_mask_function=sliding_window_overlay``
(AND(window, OR(causal, block))), or ``create_sliding_window_causal_mask`` when there are no blocks (decode steps,
where Gemma3 passes no ``token_type_ids`` either). Each mask is sized against the stage's first layer of its type
(its own cache length: the default cache's sliding layers keep the last ``sliding_window - 1`` keys of the stage's
shorter sequence), so the window counts the kept tokens, as when they are physically removed. Each layer gets the
cos/sin of its own type, gathered (or, compact, recomputed with that ``layer_type``). The ranking row itself still
scores every real key before ``t*``, not only those in a sliding layer's window (a window could hide every visual
token). ``kv_bytes_saved`` counts, on a sliding layer, only the keys its cache would have held.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
from transformers.masking_utils import (blockwise_overlay, create_causal_mask, create_sliding_window_causal_mask,
                                        sliding_window_overlay)

from .. import kernels
from ..attention import refuse_unsupported_call, switch_attention
from ..forward_inputs import bound_inputs, cache_of, cached_length, embeddings_only
from ..observe import GenerationStarts
from .base import Method
from .drop_schedule import DropSchedule, kv_bytes_saved, paper_flops, prefill_macs, scoring_macs

POSITIONS = ("original", "compact")
LAYER_TYPED = ("gemma3",)
"""Families whose decoder gives each layer the mask and position embeddings of its ``layer_types`` entry."""
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class Layout:
    """One stage's prompt sequence: what each slot holds."""

    index: torch.Tensor
    """(B, n) long: the slot of the previous stage's layout each slot copies."""
    origin: torch.Tensor
    """(B, n) long: the original prompt position each slot holds."""
    valid: torch.Tensor
    """(B, n) bool: the slot holds a real token (not a pad)."""
    visual: torch.Tensor
    """(B, n) bool: the slot holds a visual token."""
    dropped: torch.Tensor
    """(B, L0) long: visual tokens dropped up to this stage at or before each original position (compact RoPE)."""

    @property
    def length(self) -> int:
        return self.valid.shape[1]


@dataclass
class Prompt:
    """The prefill of the current generation: its stages' layouts, built boundary by boundary."""

    input_ids: torch.Tensor
    layouts: list[Layout]
    counts: torch.Tensor
    """(B,) visual tokens per row."""
    blocks: torch.Tensor | None = None
    """(B, L0) long: Gemma3's image block of each prompt position (``-1``: none), from the prefill's
    ``token_type_ids``; None without them (a causal mask throughout, as the model itself)."""


@dataclass
class Pass:
    """One forward of the decoder: what its layers are given, stage by stage."""

    kind: str
    """"prefill" (builds the layouts), "rerun" (no cache: the prompt plus ``extra`` new tokens again) or "decode"."""
    mask2d: torch.Tensor
    """(B, L0 + tokens after the prompt) the model's 2-D padding mask."""
    extra: int = 0
    """Tokens after the prompt in this forward's sequence ("rerun")."""
    position_embeddings: dict | None = None
    """layer type -> the model's own (full-length) position embeddings of that type."""
    position_ids: torch.Tensor | None = None
    scoring_input: tuple | None = None
    """FastV: (hidden states, position embeddings) of the layer before the boundary."""
    stage_inputs: dict | None = None
    """(stage, layer type) -> (mask, position embeddings) for this forward."""


def _flat_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for (B|1, n, ...) ``x`` and (B, m) ``index``: one ``index_select``."""
    b, m = index.shape
    x = x.expand(b, *x.shape[1:])
    rows = torch.arange(b, device=x.device)[:, None] * x.shape[1]
    flat = (rows + index.to(x.device)).reshape(-1)
    return x.reshape(b * x.shape[1], *x.shape[2:]).index_select(0, flat).reshape(b, m, *x.shape[2:])


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, n) ``keep``: the (B, m) gather index that packs each row's kept slots, in order, to the right end,
    and which of its slots are filled (the others are extra left pads, index 0). One host sync, for ``m``."""
    b, n = keep.shape
    counts = keep.sum(dim=1)
    m = int(counts.max())
    dest = torch.where(keep, keep.long().cumsum(dim=1) - 1 + (m - counts)[:, None], m)
    source = torch.arange(n, device=keep.device).expand(b, n)
    index = torch.zeros(b, m + 1, dtype=torch.long, device=keep.device).scatter_(1, dest, source)[:, :m]
    filled = torch.zeros(b, m + 1, dtype=torch.bool, device=keep.device).scatter_(1, dest, keep)[:, :m]
    return index, filled


def top_visual(scores: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: in each row, the ``counts[b]`` visual slots with the highest scores (ties: the earlier slot)."""
    ranked = scores.masked_fill(~visual, -torch.inf).argsort(dim=1, descending=True, stable=True)
    n = scores.shape[1]
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(n, device=scores.device).expand_as(ranked))
    return visual & (rank < counts.to(scores.device)[:, None])


def query_rows(valid: torch.Tensor) -> torch.Tensor:
    """(B,) each row's last real slot: the ranking query t* (the last prompt token under any padding)."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    return torch.where(valid, slots, -1).amax(dim=1)


@torch.no_grad()
def rank_scores(layer: torch.nn.Module, hidden: torch.Tensor, position_embeddings: tuple, valid: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """(B, n) fp32: the head-averaged softmax row of each row's last real token over every real key, computed with
    ``layer``'s input norm, Q/K projections (and Q/K norms) and RoPE (spec §5.4). Only one query row is projected."""
    attn = layer.self_attn
    rotate = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
    b, n, _ = hidden.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    at = query_rows(valid).to(hidden.device)
    x_query = x[torch.arange(b, device=x.device), at][:, None]
    q = attn.q_proj(x_query).view(b, 1, -1, head_dim)
    k = attn.k_proj(x).view(b, n, -1, head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = (t.expand(b, *t.shape[1:]) for t in position_embeddings)
    rows = torch.arange(b, device=cos.device)
    q, _ = rotate(q, q, cos[rows, at][:, None], sin[rows, at][:, None])
    k, _ = rotate(k, k, cos, sin)
    slots = torch.arange(n, device=valid.device)
    visible = valid & (slots[None, :] <= at.to(valid.device)[:, None])
    bias = torch.zeros(b, 1, n, device=q.device).masked_fill(~visible.to(q.device)[:, None, :], -torch.inf)
    probs = kernels.attention_rows(q, k, key_bias=bias, scale=attn.scaling, backend=backend)
    return probs.mean(dim=1)[:, 0]


class TokenDropMethod(Method):
    """Base of the token-dropping methods: subclasses give the schedule and which layer scores a boundary."""

    kinds = ("vlm",)
    families = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl",
                "mistral3", "gemma3")
    resources = ("token_layout",)
    scores_with_previous_layer = False
    """FastV: score with layer ``l_s - 1`` on its input (else layer ``l_s`` on its input, PyramidDrop)."""

    def boundary_option(self) -> str:
        """The option that places the boundaries, named when a model refuses where they fall."""
        return "boundaries"

    def schedule(self) -> DropSchedule:
        raise NotImplementedError

    def supports_assisted_decoding(self) -> bool:
        return False  # the ranking query is the prompt's last token

    def keeps_prompt_state(self) -> bool:
        return True  # the keep sets of the prompt

    def row_schedule(self, n_visual: int) -> DropSchedule:
        """The schedule of a row with ``n_visual`` visual tokens (a token budget solves one per count)."""
        return self.plan

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) the tokens that can be dropped: the image tokens, and the video tokens with ``include_video``
        (spec §5.3: one global top-K over all of a row's visual tokens)."""
        return self.adapter.visual_token_mask(input_ids, video=self.config.include_video)

    def layer_type(self, i: int) -> str:
        """Layer ``i``'s type: its ``layer_types`` entry on a ``LAYER_TYPED`` family, else full attention (every
        other family's layers after the first boundary are full-attention ones, ``check_model``)."""
        if self.adapter.family in LAYER_TYPED:
            return self.adapter.text_config.layer_types[i]
        return FULL

    def _first_of_type(self, stage: int, kind: str) -> int:
        """The stage's first layer of type ``kind``: the one whose cache a mask of that type is sized against."""
        start = self.plan.boundaries[stage - 1]
        end = self.plan.boundaries[stage] if stage < len(self.plan.boundaries) else self.adapter.num_layers
        return next(i for i in range(start, end) if self.layer_type(i) == kind)

    # ---- validation ---------------------------------------------------------------------------------------------
    def check_model(self) -> None:
        schedule = self.schedule()  # raises ValueError naming the option on a bad schedule for this depth
        config = self.adapter.text_config
        first = schedule.boundaries[0] if schedule.boundaries else self.adapter.num_layers
        layer_types = getattr(config, "layer_types", None)
        if self.adapter.family in LAYER_TYPED:  # a mask per layer type, the window counted over each stage
            sliding = []
        elif layer_types is not None:
            sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention" and i >= first]
        else:
            sliding = list(range(first, self.adapter.num_layers)) if getattr(config, "sliding_window", None) else []
        if sliding:
            raise ValueError(f"{self.name}: decoder layers {sliding} use sliding-window attention, whose window would "
                             "count dropped tokens differently; drop only before the first sliding layer or load "
                             "the model without sliding windows")
        rope = getattr(config, "rope_parameters", None) or {}
        if self.config.positions == "compact" and "mrope_section" in rope:
            self.config.invalid("positions", f"'original' on a multimodal-RoPE model ({self.adapter.family}): compact "
                                             "renumbering of 3-D positions is not defined")
        self._check_deepstack(schedule)

    def _check_deepstack(self, schedule: DropSchedule) -> None:
        """Qwen3-VL: every boundary after the deepstack layers (the decoder adds visual features to the outputs of
        its first ``len(vision_config.deepstack_visual_indexes)`` layers, at the full-length image positions)."""
        if self.adapter.family != "qwen3_vl" or not schedule.boundaries:
            return
        vision = getattr(getattr(self.adapter.model, "config", None), "vision_config", None)
        if vision is None:
            raise ValueError(f"{self.name}: the Qwen3-VL decoder alone does not say how many of its layers receive "
                             "deepstack features (vision_config.deepstack_visual_indexes); apply it to the whole "
                             "model")
        deep = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        if schedule.boundaries[0] < deep:
            self.config.invalid(
                self.boundary_option(),
                f"every boundary at layer {deep} or later: Qwen3-VL's deepstack adds visual features at the "
                f"full-length image positions after decoder layers 0..{deep - 1} (vision_config."
                f"deepstack_visual_indexes), and boundary {schedule.boundaries[0]} would drop tokens before the last "
                "addition")

    # ---- attach -------------------------------------------------------------------------------------------------
    def attach(self, handle) -> None:
        self.stats = handle.stats
        self.plan = self.schedule()
        self.prompt: Prompt | None = None
        self.current: Pass | None = None
        handle.stats.update(boundaries=list(self.plan.boundaries), visual_tokens=[], stage_lengths=[], kept=[])
        if not self.plan.boundaries:
            return
        outer = self.adapter.multimodal_model
        self._signature = inspect.signature(outer.forward)
        hooks = [outer.register_forward_pre_hook(self._before_model, with_kwargs=True)]
        if self.adapter.model is not outer:
            hooks.append(self.adapter.model.register_forward_pre_hook(self._refuse_labels, with_kwargs=True))
        layers = self.adapter.decoder_layers
        first = self.plan.boundaries[0]
        if self.scores_with_previous_layer:
            hooks.append(layers[first - 1].register_forward_pre_hook(self._keep_scoring_input, with_kwargs=True))
        for i in range(first, len(layers)):
            hooks.append(layers[i].register_forward_pre_hook(self._stage_hook(i), with_kwargs=True))
        for hook in hooks:
            handle.on_remove(f"{self.name} hook", hook.remove)
        switch_attention(handle)
        self._generation = GenerationStarts(handle)

    def _refuse_labels(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(f"{self.name} drops tokens at inference only: labels (a training loss) are not supported")

    def _before_model(self, module, args, kwargs):
        """H0 (spec §5.2): classify the forward, record the prompt at a prefill."""
        inputs = bound_inputs(self._signature, args, kwargs)
        refuse_unsupported_call(inputs, module.config)  # output_attentions, a fixed-size cache: as every method
        may_rerun = self._generation.may_rerun(inputs)
        input_ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        cached = cached_length(inputs)
        if input_ids is None:
            self.current = None
            if cached == 0:
                raise embeddings_only(self.name, "visual tokens")
            return
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"{self.name} needs a 2-D attention_mask (padding), got shape {tuple(mask.shape)}")
        b, length = input_ids.shape
        mask = torch.ones(b, cached + length, dtype=torch.long, device=input_ids.device) if mask is None else mask
        prompt = self.prompt
        if cached > 0:
            # a chunk of several tokens with visual tokens brings new images; one generated token that happens to
            # be a placeholder id is text to the model (no pixels reach a decode step)
            if prompt is not None and length > 1 and bool(self.visual_mask(input_ids).any()):
                raise NotImplementedError(f"{self.name}: a cached continuation with new images (multi-turn) is not "
                                          "supported; start a new prompt without the cache")
            self.current = Pass("decode", mask) if prompt is not None else None
        elif prompt is not None and may_rerun and self._reruns(prompt, input_ids):  # generate(use_cache=False)
            self.current = Pass("rerun", mask, extra=length - prompt.input_ids.shape[1])
        else:
            self._record_prompt(input_ids, mask, inputs.get("token_type_ids"))

    @staticmethod
    def _reruns(prompt: Prompt, input_ids: torch.Tensor) -> bool:
        old = prompt.input_ids
        return (input_ids.shape[0] == old.shape[0] and input_ids.shape[1] > old.shape[1]
                and bool(torch.equal(input_ids[:, :old.shape[1]], old)))

    def _record_prompt(self, input_ids: torch.Tensor, mask: torch.Tensor, token_type_ids=None) -> None:
        valid = mask.bool()
        visual = self.visual_mask(input_ids) & valid
        counts = visual.sum(dim=1)
        if not bool(counts.any()):  # nothing to drop: the counters say so (not the last image prompt's)
            self.prompt, self.current = None, None
            self.stats.update(visual_tokens=[], stage_lengths=[], kept=[])
            self._record_cost([])
            return
        b, length = input_ids.shape
        zeros = torch.zeros(b, length, dtype=torch.long, device=input_ids.device)
        slots = torch.arange(length, device=input_ids.device).expand(b, length)
        first = Layout(index=slots, origin=slots, valid=valid, visual=visual, dropped=zeros)
        blocks = None
        if token_type_ids is not None and self.adapter.family in LAYER_TYPED:
            blocks = importlib.import_module(type(self.adapter.model).__module__).get_block_sequence_ids_for_mask(
                token_type_ids, device=input_ids.device)
        self.prompt = Prompt(input_ids=input_ids, layouts=[first], counts=counts, blocks=blocks)
        self.current = Pass("prefill", mask)

    # ---- the layer hooks ----------------------------------------------------------------------------------------
    def _keep_scoring_input(self, module, args, kwargs):
        if self.current is not None and self.current.kind == "prefill":
            hidden = args[0] if args else kwargs["hidden_states"]
            self.current.scoring_input = (hidden.detach(), kwargs["position_embeddings"])  # ranked without grad

    def _stage_hook(self, i: int):
        stage = self.plan.stage_of_layer(i)
        boundary = i in self.plan.boundaries
        kind = self.layer_type(i)

        def hook(module, args, kwargs):
            run, prompt = self.current, self.prompt
            if run is None or prompt is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if run.position_embeddings is None:  # the first hooked layer: the model's own inputs, full length
                run.position_embeddings, run.position_ids, run.stage_inputs = {}, kwargs.get("position_ids"), {}
            run.position_embeddings.setdefault(kind, kwargs["position_embeddings"])  # the model's own, this type
            if boundary and run.kind == "prefill":
                self._build_stage(stage, module, hidden, run)
            layout = prompt.layouts[stage]
            if layout is prompt.layouts[0]:
                return None  # nothing dropped yet: the layer runs exactly as the plain model
            if boundary and run.kind != "decode" and layout is not prompt.layouts[stage - 1]:
                hidden = _flat_gather(hidden, self._extended(layout.index, prompt.layouts[stage - 1].length,
                                                             run.extra))
            if (stage, kind) not in run.stage_inputs:
                run.stage_inputs[stage, kind] = self._stage_inputs(stage, kind, hidden, kwargs, run)
            mask, position_embeddings = run.stage_inputs[stage, kind]
            kwargs.update(attention_mask=mask, position_embeddings=position_embeddings, position_ids=None)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    @staticmethod
    def _extended(index: torch.Tensor, previous_length: int, extra: int) -> torch.Tensor:
        """A layout index followed by the ``extra`` tokens after the prompt (a no-cache re-run)."""
        if extra == 0:
            return index
        tail = previous_length + torch.arange(extra, device=index.device)
        return torch.cat([index, tail.expand(index.shape[0], extra)], dim=1)

    def _stage_inputs(self, stage: int, kind: str, hidden: torch.Tensor, kwargs: dict, run: Pass):
        """The stage's attention mask and position embeddings for this forward, for its layers of type ``kind``."""
        layout, prompt_length = self.prompt.layouts[stage], self.prompt.layouts[0].length
        after = run.mask2d[:, prompt_length:]
        mask2d = torch.cat([layout.valid.to(after.dtype), after], dim=1).to(hidden.device)
        config = self.adapter.text_config
        # the cache goes positionally: transformers < 5.24 names it past_key_values
        head = (config, hidden, mask2d, cache_of(kwargs))
        args = dict(position_ids=None, layer_idx=self._first_of_type(stage, kind))
        blocks = self._stage_blocks(layout, hidden, run)
        if kind == SLIDING and blocks is None:
            mask = create_sliding_window_causal_mask(*head, **args)
        elif kind == SLIDING:  # as Gemma3: AND(window, OR(causal, same image block))
            mask = create_causal_mask(*head, **args, or_mask_function=blockwise_overlay(blocks),
                                      and_mask_function=sliding_window_overlay(config.sliding_window))
        else:
            mask = create_causal_mask(*head, **args, **({} if blocks is None else {"block_sequence_ids": blocks}))
        return mask, self._position_embeddings(layout, hidden, run, kind)

    def _stage_blocks(self, layout: Layout, hidden: torch.Tensor, run: Pass) -> torch.Tensor | None:
        """Gemma3, a prefill or a no-cache re-run: the image block of each slot of the stage's sequence (the kept
        tokens of an image keep its block; pads and the tokens after the prompt ``-1``). None otherwise."""
        blocks = self.prompt.blocks
        if blocks is None or run.kind == "decode":
            return None
        kept = _flat_gather(blocks[..., None], layout.origin.to(blocks.device))[..., 0]
        kept = torch.where(layout.valid.to(blocks.device), kept, -1)
        return torch.nn.functional.pad(kept, (0, run.extra), value=-1).to(hidden.device)

    def _position_embeddings(self, layout: Layout, hidden: torch.Tensor, run: Pass, kind: str = FULL):
        """Original mode: each kept token's own cos/sin. Compact mode: RoPE at ``position - dropped before it``."""
        extra = run.extra
        prompt_length = self.prompt.layouts[0].length
        if self.config.positions == "original":
            if run.kind == "decode":
                return run.position_embeddings[kind]
            origin = self._extended(layout.origin, prompt_length, extra)
            return tuple(_flat_gather(t, origin) for t in run.position_embeddings[kind])
        b = layout.valid.shape[0]
        positions = run.position_ids.expand(b, -1).to(layout.dropped.device)
        total = layout.dropped[:, -1:]
        if run.kind == "decode":
            compact_positions = positions - total
        else:
            prompt = _flat_gather(positions[..., None], layout.origin)[..., 0] - _flat_gather(
                layout.dropped[..., None], layout.origin)[..., 0]
            compact_positions = torch.cat([prompt, positions[:, prompt_length:] - total], dim=1)
        rotary = self.adapter.text_model.rotary_emb
        by_type = {"layer_type": kind} if self.adapter.family in LAYER_TYPED else {}
        return rotary(hidden, position_ids=compact_positions.to(hidden.device), **by_type)

    def _build_stage(self, stage: int, layer: torch.nn.Module, hidden: torch.Tensor, run: Pass) -> None:
        """Prefill, at boundary ``l_s``: rank the current visual tokens, keep the top ``K_{b,s}``, record the layout."""
        prompt = self.prompt
        previous = prompt.layouts[stage - 1]
        del prompt.layouts[stage:]
        keep_counts = torch.tensor([self.row_schedule(n).kept_counts(n)[stage] for n in prompt.counts.tolist()],
                                   device=previous.visual.device)
        if bool((previous.visual.sum(dim=1) <= keep_counts).all()):
            prompt.layouts.append(previous)  # nothing to drop at this boundary
            self._record_stats(stage)
            return
        if self.scores_with_previous_layer:
            scoring_hidden, scoring_positions = run.scoring_input
            scoring_layer = self.adapter.decoder_layers[self.plan.boundaries[stage - 1] - 1]
        else:
            scoring_hidden = hidden
            scoring_positions = self._previous_position_embeddings(stage, hidden, run,
                                                                   self.layer_type(self.plan.boundaries[stage - 1]))
            scoring_layer = layer
        scores = rank_scores(scoring_layer, scoring_hidden, scoring_positions, previous.valid.to(hidden.device),
                             self.config.backend).to(previous.visual.device)
        # each row's last prompt token (the ranking query, the slot generate() reads the first new token from) stays
        # where it is a visual token too, within the row's budget: a prompt may end with an image
        last = torch.zeros_like(previous.visual).scatter_(1, query_rows(previous.valid).clamp(min=0)[:, None], True)
        held = previous.visual & last
        kept_visual = top_visual(scores, previous.visual & ~last, keep_counts - held.sum(dim=1)) | held
        # the real text and the kept visual tokens, packed to the right: a row's pad slots go too, so the stage is as
        # long as its longest row now is (a shorter or text-only row no longer holds it at the prompt's length)
        index, filled = compact((previous.valid & ~previous.visual) | kept_visual)
        visual = kept_visual.gather(1, index) & filled
        origin = previous.origin.gather(1, index)
        dropped_now = torch.zeros_like(previous.dropped).scatter_add_(
            1, previous.origin, (previous.visual & ~kept_visual).long())
        prompt.layouts.append(Layout(index=index, origin=origin, valid=previous.valid.gather(1, index) & filled,
                                     visual=visual, dropped=previous.dropped + dropped_now.cumsum(dim=1)))
        self._record_stats(stage)

    def _previous_position_embeddings(self, stage: int, hidden: torch.Tensor, run: Pass, kind: str):
        """The position embeddings of type ``kind`` the layers of stage ``stage - 1`` were (or, without a layer of
        that type, would have been) given: the model's own for stage 0."""
        previous = self.prompt.layouts[stage - 1]
        if previous is self.prompt.layouts[0]:
            return run.position_embeddings[kind]
        if (stage - 1, kind) in run.stage_inputs:
            return run.stage_inputs[stage - 1, kind][1]
        return self._position_embeddings(previous, hidden, run, kind)

    # ---- statistics ---------------------------------------------------------------------------------------------
    def _record_stats(self, stage: int) -> None:
        """After each boundary of a prefill: tokens kept per row and stage, and, at the last one, the counters."""
        prompt = self.prompt
        layouts = prompt.layouts
        self.stats["visual_tokens"] = [[int(layout.visual[b].sum()) for layout in layouts]
                                       for b in range(len(prompt.counts))]
        self.stats["stage_lengths"] = [layout.length for layout in layouts]
        self.stats["kept"] = [[layout.origin[b][layout.visual[b]] for b in range(len(prompt.counts))]
                              for layout in layouts[1:]]
        if stage == len(self.plan.boundaries):
            self._record_cost(prompt.layouts[0].valid.sum(dim=1).tolist(), prompt.layouts[0].length)

    def _record_cost(self, real: list[int], length: int | None = None) -> None:
        """The drop counters of this prompt (``real``: each row's real length, ``length`` the padded one; none for a
        prompt without images)."""
        value_bytes = next(self.adapter.text_model.parameters()).element_size()
        self.stats.update(drop_cost(self.adapter.text_config, self.plan, self.stats["visual_tokens"], real,
                                    value_bytes, length))


def drop_cost(text_config, plan: DropSchedule, visual_tokens: list[list[int]], real_lengths: list[int],
              value_bytes: int, length: int | None = None) -> dict:
    """The counters of one prefill: ``flops`` in the paper's convention (spec §1.5: image tokens only, MACs counted
    once) and ``macs`` over whole sequences plus the ranking rows of the boundaries that drop (spec §5.6; a boundary
    that keeps every token ranks none), each summed over the rows as if each ran alone, before and after; and
    ``kv_bytes_saved``, what the batch's cache holds fewer. ``visual_tokens[b]``: row b's visual tokens per stage;
    ``real_lengths[b]``: its non-pad prompt length; ``length``: the batch's padded prompt length (default: the
    longest row). A stage's rows are padded to its longest remaining row, so the batch's cache saves per layer B
    times ``length`` less that row's length. A sliding-window layer (``text_config.layer_types``) saves only what the
    default cache's sliding layer would have held: its last ``sliding_window - 1`` keys."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv_dim = (getattr(text_config, "num_key_value_heads", None) or heads) * head_dim
    before = after = macs_before = macs_after = 0.0
    for tokens, real in zip(visual_tokens, real_lengths):
        n = tokens[0]
        per_layer = [tokens[plan.stage_of_layer(i)] for i in range(plan.num_layers)]
        before += paper_flops([n] * plan.num_layers, d, m)
        after += paper_flops(per_layer, d, m)
        macs_before += prefill_macs([real] * plan.num_layers, d, kv_dim, m)
        macs_after += prefill_macs([real - n + k for k in per_layer], d, kv_dim, m)
        macs_after += sum(scoring_macs(real - n + tokens[s], d, kv_dim, heads, head_dim)
                          for s in range(len(plan.boundaries)) if tokens[s + 1] < tokens[s])  # ranked to drop
    saved = 0
    if visual_tokens:
        length = max(real_lengths) if length is None else length
        stage_lengths = [length]
        for s in range(1, len(plan.boundaries) + 1):  # a stage that drops nothing keeps the previous layout
            drops = any(tokens[s] < tokens[s - 1] for tokens in visual_tokens)
            longest = max(real - tokens[0] + tokens[s] for tokens, real in zip(visual_tokens, real_lengths))
            stage_lengths.append(longest if drops else stage_lengths[-1])
        saved = len(visual_tokens) * kv_bytes_saved(
            [cached_drop(text_config, i, length, length - stage_lengths[plan.stage_of_layer(i)])
             for i in range(plan.num_layers)], kv_dim, value_bytes)
    return {"flops": {"before": before, "after": after, "ratio": after / before if before else 1.0},
            "macs": {"before": macs_before, "after": macs_after, "ratio": macs_after / macs_before if macs_before
                     else 1.0},
            "kv_bytes_saved": int(saved)}


def cached_drop(text_config, layer: int, real: int, dropped: int) -> int:
    """Keys layer ``layer``'s cache holds fewer for a row of ``real`` prompt tokens with ``dropped`` of them dropped:
    ``dropped``, or on a sliding-window layer ``min(real, w - 1) - min(real - dropped, w - 1)``."""
    layer_types = getattr(text_config, "layer_types", None)
    window = getattr(text_config, "sliding_window", None)
    if not layer_types or not window or layer_types[layer] != SLIDING:
        return dropped
    return min(real, window - 1) - min(real - dropped, window - 1)
