"""Decoder-only text LLMs: Llama, Mistral, Qwen2 (and 2.5), Qwen3, Gemma, Gemma2.

All of them keep their decoder layers at ``<Family>Model.layers`` and attention at ``layer.self_attn``, call the
attention function of ``config._attn_implementation`` through transformers' ``AttentionInterface``, and mark the
model inside a ``...ForCausalLM`` as ``.model``. Family-specific facts a method may need:
- Qwen3 applies a per-head RMSNorm to q and k (``q_norm``/``k_norm``) before RoPE; what the attention function
  receives is already normed.
- Gemma2 soft-caps attention logits (``config.attn_logit_softcapping``) and alternates sliding-window layers.
- Mistral and Qwen2 may set ``config.sliding_window``.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter


class DecoderLMAdapter(Adapter):
    kind = "text"

    @property
    def text_model(self) -> nn.Module:
        model = self.model
        # `...ForCausalLM.model` is the decoder; a bare `...Model` is its own decoder.
        return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


class LlamaAdapter(DecoderLMAdapter):
    family = "llama"
    model_classes = ("transformers.models.llama.modeling_llama:LlamaPreTrainedModel",)


class MistralAdapter(DecoderLMAdapter):
    family = "mistral"
    model_classes = ("transformers.models.mistral.modeling_mistral:MistralPreTrainedModel",)


class Qwen2Adapter(DecoderLMAdapter):
    family = "qwen2"
    model_classes = ("transformers.models.qwen2.modeling_qwen2:Qwen2PreTrainedModel",)


class Qwen3Adapter(DecoderLMAdapter):
    family = "qwen3"
    model_classes = ("transformers.models.qwen3.modeling_qwen3:Qwen3PreTrainedModel",)


class GemmaAdapter(DecoderLMAdapter):
    family = "gemma"
    model_classes = (
        "transformers.models.gemma.modeling_gemma:GemmaPreTrainedModel",
        "transformers.models.gemma2.modeling_gemma2:Gemma2PreTrainedModel",
    )


TEXT_ADAPTERS = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, GemmaAdapter)
