"""Tiny decoder-only LLMs: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 text (GQA, 3 layers, vocab 128).

``gemma3_text`` (``Gemma3ForCausalLM``) has sliding layers 0 and 2 with a window of 4 around a full layer 1, so the
window matters on a 10-12 token prompt, and ``query_pre_attn_scalar`` 32 (scaling 32**-0.5, not head_dim**-0.5).
"""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 8}),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {
        "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 32}),
}


def _layer_types(family: str, settings: dict) -> dict:
    """Gemma3 text: sliding and full layers alternate (sliding first) over however many layers are asked for."""
    if family == "gemma3_text" and "layer_types" not in settings:
        layers = settings["num_hidden_layers"]
        settings["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
    return settings


def _builder(family):
    config_cls, model_cls, extra = CONFIGS[family]

    def build(seed: int = 0, attn_implementation: str | None = None, dtype=torch.float32, **overrides):
        config = config_cls(**_layer_types(family, {**COMMON, **extra, **overrides}))
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        return model.eval()

    return build


BUILDERS = {family: _builder(family) for family in CONFIGS}


def tokenizer():
    """An offline word-level tokenizer over the tiny vocabulary: "[PAD]" 0, "<s>" 1, "</s>" 2, "[UNK]" 3, w4..w127."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{f"w{i}": i for i in range(4, COMMON["vocab_size"])}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                   unk_token="[UNK]", padding_side="left")
