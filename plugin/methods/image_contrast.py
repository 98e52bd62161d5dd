"""PAI's image-free logits refine, shared by PAI and PAINT (spec ``paint.md`` §1.3, §5.5; official ``CFG.py``).

At every forward of the model with an image prompt, a second, image-free copy of the prompt (the same tokens with
the visual tokens, image and video, removed, left-padded again) runs through the plain model with its own KV cache,
and the last position's logits of each row with image tokens become

    z = gamma * (z_c - z_u) + z_u,   z_c, z_u = log_softmax(with image), log_softmax(image-free)
    z = -inf where z_c < log(cutoff) + max(z_c)          (plausibility cutoff, official 0.1)

with gamma 1.1 in every published PAI / PAINT result; rows without image tokens keep the model's logits. Inside
``generate()`` the refine is a logits processor after the generation config's own (the official ``CFGLogits`` is a
custom ``logits_processor``, which transformers runs after repetition penalties and n-gram bans and before the
sampling warpers), so ``z_c`` is the scores those processors left; a forward outside ``generate()`` gets its logits
refined by a forward hook. During the image-free pass the method's other hooks and edits stand aside. A pre-hook
starts the image-free cache afresh at every prefill (a forward on an empty or no KV cache), and the model's
``_reorder_cache`` (which beam search calls) carries it along when the beams are re-ranked.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from ..forward_inputs import bound_inputs, cache_of
from ..observe import shadow_method


class ImageFreeContrast:
    """The refine on one model; ``active`` is False while the image-free pass runs (the other parts check it)."""

    def __init__(self, handle, tracker, gamma: float, cutoff: float = 0.1):
        self.tracker = tracker
        self.gamma = gamma
        self.log_cutoff = math.log(cutoff)
        self.active = True
        self._cache = None
        """The image-free pass's KV cache for the current generation (None: the next forward is a prefill)."""
        self._mask = None
        model = handle.model
        self.model = model
        self._signature = inspect.signature(model.forward)
        self._cache_arg = "cache" if "cache" in self._signature.parameters else "past_key_values"
        self._generating = False
        self._pending = None
        """(image-free log-probabilities, rows with an image) of the last forward, for the ``generate()`` processor."""
        start = model.register_forward_pre_hook(self._start, with_kwargs=True)
        hook = model.register_forward_hook(self._refine, with_kwargs=True)
        handle.on_remove("image-free contrast hooks", lambda: (start.remove(), hook.remove()))
        handle.on_remove("image-free contrast cache", self._forget)
        handle.on_remove("image-free contrast beam reorder", self._follow_beams(model))
        if hasattr(model, "generate"):
            handle.on_remove("image-free contrast processor", shadow_method(model, "generate", self._with_processor))

    def _with_processor(self, generate):
        """``generate`` with the refine appended to the caller's ``logits_processor`` list."""
        signature = inspect.signature(generate)

        def generating(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            bound.arguments["logits_processor"] = LogitsProcessorList(
                [*(bound.arguments.get("logits_processor") or []), ImageFreeRefine(self)])
            outer, self._generating, self._pending = self._generating, True, None
            try:
                return generate(*bound.args, **bound.kwargs)
            finally:
                self._generating, self._pending = outer, None

        return generating

    def _start(self, module, args, kwargs):
        """At a prefill, drop the last generation's image-free cache."""
        if not self.active:
            return
        cache = cache_of(bound_inputs(self._signature, args, kwargs))
        if cache is None or cache.get_seq_length() == 0:
            self._forget()

    def _with_reorder(self, reorder):
        """The model's ``_reorder_cache`` (how ``generate()``'s beam search re-ranks the beams' cache, where the
        model has one, else ``cache.reorder_cache``) that re-ranks the image-free cache too."""

        def reorder_cache(cache, beam_idx):
            if reorder is not None:
                cache = reorder(cache, beam_idx)
            else:
                cache.reorder_cache(beam_idx)
            if self._cache is not None:
                self._cache.reorder_cache(beam_idx)
                self._mask = self._mask[beam_idx.to(self._mask.device)]
            return cache

        return reorder_cache

    def _follow_beams(self, model) -> Callable[[], None]:
        """Install ``_with_reorder`` as the model's ``_reorder_cache`` (nothing on the caches, which the user may keep
        and copy); returns the undo."""
        if hasattr(model, "_reorder_cache"):
            return shadow_method(model, "_reorder_cache", self._with_reorder)
        object.__setattr__(model, "_reorder_cache", self._with_reorder(None))
        return lambda: vars(model).pop("_reorder_cache", None)

    def _forget(self) -> None:
        """Drop the image-free cache."""
        self._cache = self._mask = None

    def _refine(self, module, args, kwargs, output):
        if not self.active:
            return None
        prompt, self._pending = self.tracker.refined, None
        inputs = bound_inputs(self._signature, args, kwargs)
        all_logits = self._logits(output, inputs)
        if prompt is None or all_logits is None:
            return None
        self.active = False
        try:
            text_logits = self._image_free_logits(inputs, prompt)
        finally:
            self.active = True
        logits = all_logits[:, -1]
        without = torch.log_softmax(text_logits.float(), dim=-1).to(logits.device)
        has_image = self._visual(prompt).any(dim=1, keepdim=True).to(logits.device)
        if self._generating:  # the processor refines the scores generate() makes of these logits
            self._pending = (without, has_image)
            return None
        all_logits[:, -1] = self.refine(logits, without, has_image)
        return output

    @staticmethod
    def _logits(output, inputs: dict) -> torch.Tensor | None:
        """The forward's logits (B, T, V): ``output.logits``, or in a ``return_dict=False`` tuple the first entry
        after the loss (there when ``labels`` were given)."""
        if isinstance(output, tuple):
            at = 1 if inputs.get("labels") is not None else 0
            return output[at] if len(output) > at and isinstance(output[at], torch.Tensor) else None
        return getattr(output, "logits", None)

    def refine(self, scores: torch.Tensor, without: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """``scores`` (B, V) with the image refined against ``without`` (B, V) image-free log-probabilities, in the
        rows ``has_image`` (B, 1); the other rows as they are."""
        with_image = torch.log_softmax(scores.float(), dim=-1)
        refined = self.gamma * (with_image - without) + without
        cut = with_image < self.log_cutoff + with_image.amax(dim=-1, keepdim=True)
        return torch.where(has_image, refined.masked_fill(cut, -math.inf), scores.float()).to(scores.dtype)

    def _image_free_logits(self, inputs, prompt) -> torch.Tensor:
        input_ids = inputs["input_ids"]
        if self._cache is not None:  # a decode step of the current generation
            new_ids = input_ids
            self._mask = torch.cat([self._mask, self._mask.new_ones(new_ids.shape)], dim=1)
        else:  # a prefill, or a forward without KV cache: the whole sequence again
            new_ids, self._mask = self._without_image(input_ids, inputs.get("attention_mask"), prompt)
            self._cache = DynamicCache()
        extra = {"mm_token_type_ids": torch.zeros_like(new_ids)} if "mm_token_type_ids" in self._signature.parameters \
            else {}
        # Qwen-VL models keep the image prompt's M-RoPE offsets (``rope_deltas``) and, on a forward with a KV cache
        # and no position_ids, build positions from them and the whole attention mask: wrong for the image-free
        # copy (and of the wrong length). Without them a text-only forward counts positions on from its cache.
        holder = getattr(self.model, "model", self.model)
        deltas = getattr(holder, "rope_deltas", None)
        if deltas is not None:
            holder.rope_deltas = None
        try:
            with torch.no_grad():
                out = self.model(input_ids=new_ids, attention_mask=self._mask, use_cache=True,
                                 **{self._cache_arg: self._cache}, **extra)
        finally:
            if deltas is not None:
                holder.rope_deltas = deltas
        return out.logits[:, -1]

    def _visual(self, prompt) -> torch.Tensor:
        """(B, T) all of the prompt's visual tokens, image and video, whatever the method edits (PAINT: images
        only): the image-free pass gets no pixels, so it leaves out every one of them."""
        return self.tracker.adapter.visual_token_mask(prompt.input_ids) & prompt.real

    def _without_image(self, input_ids, attention_mask, prompt):
        """Each row's real tokens minus its visual (image and video) tokens and the prompt's tokens that frame them
        where the config names those (``visual_marker_ids``: the prompt the processor writes without the image on
        Qwen-VL), left-padded again; (ids, mask)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        markers = self.tracker.adapter.visual_marker_ids
        visual = self._visual(prompt)
        if markers:
            visual = visual | (torch.isin(prompt.input_ids, torch.tensor(markers, device=prompt.input_ids.device))
                               & prompt.real)
        visual = torch.nn.functional.pad(visual, (0, input_ids.shape[1] - visual.shape[1]))
        rows = [ids[keep] for ids, keep in zip(input_ids, real & ~visual)]
        length = max(len(row) for row in rows)
        pad = self.model.generation_config.pad_token_id
        ids = input_ids.new_full((len(rows), length), 0 if pad is None else int(pad))
        mask = torch.zeros_like(ids)
        for index, row in enumerate(rows):
            ids[index, length - len(row):] = row
            mask[index, length - len(row):] = 1
        return ids, mask


class ImageFreeRefine(LogitsProcessor):
    """The refine as a logits processor appended to ``generate()``'s (after the generation config's and the
    caller's): the scores of the forward that just ran, against its image-free pass."""

    def __init__(self, contrast: ImageFreeContrast):
        self.contrast = contrast

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pending, self.contrast._pending = self.contrast._pending, None
        if pending is None:  # a forward without an image prompt
            return scores
        without, has_image = pending
        return self.contrast.refine(scores, without.to(scores.device), has_image.to(scores.device))
