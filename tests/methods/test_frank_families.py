"""FRANK in place on Qwen3-VL, InternVL-hf, Mistral3 and Gemma3, each with a homologous trio
(``tiny/vlm_families.py``: a 4-layer text LLM as base, the MLLM's language model = base + 0.01 noise, the reasoning
LLM = base + 0.02 noise), against the streamed ``nograd.merge`` of the same trio saved to folders."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import nograd
from checks import attn_names, same_state, snapshot
from nograd.patches import adapter_for
from tiny import vlm_families as tiny_families

LAYERS = 4
PRIOR = [1.0, 0.7, 0.3, 0.0]


@pytest.fixture(scope="module", params=tiny_families.FAMILIES)
def saved_trio(request, tmp_path_factory):
    """(family, folder, mllm, reasoning, base), the three also saved (``save_pretrained``) under ``folder``."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    mllm, reasoning, base = tiny_families.make_trio(family, LAYERS)
    mllm.save_pretrained(folder / "mllm")
    reasoning.save_pretrained(folder / "reasoning")
    base.save_pretrained(folder / "base")
    return family, folder, mllm, reasoning, base


def layer_state(model, layer):
    return {n: p.detach().clone() for n, p in model.get_decoder().layers[layer].named_parameters()}


def test_lambda_r_zero_is_the_mllm_bit_for_bit(saved_trio):
    family, _, mllm, reasoning, base = saved_trio
    model = copy.deepcopy(mllm)
    saved = snapshot(model)
    with nograd.apply(model, "frank", reasoning=reasoning, base=base, prior=[1.0] * LAYERS) as h:
        assert same_state(model, saved)
        assert h.stats["lambda_r"] == [0.0] * LAYERS and h.stats["layers"] == [] and h.stats["tensors_merged"] == 0
    with nograd.apply(model, "frank", reasoning=reasoning, rule="linear", lambda_r=0.0) as h:
        assert same_state(model, saved) and h.stats["mismatches"] == []
    assert same_state(model, saved)


def test_in_place_equals_streamed_and_remove_restores(saved_trio, tmp_path):
    """Same λ per layer, every merged tensor equal to the reloaded streamed output; layer 0 (π_V = 1) and everything
    outside the decoder layers kept, layer 3 (π_V = 0) the reasoning LLM's; ``remove()`` restores bit-for-bit."""
    family, folder, mllm, reasoning, base = saved_trio
    model = copy.deepcopy(mllm)
    saved = snapshot(model)
    h = nograd.apply(model, "frank", reasoning=reasoning, base=base, prior=PRIOR)
    in_place, stats = snapshot(model), dict(h.stats)
    assert stats["layers"] == [1, 2, 3] and stats["mismatches"] == [] and 0 < stats["lambda_r"][1] < 1
    changed = {k for k in saved if not torch.equal(saved[k], in_place[k])}
    assert changed and all(k.startswith("model.language_model.layers.") for k in changed)
    assert not any(k.startswith("model.language_model.layers.0.") for k in changed)
    assert all(torch.equal(p, reasoning.model.layers[3].get_parameter(n))
               for n, p in model.get_decoder().layers[3].named_parameters())
    report = nograd.merge("frank", mllm=folder / "mllm", reasoning=folder / "reasoning", base=folder / "base",
                          out=tmp_path / "out", prior=PRIOR)
    assert report["lambda_r"] == stats["lambda_r"] and report["layers"] == stats["layers"]
    loaded = type(mllm).from_pretrained(tmp_path / "out").eval()
    assert same_state(loaded, in_place)
    h.remove()
    assert same_state(model, saved)


def eager_visual_share(model, inputs) -> list[float]:
    """r_l computed independently: eager attention weights of text queries after the last image token, their mass
    on image keys, mean over heads and queries."""
    adapter = adapter_for(model)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation(adapter.attn_implementation_request("eager"))
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = adapter.visual_token_mask(ids) & real
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    last = torch.where(visual, positions, -1).max(dim=1, keepdim=True).values
    queries = real & ~visual & (positions > last)
    return [float((a * visual[:, None, None, :]).sum(-1).mean(1)[queries].double().mean()) for a in attentions]


def test_measured_prior_equals_eager_attention(saved_trio):
    """``calibration``: the measured image-attention share per layer equals the one read off eager attention weights
    (Qwen3-VL's deepstack, Gemma3's sliding and bidirectional masks included); merge and remove as usual."""
    family, _, mllm, reasoning, base = saved_trio
    model = copy.deepcopy(mllm)
    saved, names = snapshot(model), attn_names(model)
    inputs = tiny_families.make_inputs(family, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random tiny weights: the fit may be flat
        h = nograd.apply(model, "frank", reasoning=reasoning, base=base, calibration=inputs)
    assert h.stats["r"] == pytest.approx(eager_visual_share(mllm, inputs), abs=1e-5)
    assert all(0 < r < 1 for r in h.stats["r"]) and len(h.stats["pi_v"]) == LAYERS
    assert attn_names(model) == names
    h.remove()
    assert same_state(model, saved)
