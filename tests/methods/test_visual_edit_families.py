"""PAI and ClearSight (which need only the image-token positions and the attention path) on Qwen3-VL, InternVL-hf,
Mistral3 and Gemma3, against the official edits written out in ``test_visual_edit.py``."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import same_state, snapshot
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
