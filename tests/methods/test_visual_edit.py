"""PAI and ClearSight: neutral settings bit-exact, equality with independent dense re-implementations of the
official edits, rows and layers touched, cache consistency, batch with left padding, restore."""

from __future__ import annotations


import pytest
import torch

import nograd
from checks import assert_refine_is_written_out, attention_function, attn_names, host_reads, same_state, snapshot
from tiny.vlm import IMAGE, VIDEO, VIDEO_FAMILIES, make_inputs, make_video_inputs

FAMILIES = ["llava", "qwen2_vl", "llava_onevision"]


def official_edit(image, system, prompt_end, image_end, layers, alpha=0.0, enhance=1.0, suppress=1.0, first_real=None,
                  first_key_bias=0.0):
    """Dense eager attention with the official edits written out (and ``first_key_bias``, ZeroTuning's ``ln gamma``,
    on each row's first real key ``first_real`` in every layer).

    PAI (``llama_new_forward``): after the mask add, on the rows from the prompt's last token on,
    ``s + alpha * |s|`` on image keys. ClearSight (``AttnAdapter``): on the rows after the image, the raw logits of
    image keys times ``enhance`` and of system keys times ``suppress``, then the mask.
    """

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
        n, m = key.shape[2], query.shape[2]
        raw = (query.float() @ key.transpose(-1, -2)) * scaling
        if module.layer_idx in layers:
            rows = torch.arange(m) + n - m
            keys_image = torch.nn.functional.pad(image, (0, n - image.shape[1]))[:, None, None, :]
            keys_system = torch.nn.functional.pad(system, (0, n - system.shape[1]))[:, None, None, :]
            after_image = (rows[None, :] >= image_end[:, None])[:, None, :, None]
            factor = torch.where(keys_image, enhance, torch.where(keys_system, suppress, 1.0))
            raw = torch.where(after_image, raw * factor, raw)
        scores = raw + attention_mask.float()
        if module.layer_idx in layers:
            from_end = (rows[None, :] >= prompt_end[:, None])[:, None, :, None]
            scores = torch.where(from_end & keys_image, scores + alpha * scores.abs(), scores)
        if first_key_bias:
            scores[torch.arange(scores.shape[0]), :, :, first_real] += first_key_bias
        out = scores.softmax(-1) @ value
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@pytest.fixture
def reference_logits():
    def run(model, inputs, **edit):
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        image = torch.isin(ids, torch.tensor([IMAGE, VIDEO])) & mask  # the visual keys: image and video tokens
        positions = torch.arange(ids.shape[1])
        first_image = torch.where(image, positions, ids.shape[1]).amin(1)
        system = mask & (positions[None, :] < first_image[:, None])
        prompt_end = torch.where(mask, positions, -1).amax(1)
        image_end = torch.where(image, positions + 1, 0).amax(1)
        reference = official_edit(image, system, prompt_end, image_end, first_real=mask.int().argmax(1), **edit)
        with attention_function(model, reference, "text_config"), torch.no_grad():
            return model(**inputs).logits

    return run


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method, options", [("pai", {"alpha": 0.0}), ("clearsight", {"enhance": 1, "suppress": 1})])
def test_neutral_settings_are_bit_identical(build, method, options):
    model = build("llava")
    inputs = make_inputs("llava", model)
    plain = logits(model, inputs)
    with nograd.apply(model, method, **options) as handle:
        assert torch.equal(logits(model, inputs), plain) and handle.stats["layers"] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_pai_equals_the_official_edit(build, reference_logits, family):
    model = build(family)
    inputs = make_inputs(family, model)
    expected = reference_logits(model, inputs, layers={1}, alpha=0.5)
    plain = logits(model, inputs)
    with nograd.apply(model, "pai", alpha=0.5, layers=(1, None)) as handle:
        got = logits(model, inputs)
        assert handle.stats["layers"] == [1] and handle.stats["edited_calls"] == 1
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # only the prompt's last row changes at prefill: every earlier row is the base implementation's, bit for bit
    assert torch.equal(got[:, :-1], plain[:, :-1])
    assert (got[:, -1] - plain[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("method, options, edit", [("pai", dict(alpha=0.5, layers=(1, None)), dict(layers={1}, alpha=0.5)),
                                                   ("clearsight", dict(enhance=1.6, suppress=0.7, layers=(0, 1)),
                                                    dict(layers={0}, enhance=1.6, suppress=0.7))])
def test_shares_a_model_with_zerotuning(build, reference_logits, method, options, edit):
    """Neither moves keys: the edits stack with ZeroTuning's bias on each row's first real key (a padded batch), in
    either order, equal to both written out; gamma=1 leaves the edit's logits exactly."""
    import math

    model = build("llava")
    inputs = make_inputs("llava", model, batch=2)
    real = inputs["attention_mask"].bool()
    assert not real.all()  # left padding: the first real key is not key 0 in every row
    plain = logits(model, inputs)
    expected = reference_logits(model, inputs, first_key_bias=math.log(2.0), **edit)
    with nograd.apply(model, method, **options):
        alone = logits(model, inputs)
        with nograd.apply(model, "zerotuning", gamma=1.0):
            assert torch.equal(logits(model, inputs), alone)
        zerotuning = nograd.apply(model, "zerotuning", gamma=2.0)
        both = logits(model, inputs)
    torch.testing.assert_close(both[real], expected[real], atol=1e-5, rtol=0)
    with nograd.apply(model, method, **options):
        assert torch.equal(logits(model, inputs), both)
    zerotuning.remove()
    assert torch.equal(logits(model, inputs), plain)


@pytest.mark.parametrize("images", [True, False], ids=["images+video", "video"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_tokens_are_visual_keys(build, reference_logits, family, images):
    """Qwen2-VL / 2.5-VL and OneVision write video frames with their own token: PAI and ClearSight edit those keys
    as they edit image keys (the official edits with visual = image or video tokens)."""
    model = build(family)
    inputs = make_video_inputs(family, model, images=images)
    real = inputs["attention_mask"].bool()
    plain = logits(model, inputs)
    for method, options, edit in [("pai", dict(alpha=0.5, layers=(1, None)), dict(layers={1}, alpha=0.5)),
                                  ("clearsight", dict(enhance=1.6, suppress=0.7, layers=(0, 1)),
                                   dict(layers={0}, enhance=1.6, suppress=0.7))]:
        expected = reference_logits(model, inputs, **edit)
        with nograd.apply(model, method, **options) as handle:
            got = logits(model, inputs)
            assert handle.stats["edited_calls"] == 1
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
        assert (got - plain)[real].abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_clearsight_equals_the_official_edit(build, reference_logits, family):
    model = build(family)
    inputs = make_inputs(family, model)
    expected = reference_logits(model, inputs, layers={0}, enhance=1.6, suppress=0.7)
    plain = logits(model, inputs)
    with nograd.apply(model, "clearsight", enhance=1.6, suppress=0.7, layers=(0, 1)):
        got = logits(model, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (got - plain)[real].abs().max() > 1e-4


@pytest.mark.parametrize("method", ["pai", "clearsight"])
def test_generate_with_cache_equals_without_and_restores(build, method):
    model = build("llava")
    inputs = make_inputs("llava", model)
    names, saved = attn_names(model), snapshot(model)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(**inputs, **kwargs)
    options = {"alpha": 0.8} if method == "pai" else {"enhance": 1.5, "suppress": 0.8, "rows": "prompt_end"}
    with nograd.apply(model, method, **options):
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(cached.scores, plain.scores))
    assert attn_names(model) == names and same_state(model, saved)
    again = model.generate(**inputs, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(again.scores, plain.scores))


@pytest.mark.parametrize("method", ["pai", "clearsight"])
def test_each_prompt_edits_from_its_own_rows(build, method):
    """The rows an edit starts from are kept per prompt (read from the device once, not at every step): a second
    prompt of another length and padding under the same handle is edited as under a fresh one."""
    model = build("llava")
    first, second = make_inputs("llava", model), make_inputs("llava", model, batch=1, seed=3)
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    options = {"alpha": 0.8} if method == "pai" else {"enhance": 1.5, "suppress": 0.8, "rows": "prompt_end"}
    with nograd.apply(model, method, **options):
        model.generate(**first, **kwargs)
        after = model.generate(**second, **kwargs).scores
    with nograd.apply(model, method, **options):
        fresh = model.generate(**second, **kwargs).scores
    assert all(torch.equal(a, b) for a, b in zip(after, fresh))


@pytest.mark.parametrize("method, options", [("pai", dict(alpha=2.0, layers=(0, None))),
                                             ("clearsight", dict(enhance=1.5, layers=(0, None))),
                                             ("paint", dict(layers=(0, None))), ("fastv", dict(layer=1, keep=0.5))])
def test_the_multimodal_model_called_directly_or_applied_to_is_a_prompt_too(build, method, options):
    """``vlm.model(...)`` called directly (hidden states without the head) read the image positions of the last
    outer call (PAI 1.5e-3 off, its effect 2e-3), or none; and a bare ``LlavaModel`` could not take the method
    (no ``generate`` to observe). Both now give the full model's logits through its head."""
    model = build("llava")
    first, second = make_inputs("llava", model), make_inputs("llava", model, batch=1, seed=3)
    with torch.no_grad():
        plain = model(**second).logits
        with nograd.apply(model, method, **options):
            model(**first)
            outer = model(**second).logits
            model(**first)
            inner = model.lm_head(model.model(**second).last_hidden_state)
        assert outer.shape != plain.shape or (outer - plain).abs().max() > 1e-4  # it acts (FastV: fewer positions)
        with nograd.apply(model.model, method, **options):
            bare = model.lm_head(model.model(**second).last_hidden_state)
    torch.testing.assert_close(inner, outer, atol=1e-6, rtol=0)
    torch.testing.assert_close(bare, outer, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["pai", "paint", "clearsight"])
def test_a_decode_step_reads_nothing_back_per_layer(build, method):
    """After the prefill, an edited decode step asks the device nothing per layer (on CUDA each read is a sync):
    where the edit starts and whether it covers every head are kept per prompt. The reads are the same with one
    edited layer as with all of them, one more than the plain model's (the padding mask, split once per forward)."""
    model = build("llava")
    inputs = make_inputs("llava", model)

    def decode_step_reads() -> int:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], dim=1)
            step = dict(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask,
                        past_key_values=out.past_key_values)
            model(**step, use_cache=True)  # the first step may read what the prefill did not
            step["attention_mask"] = torch.cat([mask, mask[:, :1]], dim=1)
            return host_reads(lambda: model(**step, use_cache=True))

    plain = decode_step_reads()
    reads = {}
    for layers in [(1, 2), (0, None)]:
        with nograd.apply(model, method, layers=layers) as handle:
            reads[layers] = decode_step_reads()
            assert handle.stats["edited_calls"] > 0
    assert reads[(1, 2)] == reads[(0, None)] <= plain + 1


def test_text_only_prompt_after_an_image_prompt_is_untouched(build):
    model = build("llava")
    inputs = make_inputs("llava", model)
    text_only = {"input_ids": torch.randint(4, 100, (1, 7)), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    plain = logits(model, text_only)
    with nograd.apply(model, "pai", alpha=0.8):
        logits(model, inputs)
        assert torch.equal(logits(model, text_only), plain)


def test_score_edit_methods_cannot_share_a_model(build):
    model = build("llava")
    with nograd.apply(model, "pai"):
        with pytest.raises(nograd.IncompatibleMethodsError, match="score_edit"):
            nograd.apply(model, "clearsight")


def test_default_layers_scale_with_depth():
    from nograd.methods.visual_edit import layer_range

    assert layer_range(None, 32, (2 / 32, 1.0)) == range(2, 32)
    assert layer_range(None, 32, (9 / 32, 15 / 32)) == range(9, 15)
    assert layer_range(None, 28, (9 / 32, 15 / 32)) == range(8, 13)
    assert layer_range(None, 2, (9 / 32, 15 / 32)) == range(1, 2)
    assert layer_range((3, None), 10, (0, 1)) == range(3, 10)


@pytest.mark.parametrize("method, options, words", [
    ("pai", {"alpha": float("inf")}, ["alpha", "finite"]),
    ("pai", {"rows": "all"}, ["rows", "prompt_end"]),
    ("pai", {"cfg_gamma": 0}, ["cfg_gamma", "> 0"]),
    ("pai", {"layers": (1, 9)}, ["layers", "0 <= start < end <= 2"]),
    ("clearsight", {"enhance": 0}, ["enhance", "> 0"]),
    ("clearsight", {"layers": "middle"}, ["layers"]),
])
def test_bad_options(build, method, options, words):
    model = build("llava")
    names = attn_names(model)
    with pytest.raises((ValueError, TypeError)) as info:
        nograd.apply(model, method, **options)
    assert all(word in str(info.value) for word in words)
    assert attn_names(model) == names and nograd.attached(model) == []


def test_text_models_are_refused():
    from tiny import build

    with pytest.raises(nograd.UnsupportedModelError, match="pai does not support LlamaForCausalLM"):
        nograd.apply(build("llama"), "pai")


def test_image_free_contrast_equals_a_written_out_loop(build):
    """PAI's refine, written out: greedy steps without cache, z_c from the edited model with the image, z_u from the
    plain model on the same tokens without the image tokens, z = gamma (z_c - z_u) + z_u, cut below 0.1 max."""
    model, plain_twin = build("llava"), build("llava")
    assert_refine_is_written_out(model, plain_twin, make_inputs("llava", model), (IMAGE,), alpha=0.5)


@pytest.mark.parametrize("method", ["pai", "clearsight", "paint", "act"])
def test_bf16_runs_and_restores(build, method):
    model = build("llava", dtype=torch.bfloat16)
    inputs = make_inputs("llava", model)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    saved = snapshot(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, method, layers=(0, None)), torch.no_grad():
        steered = model(**inputs).logits
    assert steered.dtype == torch.bfloat16 and torch.isfinite(steered[inputs["attention_mask"].bool()]).all()
    assert not torch.equal(steered, plain)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    assert same_state(model, saved)
