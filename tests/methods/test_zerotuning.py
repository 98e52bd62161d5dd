"""ZeroTuning: neutral setting bit-exact, equality with an independent post-softmax reference, padding, cache."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import attention_function, same_state, snapshot

REFERENCE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]  # full causal attention in every layer


def post_softmax_reference(gamma: torch.Tensor):
    """The official algorithm, written independently: eager attention, then multiply the weight of each row's first
    real key by gamma[layer, head] and renormalise (``ZeroTuning_Attention`` in the official modelling_llama.py)."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        logits = (query.float() @ key.float().transpose(-1, -2)) * scaling + attention_mask.float()
        weights = logits.softmax(-1)
        first = (attention_mask[:, 0, -1, :] == 0).int().argmax(-1)
        scale = torch.ones_like(weights)
        for row, column in enumerate(first.tolist()):
            scale[row, :, :, column] = gamma[module.layer_idx][:, None].float()
        weights = weights * scale
        weights = weights / weights.sum(-1, keepdim=True)
        weights = torch.nn.functional.dropout(weights, p=dropout)  # training: as transformers' eager attention
        out = weights @ value.float()
        return out.to(query.dtype).transpose(1, 2).contiguous(), weights

    return attention


@pytest.fixture
def reference_logits():
    """``reference_logits(model, gamma_table, ids, mask)``: logits of ``model`` under the post-softmax reference."""

    def run(model, gamma, ids, mask):
        with attention_function(model, post_softmax_reference(gamma)), torch.no_grad():
            return model(ids, attention_mask=mask).logits

    return run


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_gamma_one_is_bit_identical(build, padded_batch, family):
    model = build(family)
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=1.0) as handle:
        assert torch.equal(logits(model, ids, mask), plain)
        assert handle.stats["heads_touched"] == 0


def test_training_applies_attention_dropout_as_the_reference(build, padded_batch):
    """In training the layers nograd computes apply the model's attention dropout (they ran without it): the same
    seed gives the reference's dropout masks, and so its logits."""
    model = build("llama", attention_dropout=0.3).train()
    ids, mask = padded_batch
    gamma = torch.full((model.config.num_hidden_layers, model.config.num_attention_heads), 2.5)

    def seeded(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits

    with attention_function(model, post_softmax_reference(gamma)):
        expected = seeded(0)
    with nograd.apply(model, "zerotuning", gamma=2.5):
        got, other_seed = seeded(0), seeded(1)
    real = mask.bool()
    assert not torch.equal(got, other_seed)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_equals_post_softmax_reference(build, padded_batch, reference_logits, family):
    model = build(family)
    ids, mask = padded_batch
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    gamma = torch.rand(layers, heads, generator=torch.Generator().manual_seed(0)) * 3 + 0.25
    expected = reference_logits(model, gamma, ids, mask)
    plain = logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=gamma.tolist()):
        got = logits(model, ids, mask)
    real = mask.bool()
    assert (got - plain)[real].abs().max() > 1e-3, "the method must change the outputs"
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_layer_and_head_selection_equals_reference(build, padded_batch, reference_logits):
    model = build("llama")
    ids, mask = padded_batch
    gamma = torch.ones(3, 4)
    gamma[1, [0, 2]] = 0.5
    expected = reference_logits(model, gamma, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=0.5, layers=[1], heads=[0, 2]) as handle:
        got = logits(model, ids, mask)
        assert handle.stats["layers"] == [1] and handle.stats["heads_touched"] == 2
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_per_layer_gamma_equals_table(build, padded_batch):
    model = build("qwen2")
    ids, mask = padded_batch
    with nograd.apply(model, "zerotuning", gamma=[2.0, 1.0, 0.5]) as handle:
        per_layer = logits(model, ids, mask)
        assert handle.stats["layers"] == [0, 2]
    table = [[2.0] * 4, [1.0] * 4, [0.5] * 4]
    with nograd.apply(model, "zerotuning", gamma=table):
        assert torch.equal(logits(model, ids, mask), per_layer)


def test_left_padded_rows_equal_prompts_alone(build, padded_batch):
    model = build("llama")
    ids, mask = padded_batch
    with nograd.apply(model, "zerotuning", gamma=3.0) as handle:
        batch = logits(model, ids, mask)
        assert handle.stats["target_key"].tolist() == [0, 3], "the first real token of each row is targeted"
        for row in range(2):
            real = mask[row].bool()
            alone = logits(model, ids[row : row + 1, real])
            torch.testing.assert_close(batch[row, real], alone[0], atol=1e-5, rtol=0)


def test_official_column_zero_would_miss_padded_rows(build, padded_batch):
    """The fix the spec calls out: a padded row is changed by the method (column 0 there is a pad key)."""
    model = build("llama")
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=3.0):
        got = logits(model, ids, mask)
    assert (got[1, 3:] - plain[1, 3:]).abs().max() > 1e-3


def test_key_range_target(build, padded_batch, reference_logits):
    model = build("llama")
    ids, mask = padded_batch
    with nograd.apply(model, "zerotuning", gamma=2.0, target=(0, 1)):
        first_token = logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=2.0):
        assert torch.equal(logits(model, ids, mask), first_token)
    with nograd.apply(model, "zerotuning", gamma=2.0, target=(1, 3)) as handle:
        shifted = logits(model, ids, mask)
        assert handle.stats["target_key"].tolist() == [1, 4]  # each row's first biased key: its first real token + 1
    assert (shifted - first_token)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_with_cache_equals_without(build, padded_batch, family):
    model = build(family)
    ids, mask = padded_batch
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kwargs)
    with nograd.apply(model, "zerotuning", gamma=3.0) as handle:
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        assert handle.stats["biased_calls"] > 0
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain) or family == "gemma2"  # tiny random models may agree on argmax
    assert torch.equal(model.generate(ids, **kwargs), plain)


def test_generate_scores_follow_the_reference(build, padded_batch, reference_logits):
    """Decode steps with the KV cache see the same biased attention as a full forward of the grown sequence."""
    model = build("llama")
    ids, mask = padded_batch
    gamma = 3.0
    with nograd.apply(model, "zerotuning", gamma=gamma):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    grown = out.sequences
    grown_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    expected = reference_logits(model, torch.full((3, 4), gamma), grown[:, :-1], grown_mask[:, :-1])
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, expected[:, ids.shape[1] - 1 + step], atol=1e-5, rtol=0)


def test_bf16_runs_and_restores(build, padded_batch):
    model = build("llama", dtype=torch.bfloat16)
    ids, mask = padded_batch
    saved, plain = snapshot(model), logits(model, ids, mask)
    with nograd.apply(model, "zerotuning", gamma=2.0):
        got = logits(model, ids, mask)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert not torch.equal(got, plain)
    assert torch.equal(logits(model, ids, mask), plain) and same_state(model, saved)


def test_bf16_close_to_fp32(build, padded_batch):
    ids, mask = padded_batch
    full, half = build("llama"), build("llama", dtype=torch.bfloat16)
    with nograd.apply(full, "zerotuning", gamma=2.0), nograd.apply(half, "zerotuning", gamma=2.0):
        diff = (logits(full, ids, mask) - logits(half, ids, mask).float())[mask.bool()].abs().max()
    assert diff < 0.1


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"gamma": 0}, ValueError, ["gamma", "> 0"]),
        ({"gamma": float("nan")}, ValueError, ["gamma"]),
        ({"gamma": "big"}, TypeError, ["gamma"]),
        ({"gamma": [[1.0, 2.0]]}, ValueError, ["gamma", "shape"]),
        ({"layers": [7]}, ValueError, ["layers", "0..2"]),
        ({"heads": [-1]}, ValueError, ["heads"]),
        ({"target": (3, 1)}, ValueError, ["target", "start < end"]),
        ({"gama": 2.0}, TypeError, ["gama", "did you mean 'gamma'"]),
    ],
)
def test_bad_options_raise_and_leave_model_untouched(build, padded_batch, options, error, words):
    model = build("llama")
    ids, mask = padded_batch
    saved, plain, name = snapshot(model), logits(model, ids, mask), model.config._attn_implementation
    with pytest.raises(error) as info:
        nograd.apply(model, "zerotuning", **options)
    for word in words:
        assert word in str(info.value)
    assert same_state(model, saved) and model.config._attn_implementation == name
    assert torch.equal(logits(model, ids, mask), plain) and nograd.attached(model) == []


def test_config_has_defaults_and_is_frozen(build):
    model = build("llama")
    with nograd.apply(model, "zerotuning") as handle:
        assert handle.config.gamma == 4.0 and handle.config.layers is None and handle.config.target == "first_token"
        with pytest.raises(AttributeError):
            handle.config.gamma = 2.0


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_outputs_do_not_depend_on_the_kernel_backend(build, padded_batch, backend):
    from nograd import kernels

    if backend == "triton":
        pytest.importorskip("triton")
    model = build("qwen2")
    ids, mask = padded_batch
    with nograd.apply(model, "zerotuning", gamma=3.0):
        default = logits(model, ids, mask)
        with kernels.use_backend(backend):
            other = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(other[real], default[real], atol=1e-5, rtol=0)


VLM_FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_switches_only_the_text_stack_and_restores_every_name(build, family):
    from checks import attn_names
    from tiny.vlm import make_inputs

    model = build(family)
    inputs = make_inputs(family, model)
    names, saved = attn_names(model), snapshot(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "zerotuning", gamma=3.0) as handle:
        switched = attn_names(model)
        changed = {key for key in names if switched[key] != names[key]}
        assert changed and all(key.endswith("text_config") for key in changed)
        assert all(switched[key].startswith("nograd_") for key in changed)
        with torch.no_grad():
            steered = model(**inputs).logits
        real = inputs["attention_mask"].bool()
        assert (steered - plain)[real].abs().max() > 1e-4
        assert handle.stats["target_key"].tolist()[1] > 0, "row 1 is left-padded: its first real token is later"
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert attn_names(model) == names and same_state(model, saved)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


def test_the_initial_keys_are_found_per_forward(build):
    """The initial keys are found once per forward and shared by its layers: a forward of another batch size, or
    with the same mask tensor padded in place (a reused buffer), finds its own, with a fresh handle's logits."""
    model = build("llama")
    one, three = torch.randint(4, 100, (1, 7)), torch.randint(4, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    with nograd.apply(model, "zerotuning", gamma=2.0) as handle:
        logits(model, one)
        after = logits(model, three)
        assert handle.stats["target_key"].tolist() == [0, 0, 0]
        logits(model, three, mask)
        mask[1, :3] = 0
        padded = logits(model, three, mask)
        assert handle.stats["target_key"].tolist() == [0, 3, 0]
    with nograd.apply(model, "zerotuning", gamma=2.0):
        assert torch.equal(after, logits(model, three)) and torch.equal(padded, logits(model, three, mask))
