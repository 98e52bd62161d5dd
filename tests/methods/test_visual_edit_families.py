"""PAI and ClearSight (which need only the image-token positions and the attention path) on Qwen3-VL, InternVL-hf,
Mistral3 and Gemma3, against the official edits written out in ``test_visual_edit.py``."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import host_reads, same_state, snapshot
from test_visual_edit import reference_logits  # noqa: F401  (the fixture: dense eager attention, official edits)
from tiny import vlm_families as tiny_families


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
@pytest.mark.parametrize("method, options, edit", [
    ("pai", {"alpha": 0.5, "layers": (1, None)}, {"layers": {1}, "alpha": 0.5}),
    ("clearsight", {"enhance": 1.6, "suppress": 0.7, "layers": (0, 1)}, {"layers": {0}, "enhance": 1.6,
                                                                         "suppress": 0.7}),
])
def test_edit_equals_the_official_edit(reference_logits, family, method, options, edit):  # noqa: F811
    model = tiny_families.build(family)
    inputs = tiny_families.make_inputs(family, model)
    saved, plain = snapshot(model), logits(model, inputs)
    expected = reference_logits(model, inputs, **edit)
    with nograd.apply(model, method, **options):
        got = logits(model, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (got - plain)[real].abs().max() > 1e-4
    assert same_state(model, saved) and torch.equal(logits(model, inputs), plain)


@pytest.mark.parametrize("method", ["pai", "paint"])
def test_decode_past_the_sliding_window(method, monkeypatch):
    """Gemma3's sliding layers (window 6) drop the image keys from their cache within a few generated tokens. An
    edit claims to change every head (``every_head_from``: the plain attention is then skipped) only where its
    coefficients over the call's keys do (the claim is kept per prompt and key offset), and the cached decode steps
    give the scores of the uncached run, which edits every row over the whole prompt again."""
    from nograd.methods import visual_edit

    model = tiny_families.build("gemma3", text_layers=4)
    inputs = tiny_families.make_inputs("gemma3", model)
    assert inputs["input_ids"].shape[1] > model.config.text_config.sliding_window
    claims = []
    score_edit = visual_edit.VisualScoreEdit.score_edit

    def recorded(self, call):
        edit = score_edit(self, call)
        if edit is not None and edit.every_head_from is not None:
            coefs = [c for c in (edit.abs_coef, edit.mul_coef) if c is not None]
            claims.append(bool((sum((c != 0).any(dim=-1) for c in coefs) > 0).all()))
        return edit

    monkeypatch.setattr(visual_edit.VisualScoreEdit, "score_edit", recorded)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    with nograd.apply(model, method):
        cached = model.generate(**inputs, use_cache=True, **kwargs).scores
        uncached = model.generate(**inputs, use_cache=False, **kwargs).scores
    assert claims and all(claims)
    for a, b in zip(cached, uncached):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-5, rtol=0)


def test_decode_reads_past_the_sliding_window_do_not_grow_with_depth():
    """Gemma3 alternates sliding and full layers (two masks per forward) and its sliding caches move their key
    offset at every step: a decode step past the window still reads the device a fixed number of times per forward,
    as many with 8 layers as with 4 (on CUDA each read is a sync; the masks were split again at every layer, and
    whether the edit covers every head was read again at every offset)."""
    reads = {}
    for layers in (4, 8):
        model = tiny_families.build("gemma3", text_layers=layers)
        inputs = tiny_families.make_inputs("gemma3", model)
        with nograd.apply(model, "pai", layers=(0, None)), torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache, mask = out.past_key_values, inputs["attention_mask"]
            for _ in range(8):  # past the window of 6
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step = dict(input_ids=torch.full_like(mask[:, :1], 5), attention_mask=mask, past_key_values=cache)
                reads[layers] = host_reads(lambda: model(**step, use_cache=True))
    assert reads[4] == reads[8]
