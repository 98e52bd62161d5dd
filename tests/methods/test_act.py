"""ACT: neutral beta bit-exact, equality with the official algorithm written out on the dense attention, padding,
head and layer selection, generate with the KV cache."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import attention_function, attn_names, same_state, snapshot



def official_act(layers, heads, beta=0.4, threshold=0.1, first_key_bias=0.0):
    """``llama_modelling_aug.py`` on one unpadded prompt: post-softmax A, per-key mean over the queries that see the
    key, sinks above the threshold minus the first one, then ``beta * A`` on sinks and the rest renormalised.
    ``first_key_bias`` adds a logit bias to key 0 of every layer and head first (ZeroTuning's ``ln gamma``)."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
        logits = (query.float() @ key.transpose(-1, -2)) * scaling + attention_mask.float()
        logits[..., 0] += first_key_bias
        weights = logits.softmax(-1)
        if module.layer_idx in layers:
            n = weights.shape[-1]
            mean = weights.sum(2) / torch.arange(n, 0, -1)
            for h in heads:
                found = (mean[0, h] > threshold).nonzero().flatten().tolist()[1:]
                if not found:
                    continue
                a = weights[0, h]
                sink_mass = a[:, found].sum(-1, keepdim=True)
                others = torch.ones(n, dtype=torch.bool)
                others[found] = False
                calibrated = a.clone()
                calibrated[:, found] = beta * a[:, found]
                calibrated[:, others] = a[:, others] + (1 - beta) * sink_mass * a[:, others] / a[:, others].sum(
                    -1, keepdim=True)
                weights[0, h] = torch.where(sink_mass < 1, calibrated, a)
        out = weights @ value
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@pytest.fixture
def reference_logits():
    def run(model, ids, **options):
        with attention_function(model, official_act(**options)), torch.no_grad():
            return model(ids).logits

    return run


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_beta_one_is_bit_identical(build, padded_batch):
    model = build("llama")
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with nograd.apply(model, "act", beta=1.0) as handle:
        assert torch.equal(logits(model, ids, mask), plain) and handle.stats["layers"] == []


def test_a_prompt_without_sinks_is_bit_identical(build, padded_batch):
    """A threshold no key reaches finds no sink: the attention is the plain one, bit for bit (not a rescale by beta
    of an empty key set, which rounds differently)."""
    model = build("llama")
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    with nograd.apply(model, "act", threshold=0.999) as handle:
        assert torch.equal(logits(model, ids, mask), plain)
        assert handle.stats["layers"] and not any(handle.stats["sinks"].values())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_equals_the_official_algorithm(build, reference_logits, family):
    model = build(family)
    ids = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = reference_logits(model, ids, layers={1, 2}, heads=[0, 2])
    plain = logits(model, ids)
    with nograd.apply(model, "act", layers=(1, None), heads=[0, 2]) as handle:
        got = logits(model, ids)
        assert handle.stats["layers"] == [1, 2] and all(count > 0 for count in handle.stats["sinks"].values())
    assert (got - plain).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_shares_a_model_with_zerotuning(build, reference_logits):
    """Both read keys by position and neither moves them: they stack. The sinks are found on ZeroTuning's biased
    attention (ACT sees the call as it runs), which the reference writes out; gamma=1 leaves ACT's logits exactly."""
    import math

    model = build("llama")
    ids = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = reference_logits(model, ids, layers={1, 2}, heads=[0, 2], first_key_bias=math.log(1.5))
    plain = logits(model, ids)
    with nograd.apply(model, "act", layers=(1, None), heads=[0, 2]):
        act_alone = logits(model, ids)
        with nograd.apply(model, "zerotuning", gamma=1.0):
            assert torch.equal(logits(model, ids), act_alone)
        zerotuning = nograd.apply(model, "zerotuning", gamma=1.5)
        both = logits(model, ids)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
    act = nograd.apply(model, "act", layers=(1, None), heads=[0, 2])  # the other order, and ACT removed first
    assert torch.equal(logits(model, ids), both)
    act.remove()
    zerotuning.remove()
    assert nograd.attached(model) == [] and torch.equal(logits(model, ids), plain)


def test_per_layer_head_table(build, reference_logits):
    model = build("llama")
    ids = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with nograd.apply(model, "act", layers=(0, None), heads={1: [0, 2], 2: [0, 2]}) as handle:
        got = logits(model, ids)
        assert handle.stats["layers"] == [1, 2]
    torch.testing.assert_close(got, reference_logits(model, ids, layers={1, 2}, heads=[0, 2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, attn", [("llama", None), ("gemma2", "eager")])
def test_left_padded_rows_equal_prompts_alone(build, padded_batch, family, attn):
    """Also on sliding-window layers under eager attention, whose float masks write a hidden key as the dtype's
    minimum: a pad query row sees nothing, so it adds no attention to any key's mean. (Gemma2's window of 8 holds the
    padded row's 7 tokens; a window shorter than a left-padded row counts its pads, in the plain model too.)"""
    model = build(family)
    if attn is not None:
        model.set_attn_implementation(attn)
    ids, mask = padded_batch
    with nograd.apply(model, "act", layers=(0, None)):
        batch = logits(model, ids, mask)
        for row in range(2):
            real = mask[row].bool()
            torch.testing.assert_close(batch[row, real], logits(model, ids[row : row + 1, real])[0], atol=1e-5,
                                       rtol=0)


@pytest.mark.parametrize("family, attn", [("llama", None), ("gemma2", "eager")])
def test_right_padded_rows_equal_prompts_alone(family, attn):
    """The pad queries at the end of a right-padded row see the real keys; they are left out of each key's mean
    (they moved the shorter row's sinks: |dlogit| 0.16 on this model)."""
    model, tokenizer = nograd.tiny.llm(family=family)
    if attn is not None:
        model.set_attn_implementation(attn)
    tokenizer.padding_side = "right"
    prompts = ["Hi there, France", "The capital of France is"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with nograd.apply(model, "act", layers=(0, None)) as handle:
        padded = logits(model, batch["input_ids"], batch["attention_mask"])
        assert handle.stats["sinks"][0] > 0
        for row, prompt in enumerate(prompts):
            alone = logits(model, tokenizer(prompt, return_tensors="pt")["input_ids"])[0]
            torch.testing.assert_close(padded[row, : alone.shape[0]], alone, atol=1e-5, rtol=0)


def test_training_on_a_left_padded_batch_has_finite_gradients(build, padded_batch):
    """A pad query sees no key; under autograd its rows must give zero gradients, not NaN in every parameter."""
    model = build("llama")
    ids, mask = padded_batch
    model.train()
    try:
        with nograd.apply(model, "act", layers=(0, None), threshold=0.05) as handle:
            loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            assert sum(handle.stats["sinks"].values()) > 0  # the calibration ran
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_generate_keeps_prefill_sinks_and_restores(build, padded_batch):
    model = build("qwen2")
    ids, mask = padded_batch
    names, saved = attn_names(model), snapshot(model)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kwargs)
    with nograd.apply(model, "act", layers=(0, None)) as handle:
        steered = model.generate(ids, **kwargs)
        assert handle.stats["sinks"]
    assert steered.shape == plain.shape
    assert attn_names(model) == names and same_state(model, saved)
    assert torch.equal(model.generate(ids, **kwargs), plain)


def test_act_on_a_vlm(build):
    from tiny.vlm import make_inputs

    model = build("llava")
    inputs = make_inputs("llava", model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "act", layers=(0, None)):
        with torch.no_grad():
            steered = model(**inputs).logits
    assert (steered - plain)[inputs["attention_mask"].bool()].abs().max() > 1e-4


@pytest.mark.parametrize("options, words", [
    ({"beta": -1}, ["beta", "[0, 1]"]),
    ({"beta": 2.0}, ["beta", "[0, 1]", "turn negative"]),  # beta s > 1 made the other keys' weights negative
    ({"threshold": 1.5}, ["threshold", "(0, 1)"]),
    ({"heads": [9]}, ["heads", "0..3"]),
    ({"heads": {7: [0]}}, ["heads", "layer indices", "0..2"]),
    ({"layers": (1, 3), "heads": {0: [1], 2: [0]}}, ["heads", "calibrated layers 1..2"]),  # layer 0 not calibrated
    ({"layers": (0, 2), "heads": {2: [0]}}, ["heads", "calibrated layers 0..1"]),
    ({"heads": "all"}, ["heads"]),
    ({"heads": {}}, ["heads", "at least one head"]),  # it calibrated nothing, silently
    ({"heads": []}, ["heads", "at least one head"]),
    ({"heads": {1: []}}, ["heads", "at least one head"]),
])
def test_bad_options(build, options, words):
    model = build("llama")
    with pytest.raises((ValueError, TypeError)) as info:
        nograd.apply(model, "act", **options)
    assert all(word in str(info.value) for word in words) and nograd.attached(model) == []


def test_a_sliding_layer_past_one_block_of_queries():
    """CPU reweights 256 query rows at a time; a sliding-window layer's float mask arrives without the causal flag,
    and each block must keep its rows' own window (the rows of all but the last block read the wrong keys: 0.79).
    beta 0.999 moves the logits only slightly."""
    model, tokenizer = nograd.tiny.llm(layers=1, family="gemma2")
    ids = tokenizer(["abcdefghij" * 40], return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        plain = model(ids).logits
        with nograd.apply(model, "act", beta=0.999, threshold=0.01, layers=(0, 1)) as handle:
            calibrated = model(ids).logits
    assert handle.stats["sinks"][0] > 0
    torch.testing.assert_close(calibrated, plain, atol=5e-3, rtol=0)
