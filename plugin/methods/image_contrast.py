"""PAI's image-free logits refine, shared by PAI and PAINT (spec ``paint.md`` §1.3; official ``CFG.py``).

At every forward of the model with an image prompt, a second, image-free copy of the prompt (the same tokens with
the image tokens removed, left-padded again) runs through the plain model with its own KV cache, and the last
position's logits become

    z = gamma * (z_c - z_u) + z_u,   z_c, z_u = log_softmax(with image), log_softmax(image-free)
    z = -inf where z_c < log(cutoff) + max(z_c)          (plausibility cutoff, official 0.1)

with gamma 1.1 in every published PAI / PAINT result. It is a forward hook on the model, so ``generate()`` and
pipelines use it unchanged; during the image-free pass the method's other hooks and edits stand aside.
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import DynamicCache


class ImageFreeContrast:
    """The refine on one model; ``active`` is False while the image-free pass runs (the other parts check it)."""

    def __init__(self, handle, tracker, gamma: float, cutoff: float = 0.1):
        self.tracker = tracker
        self.gamma = gamma
        self.log_cutoff = math.log(cutoff)
        self.active = True
        self._cache = None
        self._mask = None
        model = handle.model
        self.model = model
        self._signature = inspect.signature(model.forward)
        self._cache_arg = "cache" if "cache" in self._signature.parameters else "past_key_values"
        hook = model.register_forward_hook(self._refine, with_kwargs=True)
        handle.on_remove("image-free contrast hook", hook.remove)

    def _refine(self, module, args, kwargs, output):
        prompt = self.tracker.prompt
        if not self.active or prompt is None or getattr(output, "logits", None) is None:
            return None
        inputs = self._signature.bind_partial(*args, **kwargs).arguments
        self.active = False
        try:
            text_logits = self._image_free_logits(inputs, prompt)
        finally:
            self.active = True
        with_image = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
        without = torch.log_softmax(text_logits.float(), dim=-1)
        refined = self.gamma * (with_image - without) + without
        cut = with_image < self.log_cutoff + with_image.amax(dim=-1, keepdim=True)
        output.logits[:, -1] = refined.masked_fill(cut, -math.inf).to(output.logits.dtype)
        return output

    def _image_free_logits(self, inputs, prompt) -> torch.Tensor:
        cache = inputs.get("cache", inputs.get("past_key_values"))
        input_ids = inputs["input_ids"]
        if cache is not None and cache.get_seq_length() > 0 and self._cache is not None:
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

    def _without_image(self, input_ids, attention_mask, prompt):
        """Each row's real tokens minus its image tokens, left-padded again; (ids, mask)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        image = torch.nn.functional.pad(prompt.image, (0, input_ids.shape[1] - prompt.image.shape[1]))
        rows = [ids[keep] for ids, keep in zip(input_ids, real & ~image)]
        length = max(len(row) for row in rows)
        pad = self.model.generation_config.pad_token_id
        ids = input_ids.new_full((len(rows), length), 0 if pad is None else int(pad))
        mask = torch.zeros_like(ids)
        for index, row in enumerate(rows):
            ids[index, length - len(row):] = row
            mask[index, length - len(row):] = 1
        return ids, mask
