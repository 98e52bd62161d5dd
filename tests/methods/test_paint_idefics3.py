"""PAINT on Idefics3 / SmolVLM (a SigLIP-like tower without CLS, run on every real tile; the connector's
``pixel_shuffle`` folds 2 x 2 patches into one token): the read-outs equal an eager re-computation of the tower's
attention, the selection equals one computed from independently folded 2 x 2 patch blocks, the edit reaches the
logits, ``generate`` with the KV cache equals it without, and ``remove()`` restores the model."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import attention_function, attn_names, same_state, snapshot
from nograd.methods.paint import select_tokens
from tiny.vlm import make_inputs


def received_attention(model, inputs, layers):
    """Per layer: (tiles, patches) attention each patch receives (mean over queries and heads), eagerly."""
    recorded = {}
    modules = {id(model.model.vision_model.encoder.layers[layer].self_attn): layer for layer in layers}

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        weights = ((query.float() @ key.float().transpose(-1, -2)) * scaling).softmax(-1)
        if id(module) in modules:
            recorded[modules[id(module)]] = weights.mean(dim=(1, 2))
        return (weights @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), None

    with attention_function(model, attention, "vision_config"), torch.no_grad():
        model(**inputs)
    return recorded


def folded(tiles: torch.Tensor) -> torch.Tensor:
    """(tiles, side^2) patch scores -> (tiles * (side/2)^2,) token scores: each token sums its 2 x 2 patch block."""
    side = int(tiles.shape[1] ** 0.5)
    return tiles.reshape(-1, side // 2, 2, side // 2, 2).sum(dim=(2, 4)).flatten()


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_selection_equals_an_independent_fold_of_eager_attention(build, family):
    model = build(family)
    inputs = make_inputs(family, model)  # row 0: 2 x 3 crops + global image (7 tiles); row 1: a global image alone
    last = len(model.model.vision_model.encoder.layers) - 1
    want = received_attention(model, inputs, [0, last])
    image = inputs["input_ids"] == model.config.image_token_id
    positions = [row.nonzero().flatten() for row in image]
    tiles_per_image = [len(p) // model.model.image_seq_len for p in positions]
    local_scores = folded(want[0]).split([len(p) for p in positions])
    summary_scores = folded(want[last]).split([len(p) for p in positions])
    assert tiles_per_image == [7, 1] and want[0].shape[0] == 8
    names, saved = attn_names(model), snapshot(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "paint", layers=(0, None), local_ratio=0.25) as handle:
        with torch.no_grad():
            got = model(**inputs).logits
        for chosen, where, local_score, summary_score in zip(handle.stats["selection"], positions, local_scores,
                                                             summary_scores):
            local, summary = select_tokens(local_score, summary_score, 0.25)
            assert sorted(chosen["local"].tolist()) == sorted(where[local].tolist())
            assert sorted(chosen["summary"].tolist()) == sorted(where[summary].tolist())
        assert handle.stats["local_tokens"][0] + handle.stats["summary_tokens"][0] >= 7
        kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    mask = inputs["attention_mask"].bool()
    assert (got - plain)[mask].abs().max() > 1e-4
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert attn_names(model) == names and same_state(model, saved)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
