"""The shared attention path on diffusers MM-DiTs: one attention-processor wrapper per attention module.

diffusers' extension point for attention is the per-module processor (``module.set_processor``). nograd wraps the
processor of every attention module of the transformer with ``NogradProcessor``: with no intervention acting on a
call it calls the processor it replaced (bit-identical); otherwise it asks the family adapter for the joint q/k/v
(``adapter.joint_qkv``, the stock projections, norms and RoPE), runs them through the same ``attend`` as the
transformers path, and hands the output back to the adapter for the output projections (``adapter.joint_output``).

The text length of the current forward pass (needed to find the text and image spans of the joint sequence, FLUX
single-stream blocks included) is captured by a pre-hook on the transformer.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .attention import AttentionCall, ModelPatch, attend
from .forward_inputs import bound_inputs


class NogradProcessor(nn.Module):
    """Wraps one module's processor; acts only when the module has interventions that act on the call.

    A module: a processor with weights (an IP-Adapter's) stays a submodule of the model while wrapped (``.to()``,
    ``parameters()``), under ``processor.base``. It shows diffusers the wrapped processor's parameters, so the extra
    arguments the attention module hands its processor (``ip_hidden_states``, ``temb``) still reach it."""

    def __init__(self, base, patch: "DiTAttentionPatch", layer_idx: int):
        super().__init__()
        self.base = base
        self.patch = patch
        self.layer_idx = layer_idx
        signature = inspect.signature(base.__call__)
        self._base_params = set(signature.parameters)

        def call(*args, **kwargs):
            return self(*args, **kwargs)

        call.__signature__ = signature
        self.__dict__["__call__"] = call  # diffusers passes only the arguments named in `processor.__call__`

    FORWARDED = ("_attention_backend", "_parallel_config")
    """The wrapped processor's settings that diffusers sets on every processor that has them
    (``set_attention_backend``, context parallelism): read and written on the wrapped processor, so a choice made
    while a method is attached reaches it and stays after ``remove()``."""

    def __getattr__(self, name: str):
        if name in NogradProcessor.FORWARDED:
            return getattr(self.base, name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in NogradProcessor.FORWARDED:
            setattr(self.base, name, value)
        else:
            super().__setattr__(name, value)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        interventions = self.patch.interventions.get(attn)
        if interventions:
            if kwargs:
                raise NotImplementedError(
                    f"nograd: a method acts on {type(attn).__name__} through the stock joint attention, but its "
                    f"processor {type(self.base).__name__} takes extra arguments ({', '.join(sorted(kwargs))}: an "
                    "IP-Adapter?) that this path would drop; unload it (pipe.unload_ip_adapter()) or remove the "
                    "nograd handle")
            out = self._intervened(attn, interventions, hidden_states, encoder_hidden_states, attention_mask,
                                   image_rotary_emb)
            if out is not None:
                return out
        if "image_rotary_emb" in self._base_params:
            kwargs["image_rotary_emb"] = image_rotary_emb
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def _intervened(self, attn, interventions, hidden_states, encoder_hidden_states, attention_mask, rotary):
        adapter = self.patch.adapter
        query, key, value = adapter.joint_qkv(attn, hidden_states, encoder_hidden_states, rotary)
        batch = self.patch.batch
        text_len = 0
        if "text" in adapter.token_order(attn):
            text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else batch.text_len
        spans = adapter.joint_token_spans(attn, text_len, query.shape[2] - text_len)
        call = AttentionCall(module=attn, layer_idx=self.layer_idx, query=query, key=key, value=value,
                             scaling=query.shape[-1] ** -0.5, batch=batch, causal=False,
                             extras={"spans": spans})
        out = attend(call, interventions, attention_mask, self.patch.split_mask)
        if out is None:
            return None
        return adapter.joint_output(attn, out, hidden_states, encoder_hidden_states)


class DiTAttentionPatch(ModelPatch):
    """nograd's processors on one diffusers transformer."""

    def __init__(self, model: nn.Module, adapter):
        super().__init__(model, adapter)
        self._saved = [(module, module.processor) for module in adapter.attention_modules]
        for index, (module, processor) in enumerate(self._saved):
            module.set_processor(NogradProcessor(processor, self, index))
        self._signature = inspect.signature(model.forward)
        self._hook = model.register_forward_pre_hook(self._capture_batch, with_kwargs=True)

    def _uninstall(self) -> None:
        """Put the original processor objects back where nograd's wrapper still is (a processor the user set since
        stays), and drop the hook."""
        self._hook.remove()
        for module, processor in self._saved:
            if self._wraps(module):
                module.set_processor(processor)

    def _wraps(self, module: nn.Module) -> bool:
        current = getattr(module, "processor", None)
        return isinstance(current, NogradProcessor) and current.patch is self

    def _capture_batch(self, module, args, kwargs):
        replaced = sum(not self._wraps(attn) for attn, _ in self._saved)
        if replaced:
            raise RuntimeError(f"nograd: {replaced} attention processors of {type(module).__name__} were replaced "
                               "after nograd.apply (set_attn_processor?), so the attached method would not run; "
                               "remove the handle, set the processors, then apply the method again")
        text = bound_inputs(self._signature, args, kwargs).get("encoder_hidden_states")
        self.batch.text_len = text.shape[1] if isinstance(text, torch.Tensor) else 0
