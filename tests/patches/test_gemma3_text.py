"""Text-only Gemma3 (``Gemma3ForCausalLM`` / ``Gemma3TextModel``): the ``gemma3_text`` adapter, the shared attention
path on its mixed sliding / full layers, and the text methods (ZeroTuning, ACT) on it.

The tiny model (``nograd.tiny.llms``, ``gemma3_text``) has sliding layers 0 and 2 with a window of 4 around the full
layer 1 and ``query_pre_attn_scalar`` 32; the batch has 12 tokens per row, row 1 left-padded by 3, so the window
hides keys from most queries and the padding sits in front of a windowed prompt.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import nograd
from checks import attention_function, attn_names, same_state, snapshot
from methods.test_zerotuning import post_softmax_reference
from nograd.attention import Intervention, registered_names
from nograd.patches import ADAPTERS, adapter_for, supported_families
from nograd.patches.text_lm import Gemma3TextAdapter
from nograd.patches.vlm import Gemma3Adapter
from test_attention_path import ZeroBias, attach

FAMILY = "gemma3_text"
PAD = 3


@pytest.fixture
def batch():
    """``(input_ids, attention_mask)``: two 12-token prompts, the second left-padded by ``PAD`` pad tokens."""
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    ids[1, PAD] = 1
    return ids, mask


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def windowed_post_softmax_reference(gamma: torch.Tensor):
    """The official ZeroTuning step (eager softmax, the first real key's weight times ``gamma[layer, head]``, rows
    renormalised) with the first real key read as the first key any query sees. ``post_softmax_reference`` reads it
    from the last query row, which on a sliding-window layer is the window's start, not the prompt's first token;
    a query whose window has left the first token keeps its attention (the weight there is 0)."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
        weights = ((query.float() @ key.transpose(-1, -2)) * scaling + attention_mask.float()).softmax(-1)
        first = (attention_mask[:, 0] == 0).any(1).int().argmax(-1)
        scale = torch.ones_like(weights)
        for row, column in enumerate(first.tolist()):
            scale[row, :, :, column] = gamma[module.layer_idx][:, None].float()
        weights = weights * scale
        weights = weights / weights.sum(-1, keepdim=True)
        return (weights @ value).to(query.dtype).transpose(1, 2).contiguous(), weights

    return attention


# ---- the adapter --------------------------------------------------------------------------------------------------
def test_adapter_facts(build):
    model = build(FAMILY)
    adapter = adapter_for(model)
    assert type(adapter) is Gemma3TextAdapter and adapter.family == "gemma3_text" and adapter.kind == "text"
    assert type(adapter_for(model.model)) is Gemma3TextAdapter and adapter_for(model.model).text_model is model.model
    assert adapter.text_model is model.model and adapter.padding_mask_module is model.model
    modules = adapter.attention_modules
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (3, 4, 2, 16)
    assert [m.layer_idx for m in modules] == [0, 1, 2]
    assert all(m is layer.self_attn for m, layer in zip(modules, model.model.layers))
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [m.sliding_window for m in modules] == [4, None, 4]
    assert all(m.scaling == 32 ** -0.5 != adapter.head_dim ** -0.5 for m in modules)
    assert model.config.attn_logit_softcapping is None
    assert adapter.attn_implementation == model.config._attn_implementation
    assert adapter.attn_implementation_request("x") == "x" and adapter.image_token_id is None
    assert "gemma3_text" in supported_families("text") and "gemma3_text" not in supported_families("vlm")
    assert "gemma3" in supported_families("vlm") and "gemma3" not in supported_families("text")


def test_text_and_multimodal_classes_each_match_one_adapter(build):
    """Gemma3PreTrainedModel is shared by the text and the multimodal classes: each class matches exactly one
    adapter, and a VLM's own decoder (a Gemma3TextModel) is adapted as text."""
    from tiny import vlm_families

    causal_lm = build(FAMILY)
    vlm = vlm_families.build("gemma3")
    cases = {causal_lm: Gemma3TextAdapter, causal_lm.model: Gemma3TextAdapter, vlm: Gemma3Adapter,
             vlm.model: Gemma3Adapter, vlm.model.language_model: Gemma3TextAdapter}
    assert [type(m) for m in cases] == [tf.Gemma3ForCausalLM, tf.Gemma3TextModel, tf.Gemma3ForConditionalGeneration,
                                        tf.Gemma3Model, tf.Gemma3TextModel]
    for model, expected in cases.items():
        assert [a for a in ADAPTERS if a.matches(model)] == [expected]
        assert type(adapter_for(model)) is expected
    assert adapter_for(vlm.model.language_model).text_model is vlm.model.language_model


def test_the_window_matters_on_these_prompts(build, batch):
    ids, mask = batch
    narrow, wide = logits(build(FAMILY), ids, mask), logits(build(FAMILY, sliding_window=64), ids, mask)
    real = mask.bool()
    assert (narrow - wide)[:, :4][real[:, :4]].abs().max() < 1e-5  # the first 4 positions see no further back
    assert (narrow - wide)[real].abs().max() > 1e-3


# ---- the shared attention path ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_neutral_path_is_bit_identical(build, batch, attn):
    model = build(FAMILY, attn_implementation=attn)
    ids, mask = batch
    plain, names = logits(model, ids, mask), attn_names(model)
    handle = attach(model, {m: Intervention() for m in adapter_for(model).attention_modules})
    assert model.config._attn_implementation == f"nograd_{attn}"
    assert torch.equal(logits(model, ids, mask), plain)
    handle.remove()
    assert attn_names(model) == names and registered_names() == []
    assert torch.equal(logits(model, ids, mask), plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_bias_through_kernels_equals_base(build, batch, attn):
    """Padding, the window of the sliding layers and the query_pre_attn_scalar scaling survive nograd.kernels."""
    model = build(FAMILY, attn_implementation=attn)
    ids, mask = batch
    plain = logits(model, ids, mask)
    calls = []

    class CountingZeroBias(ZeroBias):
        def key_bias(self, call):
            calls.append((call.layer_idx, call.window, call.scaling, call.softcap))
            return super().key_bias(call)

    with attach(model, {m: CountingZeroBias() for m in adapter_for(model).attention_modules}):
        got = logits(model, ids, mask)
    assert sorted(set(calls)) == [(0, 4, 32 ** -0.5, None), (1, None, 32 ** -0.5, None), (2, 4, 32 ** -0.5, None)]
    torch.testing.assert_close(got[mask.bool()], plain[mask.bool()], atol=1e-5, rtol=0)


# ---- ZeroTuning -------------------------------------------------------------------------------------------------------
def test_zerotuning_targets_first_real_token_and_restores(build, batch):
    model = build(FAMILY)
    ids, mask = batch
    saved, plain, names = snapshot(model), logits(model, ids, mask), attn_names(model)
    real = mask.bool()
    handle = nograd.apply(model, "zerotuning", gamma=3.0)
    got = logits(model, ids, mask)
    assert handle.stats["target_key"].tolist() == [0, PAD], "each row's first real token is targeted"
    assert handle.stats["layers"] == [0, 1, 2]
    assert (got - plain)[real].abs().max() > 1e-3 and (got[1, PAD:] - plain[1, PAD:]).abs().max() > 1e-3
    for row in range(2):
        alone = logits(model, ids[row : row + 1, real[row]])
        torch.testing.assert_close(got[row, real[row]], alone[0], atol=1e-5, rtol=0)
    handle.remove()
    assert same_state(model, saved) and attn_names(model) == names and nograd.attached(model) == []
    assert torch.equal(logits(model, ids, mask), plain)


def test_zerotuning_equals_windowed_reference(build, batch):
    model = build(FAMILY)
    ids, mask = batch
    gamma = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) * 3 + 0.25
    with attention_function(model, windowed_post_softmax_reference(gamma)):
        expected = logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=gamma.tolist()):
        got = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_generate_with_cache_follows_the_reference(build, batch):
    """Decode steps through the KV cache (sliding layers keep only their window) see the same steered attention as a
    full forward of the grown sequence: ZeroTuning on the full layer 1 against ``post_softmax_reference``, and on
    every layer against the windowed reference; cached and uncached generation agree."""
    model = build(FAMILY)
    ids, mask = batch
    steps = 3
    kwargs = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    plain = model.generate(ids, **kwargs).sequences
    grown_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], 1)[:, :-1]
    full_layer_only = torch.ones(3, 4)
    full_layer_only[1] = 3.0
    for options, reference in [({"gamma": 3.0, "layers": [1]}, post_softmax_reference(full_layer_only)),
                               ({"gamma": 3.0}, windowed_post_softmax_reference(torch.full((3, 4), 3.0)))]:
        with nograd.apply(model, "zerotuning", **options) as handle:
            out = model.generate(ids, use_cache=True, **kwargs)
            uncached = model.generate(ids, use_cache=False, **kwargs)
            assert handle.stats["biased_calls"] > 0
        assert torch.equal(out.sequences, uncached.sequences)
        with attention_function(model, reference):
            expected = logits(model, out.sequences[:, :-1], grown_mask)
        for step, scores in enumerate(out.scores):
            torch.testing.assert_close(scores, expected[:, ids.shape[1] - 1 + step], atol=1e-5, rtol=0)
    assert torch.equal(model.generate(ids, **kwargs).sequences, plain)


# ---- ACT --------------------------------------------------------------------------------------------------------------
def test_act_runs_and_restores(build, batch):
    model = build(FAMILY)
    ids, mask = batch
    saved, plain, names = snapshot(model), logits(model, ids, mask), attn_names(model)
    gen = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    plain_generated = model.generate(ids, **gen)
    with nograd.apply(model, "act", layers=(0, None), threshold=0.05) as handle:
        got = logits(model, ids, mask)
        assert handle.stats["layers"] == [0, 1, 2] and handle.stats["sinks"]
        assert model.generate(ids, **gen).shape == plain_generated.shape
    real = mask.bool()
    assert torch.isfinite(got).all() and (got - plain)[real].abs().max() > 1e-4
    assert same_state(model, saved) and attn_names(model) == names and nograd.attached(model) == []
    assert torch.equal(logits(model, ids, mask), plain)
    assert torch.equal(model.generate(ids, **gen), plain_generated)
