"""Text LLM adapters: recognition by class and the facts they report."""

from __future__ import annotations

import pytest
import torch

from checks import TEXT_FAMILIES
from nograd.patches import adapter_for, supported_families
from nograd.patches.text_lm import (Gemma3TextAdapter, GemmaAdapter, LlamaAdapter, MistralAdapter, Qwen2Adapter,
                                   Qwen3Adapter)

EXPECTED = {"llama": LlamaAdapter, "mistral": MistralAdapter, "qwen2": Qwen2Adapter, "qwen3": Qwen3Adapter,
            "gemma": GemmaAdapter, "gemma2": GemmaAdapter, "gemma3_text": Gemma3TextAdapter}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_adapter_facts(build, family):
    model = build(family)
    adapter = adapter_for(model)
    assert type(adapter) is EXPECTED[family] and adapter.kind == "text"
    assert type(adapter_for(model.model)) is EXPECTED[family]
    assert adapter.text_model is model.model
    modules = adapter.attention_modules
    assert len(modules) == adapter.num_layers == model.config.num_hidden_layers
    assert [m.layer_idx for m in modules] == list(range(adapter.num_layers))
    assert all(m is layer.self_attn for m, layer in zip(modules, model.model.layers))
    assert (adapter.num_heads, adapter.num_kv_heads) == (4, 2)
    assert adapter.head_dim == modules[0].head_dim
    assert adapter.attn_implementation == model.config._attn_implementation
    assert adapter.attn_implementation_request("x") == "x"
    ids = torch.randint(0, 128, (2, 5))
    assert [p.numel() for p in adapter.image_token_positions(ids)] == [0, 0]


def test_supported_families_lists_text_families():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text"} <= set(supported_families("text"))


@pytest.mark.parametrize("family, head", [("llama", "ForQuestionAnswering"), ("llama", "ForSequenceClassification"),
                                          ("llama", "ForTokenClassification"),
                                          ("gemma3_text", "ForSequenceClassification")])  # refused before
def test_task_heads_keep_their_decoder_where_the_adapter_finds_it(build, family, head):
    """The task heads of a family are the family: their decoder is ``.model``, or ``.transformer`` (question
    answering; it raised AttributeError): a method acts on it, and ``remove()`` restores it bit for bit."""
    import transformers

    import nograd

    config = build(family).config
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = getattr(transformers, {"llama": "Llama", "gemma3_text": "Gemma3Text"}[family] + head)(config).eval()
    adapter = adapter_for(model)
    assert adapter.family == family and len(adapter.attention_modules) == config.num_hidden_layers
    ids = torch.randint(4, 100, (2, 7))

    def outputs():
        with torch.no_grad():
            out = model(ids)
        return torch.cat([value.flatten() for key, value in out.items() if isinstance(value, torch.Tensor)])

    plain = outputs()
    with nograd.apply(model, "zerotuning", gamma=3.0):
        assert not torch.equal(outputs(), plain)
    assert torch.equal(outputs(), plain)
