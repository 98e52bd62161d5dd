"""PAI / PAINT ``cfg_gamma`` (the image-free contrast): no state kept between generations, beam search with the KV
cache equal to beam search without it, rows without image tokens left alone, and the main cache given back."""

from __future__ import annotations

import math

import nograd
import pytest
import torch
import transformers
from tiny.vlm import BOS, IMAGE, PAD, make_inputs
from transformers import DynamicCache

GREEDY = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": PAD, "output_scores": True,
          "return_dict_in_generate": True}


def peaked(model):
    """``model`` with its output scaled x30, so that the random tiny model's next-token distribution is peaked and
    the 0.1 plausibility cutoff cuts."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def generated_scores(model, inputs, **options):
    """(B, steps, V) the scores greedy decoding chose from (the refine is generate()'s last logits processor)."""
    return torch.stack(model.generate(**inputs, **GREEDY, **options).scores, 1)


@pytest.mark.parametrize("method", ["pai", "paint"])
def test_each_generate_starts_afresh(build, method):
    """The same generate twice on one handle gives the same logits, and a batch of 2 then a batch of 1 (whose
    prefill once extended the previous image-free cache, or crashed) gives what a fresh handle gives."""
    model = peaked(build("llava"))
    pair, single = make_inputs("llava", model), make_inputs("llava", model, batch=1, seed=1)
    with nograd.apply(model, method, cfg_gamma=1.1):
        fresh = generated_scores(model, single)
    with nograd.apply(model, method, cfg_gamma=1.1):
        first = generated_scores(model, pair)
        assert torch.equal(generated_scores(model, pair), first)
        assert torch.equal(generated_scores(model, single), fresh)
    assert torch.isinf(fresh).any() and not torch.isinf(first).all(dim=-1).any()  # the cutoff ran, kept some


@pytest.mark.skipif(tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24),
                    reason="transformers 5.17: the left-padded row's beams differ between the cached and the no-cache "
                           "run under cfg_gamma (greedy agrees); not yet understood")
def test_beam_search_with_cache_equals_without(build):
    """Beam re-ranking reorders the image-free cache with the model's: cached beams equal beams recomputed from
    each beam's own tokens (``use_cache=False``)."""
    model = build("llava")
    inputs = make_inputs("llava", model)
    beams = {"max_new_tokens": 6, "num_beams": 4, "do_sample": False, "pad_token_id": PAD, "output_scores": True,
             "return_dict_in_generate": True}
    with nograd.apply(model, "pai", alpha=0.5, cfg_gamma=1.5):
        cached = model.generate(**inputs, **beams)
        recomputed = model.generate(**inputs, use_cache=False, **beams)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=1e-5, rtol=0)


def test_text_only_row_is_left_alone(build):
    """In a batch of an image prompt and a text-only prompt, the text-only row gets the plain model's logits (the
    same batch without the method, and the prompt alone) while the image row is refined."""
    model = peaked(build("llava"))
    image_row = make_inputs("llava", model, batch=1)
    ids = image_row["input_ids"][0]
    text = torch.tensor([BOS, *range(10, 20)])
    padded = torch.cat([torch.full((len(ids) - len(text),), PAD), text])
    batch = dict(image_row, input_ids=torch.stack([ids, padded]),
                 attention_mask=torch.stack([torch.ones_like(ids), padded != PAD]).long())
    alone = {"input_ids": text[None], "attention_mask": torch.ones_like(text)[None]}
    plain_batch, plain_alone = generated_scores(model, batch), generated_scores(model, alone)
    with nograd.apply(model, "pai", alpha=0.0, cfg_gamma=1.1):
        steered = generated_scores(model, batch)
    assert torch.equal(steered[1], plain_batch[1])
    torch.testing.assert_close(steered[1], plain_alone[0], atol=1e-5, rtol=0)
    assert torch.isinf(steered[0]).any() and not torch.isinf(plain_batch).any()


def test_caches_hold_nothing_of_the_method(build):
    """Beam search re-ranks the image-free cache through the model's ``_reorder_cache`` (gone after ``remove()``):
    the caches the user gets and copies hold no wrapper (a deepcopy kept one that re-ranked the original cache, and
    could not be pickled)."""
    import copy
    import pickle

    model = peaked(build("llava"))
    inputs = make_inputs("llava", model)
    cache = DynamicCache()
    handle = nograd.apply(model, "pai", cfg_gamma=1.1)
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
    beams = model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=PAD,
                           return_dict_in_generate=True)
    kept = copy.deepcopy(cache)
    assert "reorder_cache" not in vars(cache) and "reorder_cache" not in vars(kept)
    assert "reorder_cache" not in vars(beams.past_key_values)
    handle.remove()
    assert "_reorder_cache" not in vars(model)
    pickle.dumps(kept)
    kept.reorder_cache(torch.tensor([1, 0]))


def test_the_refine_follows_generates_own_logits_processors(build):
    """As the official ``CFGLogits`` (a custom ``logits_processor``): z_c is the scores after the generation
    config's repetition penalty and n-gram ban, so the cutoff is taken over the tokens still allowed. (Refined before
    them, the ban left no token above the cutoff: greedy chose a banned token's -inf row.) Written out without a
    cache on the plain model (alpha 0: the refine alone)."""
    model = peaked(build("llava"))
    inputs = make_inputs("llava", model)
    rules = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 1}
    with nograd.apply(model, "pai", alpha=0.0, cfg_gamma=1.1):
        out = model.generate(**inputs, **GREEDY, **rules)
    processors = transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(1.3),
                                                   transformers.NoRepeatNGramLogitsProcessor(1)])
    seq, mask = inputs["input_ids"], inputs["attention_mask"]
    image = seq == IMAGE
    text = [row[keep] for row, keep in zip(seq, mask.bool() & ~image)]
    width = max(len(row) for row in text)
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for step in range(GREEDY["max_new_tokens"]):
        with torch.no_grad():
            z_c = model(input_ids=seq, attention_mask=mask, **pixels).logits[:, -1]
            free = torch.stack([torch.nn.functional.pad(row, (width - len(row), 0), value=PAD) for row in text])
            z_u = model(input_ids=free, attention_mask=(free != PAD).long()).logits[:, -1]
        z_c = processors(seq, z_c.float()).log_softmax(-1)
        z_u = z_u.float().log_softmax(-1)
        z = (1.1 * (z_c - z_u) + z_u).masked_fill(z_c < math.log(0.1) + z_c.amax(-1, keepdim=True), -math.inf)
        finite = torch.isfinite(z)
        assert torch.equal(finite, torch.isfinite(out.scores[step])) and finite.any(-1).all()
        torch.testing.assert_close(out.scores[step][finite], z[finite], atol=1e-4, rtol=0)
        token = z.argmax(-1)
        assert torch.equal(token, out.sequences[:, seq.shape[1]]) and not torch.isin(token, seq).any()
        seq, mask = torch.cat([seq, token[:, None]], 1), torch.cat([mask, torch.ones_like(token)[:, None]], 1)
        text = [torch.cat([row, t[None]]) for row, t in zip(text, token)]
        width += 1


def test_gamma_one_is_off(build):
    """``cfg_gamma=1`` is the identity (the official ``CFGLogits`` returns the scores as they are): no image-free
    pass, bit-identical to ``cfg_gamma=None``."""
    model = peaked(build("llava"))
    inputs = make_inputs("llava", model)
    with nograd.apply(model, "pai", alpha=0.5):
        off = generated_scores(model, inputs)
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    with nograd.apply(model, "pai", alpha=0.5, cfg_gamma=1):
        assert torch.equal(generated_scores(model, inputs), off)
    hook.remove()
    assert len(calls) == GREEDY["max_new_tokens"]


def test_the_unedited_prefill_is_not_counted(build):
    """Under the refine the prefill runs the plain attention (no row to edit): ``edited_calls`` counts only the decode
    steps' calls, one per edited layer and step."""
    model = build("llava")
    inputs = make_inputs("llava", model)
    with nograd.apply(model, "pai", alpha=0.5, cfg_gamma=1.1) as handle:
        model.generate(**inputs, **GREEDY)
        layers = len(handle.stats["layers"])
        assert layers > 0 and handle.stats["edited_calls"] == layers * (GREEDY["max_new_tokens"] - 1)


def test_a_forward_is_refined_with_return_dict_false_too(build):
    """Outside generate() the refine is on the forward's logits, in the tuple of ``return_dict=False`` as in the
    output object (it returned the plain model's logits)."""
    model = peaked(build("llava"))
    inputs = make_inputs("llava", model)
    with nograd.apply(model, "pai", alpha=0.5, cfg_gamma=1.1), torch.no_grad():
        refined = model(**inputs).logits
        assert torch.isinf(refined[:, -1]).any()
        assert torch.equal(model(**inputs, return_dict=False)[0], refined)
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
        assert torch.equal(model(**inputs, labels=labels, return_dict=False)[1], refined)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "gemma3"])
def test_the_image_free_prompt_drops_the_image_markers(family):
    """The image-free pass leaves out the tokens that frame an image where the config names them: on Qwen-VL its
    prompt is the one the processor writes without the image (z_u of the first refine from that prompt); Gemma3's
    loses ``<start_of_image>`` / ``<end_of_image>`` (the blank lines its processor writes around them stay)."""
    model, processor = nograd.tiny.vlm(family)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    inputs = processor(images=nograd.tiny.image(56, 56), return_tensors="pt",
                       text=processor.apply_chat_template(chat, add_generation_prompt=True))
    ids = inputs["input_ids"]
    config = model.config
    markers = [config.vision_start_token_id, config.vision_end_token_id] if family != "gemma3" \
        else [config.boi_token_index, config.eoi_token_index]
    text = ids[:, ~torch.isin(ids[0], torch.tensor(markers + [config.image_token_id]))]
    if family != "gemma3":
        chat[0]["content"] = chat[0]["content"][1:]
        assert torch.equal(text, processor(text=processor.apply_chat_template(chat, add_generation_prompt=True),
                                           return_tensors="pt")["input_ids"])
    with torch.no_grad():
        z_c = model(**inputs).logits[:, -1].float().log_softmax(-1)
        z_u = model(input_ids=text).logits[:, -1].float().log_softmax(-1)
    z = (1.1 * (z_c - z_u) + z_u).masked_fill(z_c < math.log(0.1) + z_c.amax(-1, keepdim=True), -math.inf)
    with nograd.apply(model, "pai", cfg_gamma=1.1):
        scores = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                return_dict_in_generate=True).scores[0]
    finite = torch.isfinite(z)
    assert torch.equal(torch.isfinite(scores), finite)
    torch.testing.assert_close(scores[finite], z[finite], atol=1e-5, rtol=0)
