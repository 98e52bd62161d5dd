"""PyramidDrop and FastV: no-drop bit-exactness, kept counts, the ranking against eager attention, generation against
a reference that physically removes the same tokens and runs the plain layers one by one, KV-cache sizes, batch
invariance, the FLOPs counters on LLaVA-1.5-7B / LLaVA-NeXT-7B shapes, and the guards."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import nograd
from checks import same_state, snapshot
from drop_reference import assert_generate_equals_physical_removal, generate, visual_counts
from nograd.methods.drop_schedule import DropSchedule
from nograd.methods.token_drop import drop_cost
from tiny.vlm import BUILDERS, IMAGE, make_inputs

LAYERS = 8
SCHEDULE = dict(boundaries=[2, 4, 6], keep=[0.5, 0.25, 0.125])


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, attn="sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = BUILDERS[family](seed=1, attn_implementation=attn, text_layers=LAYERS)
        return cache[family, attn]

    return get


# ---- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keeping_everything_is_bit_identical(models, family):
    model = models(family)
    inputs = make_inputs(family, model)
    with torch.no_grad():
        plain = model(**inputs).logits
    tokens, scores = generate(model, inputs)
    with nograd.apply(model, "pyramiddrop", boundaries=[2, 4, 6], keep=[1.0, 1.0, 1.0]) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, plain)
        got_tokens, got_scores = generate(model, inputs)
        assert handle.stats["visual_tokens"] == [[n] * 4 for n in visual_counts(inputs)]
        # nothing ranked, nothing saved: the MACs are the plain model's (the ranking rows were counted)
        assert handle.stats["macs"]["ratio"] == handle.stats["flops"]["ratio"] == 1.0
    assert torch.equal(got_tokens, tokens) and torch.equal(got_scores, scores)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_kept_counts_are_floor_of_the_original(models, family):
    model = models(family)
    inputs = make_inputs(family, model)
    with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle, torch.no_grad():
        logits = model(**inputs).logits
    plan = DropSchedule(LAYERS, (2, 4, 6), (0.5, 0.25, 0.125))
    counts = visual_counts(inputs)
    assert handle.stats["visual_tokens"] == [plan.kept_counts(n) for n in counts]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for stage, kept in enumerate(handle.stats["kept"]):
        for row, positions in enumerate(kept):
            assert bool((positions.diff() > 0).all()) and bool((ids[row, positions] == IMAGE).all())
    texts = (mask & (ids != IMAGE)).sum(1)
    dropped = [n - plan.kept_counts(n)[-1] for n in counts]
    assert handle.stats["stage_lengths"][-1] == max(int(real) - d for real, d in zip(mask.sum(1), dropped))
    assert logits.shape[1] == handle.stats["stage_lengths"][-1] and int(texts.min()) > 0


@pytest.mark.parametrize("method, options, layer_of", [
    ("pyramiddrop", dict(boundaries=[3], keep=[0.5]), lambda boundary: boundary),
    ("fastv", dict(layer=3, keep=0.5), lambda boundary: boundary - 1),
])
def test_ranking_equals_eager_attention(models, method, options, layer_of):
    """The kept set is the top-K of the head-averaged eager attention row of each row's last token, in the layer
    the method scores with (PyramidDrop: the boundary layer; FastV: the one before), on the plain model."""
    model = models("llava", "eager")
    inputs = make_inputs("llava", model)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    row = attentions[layer_of(3)][:, :, -1].mean(dim=1)
    with nograd.apply(model, method, **options) as handle, torch.no_grad():
        model(**inputs)
    for b, kept in enumerate(handle.stats["kept"][0]):
        image = (inputs["input_ids"][b] == IMAGE).nonzero().flatten()
        top = image[row[b, image].topk(len(image) // 2).indices].sort().values
        assert torch.equal(kept, top)


@pytest.mark.parametrize("family, positions", [("llava", "original"), ("llava", "compact"), ("qwen2_vl", "original"),
                                               ("llava_next", "original"), ("llava_onevision", "compact")])
@pytest.mark.parametrize("method", ["pyramiddrop", "fastv"])
def test_generate_equals_physical_removal(models, family, positions, method):
    model = models(family)
    inputs = make_inputs(family, model)
    options = dict(SCHEDULE) if method == "pyramiddrop" else dict(layer=2, keep=0.5)
    boundaries = options.get("boundaries", [2])
    assert_generate_equals_physical_removal(model, inputs, method, options, boundaries, positions)


@pytest.mark.parametrize("method, options", [("pyramiddrop", dict(boundaries=[1, 2, 3], keep=[0.5, 0.25, 0.125])),
                                             ("fastv", dict(layer=2, keep=0.25))])
def test_a_prompt_ending_with_an_image_keeps_its_last_token(method, options):
    """The ranking query (each row's last prompt token, where generate() reads the first new token) may be an image
    token (a raw LLaVA prompt "describe <image>"): it stays in every stage, within the row's budget (it was ranked
    with the other image tokens and dropped: the first token was read from an earlier image token)."""
    model, processor = nograd.tiny.vlm("llava", layers=4)
    prompts = ["describe " + processor.image_token, processor.image_token + " describe"]
    inputs = processor(text=prompts, images=[[nograd.tiny.image(56, 40, seed=2)]] * 2, padding=True,
                       return_tensors="pt")
    assert int(inputs["input_ids"][0, -1]) == model.config.image_token_id
    last = inputs["input_ids"].shape[1] - 1
    with nograd.apply(model, method, **options) as handle, torch.no_grad():
        model(**inputs)
        kept, counts = handle.stats["kept"], handle.stats["visual_tokens"]
    schedule = DropSchedule(4, tuple(options.get("boundaries", [options.get("layer")])),
                            tuple(options["keep"]) if method == "pyramiddrop" else (options["keep"],))
    assert counts == [schedule.kept_counts(n) for n in visual_counts(inputs, (model.config.image_token_id,))]
    for stage in kept:
        assert last in stage[0].tolist() and len(stage[0]) == len(stage[1])


def test_bf16_generate_follows_the_schedule():
    model = BUILDERS["qwen2_5_vl"](seed=1, text_layers=LAYERS, dtype=torch.bfloat16)
    inputs = make_inputs("qwen2_5_vl", model)
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle:
        tokens, scores = generate(model, inputs)
    plan = DropSchedule(LAYERS, (2, 4, 6), (0.5, 0.25, 0.125))
    assert handle.stats["visual_tokens"] == [plan.kept_counts(n) for n in visual_counts(inputs)]
    assert tokens.shape == (2, 4) and bool(torch.isfinite(scores).all())


def test_cache_holds_only_the_kept_tokens(models):
    model = models("llava")
    inputs = make_inputs("llava", model)
    with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    stage = handle.stats["stage_lengths"]
    assert lengths == [stage[0]] * 2 + [stage[1]] * 2 + [stage[2]] * 2 + [stage[3]] * 2
    assert stage[0] == inputs["input_ids"].shape[1] > stage[1] > stage[2] > stage[3]


def test_batch_rows_equal_the_rows_alone(models):
    """Row 1 has two images and more left pads; each row's tokens equal its run alone (extra left pads inserted)."""
    model = models("llava")
    inputs = make_inputs("llava", model)
    with nograd.apply(model, "pyramiddrop", **SCHEDULE):
        batch, batch_scores = generate(model, inputs)
        for row in range(2):
            real = inputs["attention_mask"][row].bool()
            alone = {"input_ids": inputs["input_ids"][row:row + 1, real], "attention_mask": torch.ones(1, int(real.sum()),
                     dtype=torch.long), "pixel_values": inputs["pixel_values"][row:row + 2 * row + 1]}
            tokens, scores = generate(model, alone)
            assert torch.equal(tokens[0], batch[row])
            torch.testing.assert_close(scores[0], batch_scores[row], atol=1e-5, rtol=0)


def test_text_only_prompt_and_remove_are_bit_identical(models):
    model = models("llava")
    inputs = make_inputs("llava", model)
    text = {"input_ids": torch.randint(4, 100, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    saved = snapshot(model)
    with torch.no_grad():
        plain_text, plain = model(**text).logits, model(**inputs).logits
    handle = nograd.apply(model, "pyramiddrop", **SCHEDULE)
    with torch.no_grad():
        assert torch.equal(model(**text).logits, plain_text)
        model(**inputs)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    assert same_state(model, saved) and not model.model.language_model.layers[2]._forward_pre_hooks


def test_budget_solves_the_mean_tokens_per_layer(models):
    model = models("llava")
    inputs = make_inputs("llava", model)
    with nograd.apply(model, "pyramiddrop", tokens=8) as handle, torch.no_grad():
        model(**inputs)
    for row, tokens in enumerate(handle.stats["visual_tokens"]):
        per_layer = [tokens[DropSchedule(LAYERS, tuple(handle.stats["boundaries"]), (1.0,) * 3).stage_of_layer(i)]
                     for i in range(LAYERS)]
        assert abs(sum(per_layer) / LAYERS - 8) <= 1
    saved = snapshot(model)  # out of reach, named as the option: LLaVA-1.5 fixes an image's tokens, so at apply
    with pytest.raises(ValueError, match=r"^pyramiddrop: option tokens=1.0 is not allowed; expected a mean in .* "
                                         r"\(one image of 16 visual tokens\)$"):
        nograd.apply(model, "pyramiddrop", tokens=1)
    assert same_state(model, saved) and nograd.attached(model) == []
    model = models("llava_next")  # any-resolution tiles: known at the forward
    inputs = make_inputs("llava_next", model)
    with nograd.apply(model, "pyramiddrop", tokens=1), torch.no_grad():
        with pytest.raises(ValueError, match=r"^pyramiddrop: option tokens=1.0 is not allowed; expected a mean in .* "
                                             r"\(a row of \d+ visual tokens\)$"):
            model(**inputs)


def test_stats_flops_follow_the_formula(models):
    model = models("llava")
    inputs = make_inputs("llava", model)
    with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle, torch.no_grad():
        model(**inputs)
    plan = DropSchedule(LAYERS, (2, 4, 6), (0.5, 0.25, 0.125))
    real = inputs["attention_mask"].sum(1).tolist()
    expected = drop_cost(model.config.text_config, plan, handle.stats["visual_tokens"], real, value_bytes=4)
    assert handle.stats["flops"] == expected["flops"] and handle.stats["macs"] == expected["macs"]
    assert 0 < handle.stats["flops"]["ratio"] < 1


def llama_7b():
    return tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32)


@pytest.mark.parametrize("n, before, after", [(576, 3.817e12, 1.777e12), (2880, 20.83e12, 9.47e12)])
def test_paper_flops_of_llava_7b_shapes(n, before, after):
    """Spec §1.5: 3.82T -> 1.78T for LLaVA-1.5-7B (576 tokens), and the abstract's 55 % for LLaVA-NeXT's 2880."""
    cost = drop_cost(llama_7b(), DropSchedule.even(32), [DropSchedule.even(32).kept_counts(n)], [n + 40], 2)
    assert cost["flops"]["before"] == pytest.approx(before, rel=1e-3)
    assert cost["flops"]["after"] == pytest.approx(after, rel=1e-3)
    if n == 2880:
        assert cost["flops"]["ratio"] == pytest.approx(0.454, abs=1e-3)


def test_guards_leave_the_model_untouched(models):
    qwen = models("qwen2_vl")
    with pytest.raises(ValueError, match="positions"):
        nograd.apply(qwen, "pyramiddrop", positions="compact")
    llava = models("llava")
    for options, name in [(dict(boundaries=[4, 2]), "boundaries"), (dict(keep=[1.5, 0.5, 0.2]), "keep"),
                          (dict(boundaries=[2, 9]), "boundaries"), (dict(tokens=8, keep=[0.5]), "tokens"),
                          (dict(positions="dense"), "positions")]:
        with pytest.raises(ValueError, match=name):
            nograd.apply(llava, "pyramiddrop", **options)
    with pytest.raises(ValueError, match="layer"):
        nograd.apply(llava, "fastv", layer=LAYERS)
    assert not nograd.attached(llava) and not llava.model.language_model.layers[2]._forward_pre_hooks
    inputs = make_inputs("llava", llava)
    with nograd.apply(llava, "pyramiddrop", **SCHEDULE):
        with pytest.raises(ValueError, match="labels"):
            llava(**inputs, labels=inputs["input_ids"])
        embeds = llava.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="input_ids"):
            llava(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
