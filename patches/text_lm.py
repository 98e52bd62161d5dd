"""Decoder-only text LLMs: Llama, Mistral, Qwen2 (and 2.5), Qwen3, Gemma, Gemma2, Gemma3 (text-only).

All of them keep their decoder layers at ``<Family>Model.layers`` and attention at ``layer.self_attn``, call the
attention function of ``config._attn_implementation`` through transformers' ``AttentionInterface``, and mark the
model inside a ``...ForCausalLM`` as ``.model``. Family-specific facts a method may need:
- Qwen3 applies a per-head RMSNorm to q and k (``q_norm``/``k_norm``) before RoPE; what the attention function
  receives is already normed.
- Gemma2 soft-caps attention logits (``config.attn_logit_softcapping``) and alternates sliding-window layers.
- Mistral and Qwen2 may set ``config.sliding_window``.
- Gemma3 (text) mixes sliding-window and full layers (``config.layer_types``), scales queries by
  ``query_pre_attn_scalar**-0.5`` and applies q/k RMSNorm like Qwen3; no attention soft-capping.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter


class DecoderLMAdapter(Adapter):
    kind = "text"

    @property
    def text_model(self) -> nn.Module:
        """The decoder: ``.model`` of a ``...ForCausalLM`` (and of the sequence / token classification heads),
        ``.transformer`` of a ``...ForQuestionAnswering``; a bare ``...Model`` is its own."""
        model = self.model
        for name in ("model", "transformer"):
            if hasattr(getattr(model, name, None), "layers"):
                return getattr(model, name)
        return model


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


class Gemma3TextAdapter(DecoderLMAdapter):
    """Text-only Gemma3 (``gemma3/modeling_gemma3.py``): ``Gemma3ForCausalLM``, its decoder ``Gemma3TextModel`` and
    its task head ``Gemma3TextForSequenceClassification``.

    The family is ``"gemma3_text"``, transformers' ``model_type`` of ``Gemma3TextConfig``; ``"gemma3"`` is the
    multimodal model (``vlm.Gemma3Adapter``). Both derive from ``Gemma3PreTrainedModel``, so each adapter lists its
    concrete classes instead of the shared base: this one never matches ``Gemma3ForConditionalGeneration`` or
    ``Gemma3Model``, and the VLM adapter never matches ``Gemma3ForCausalLM`` or ``Gemma3TextModel`` (a VLM's own
    ``language_model``, a ``Gemma3TextModel``, is adapted here when passed alone).

    Facts the shared attention path relies on: ``Gemma3Attention`` passes ``scaling=query_pre_attn_scalar**-0.5``
    (not ``head_dim**-0.5``), ``sliding_window=config.sliding_window`` on ``"sliding_attention"`` layers and
    ``None`` on ``"full_attention"`` ones (``config.layer_types``), and no ``softcap`` (``attn_logit_softcapping``
    is unused, unlike Gemma2); each layer type has its own rotary embedding, applied before the attention function.
    ``Gemma3TextModel`` turns the 2-D ``attention_mask`` into a dict ``{layer type: 4-D mask}`` and hands each
    layer its type's mask, so the padding mask is read where ``Gemma3TextModel`` receives it (the default
    ``padding_mask_module``, the decoder).
    """

    family = "gemma3_text"
    model_classes = ("transformers.models.gemma3.modeling_gemma3:Gemma3ForCausalLM",
                     "transformers.models.gemma3.modeling_gemma3:Gemma3TextModel",
                     "transformers.models.gemma3.modeling_gemma3:Gemma3TextForSequenceClassification")


TEXT_ADAPTERS = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, GemmaAdapter, Gemma3TextAdapter)
