"""Adapters of Qwen3-VL, InternVL-hf, Mistral3 and Gemma3 against tiny random models (``tiny/vlm_families.py``):
decoder facts, the shared attention path on their decoders, image layouts, and clear refusals.

Image layouts are checked against the concrete tiles the tiny inputs imply, against the features the model itself
writes into the image-token positions (image by image, in batch order), and for the order inside a tile against
what each model exposes: Qwen3-VL's 3D RoPE positions, Mistral3's ``[IMG_BREAK]`` row ends, InternVL's
``pixel_shuffle`` and Gemma3's pooling.
"""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import (assert_attn_request_switches_the_decoder_only, assert_tiles_follow_the_rope_grid, attn_names,
                    same_state, snapshot)
from nograd.attention import Intervention, intervene
from nograd.errors import UnsupportedModelError
from nograd.patches import adapter_for, supported_families
from nograd.patches.text_lm import Gemma3TextAdapter, MistralAdapter, Qwen2Adapter
from nograd.patches.vlm import Gemma3Adapter, InternVLAdapter, Mistral3Adapter, Qwen3VLAdapter
from tiny import vlm as tiny_vlm
from tiny import vlm_families as tiny_families

FAMILIES = list(tiny_families.FAMILIES)
EXPECTED = {"qwen3_vl": Qwen3VLAdapter, "internvl": InternVLAdapter, "mistral3": Mistral3Adapter,
            "gemma3": Gemma3Adapter}
VISION_ATTENTION = {"qwen3_vl": "Qwen3VLVisionAttention", "internvl": "InternVLVisionAttention",
                    "mistral3": "PixtralAttention", "gemma3": "SiglipAttention"}
LAYOUTS = {
    # family -> every image as (batch row, index in row, tiles as (kind, rows, cols))
    "qwen3_vl": [(0, 0, [("base", 2, 3)]), (1, 0, [("base", 1, 2)])],  # grid_thw (1,4,6), (1,2,4), merge 2
    "internvl": [(0, 0, [("crop", 2, 2), ("crop", 2, 2), ("base", 2, 2)]), (1, 0, [("base", 2, 2)]),
                 (1, 1, [("base", 2, 2)])],
    "mistral3": [(0, 0, [("base", 2, 2)]), (1, 0, [("base", 2, 1)]), (1, 1, [("base", 1, 2)])],  # 28x28, 28x14, 14x28
    "gemma3": [(0, 0, [("base", 2, 2)]), (1, 0, [("base", 2, 2)]), (1, 1, [("base", 2, 2)])],
}


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    family = request.param
    model = tiny_families.build(family)
    return family, model, tiny_families.make_inputs(family, model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_supported_families_lists_the_new_vlm_families():
    assert {"qwen3_vl", "internvl", "mistral3", "gemma3"} <= set(supported_families("vlm"))


def test_adapter_facts(case):
    family, model, _ = case
    adapter, bare = adapter_for(model), adapter_for(model.model)
    assert type(adapter) is type(bare) is EXPECTED[family] and adapter.family == family and adapter.kind == "vlm"
    decoder = model.model.language_model
    assert adapter.text_model is bare.text_model is decoder is model.get_decoder()
    assert adapter.text_config is model.config.text_config
    modules = adapter.attention_modules
    assert len(modules) == adapter.num_layers == model.config.text_config.num_hidden_layers == 2
    assert [m.layer_idx for m in modules] == [0, 1]
    assert all(m is layer.self_attn for m, layer in zip(modules, decoder.layers))
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16) == (
        model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads,
        modules[0].head_dim)
    assert adapter.image_token_id == tiny_vlm.IMAGE
    assert adapter.attn_implementation_request("x") == {"text_config": "x"}
    assert [type(m).__name__ for m in adapter.vision_attention_modules] == [VISION_ATTENTION[family]] * 2
    assert adapter.vision_has_cls == (family == "internvl")


def test_decoder_alone_goes_to_its_text_family():
    """Qwen3-VL's decoder is a Qwen3VLPreTrainedModel (as Qwen2-VL's); the others are plain text decoders (Gemma3's
    Gemma3TextModel goes to the text-only ``gemma3_text`` adapter, never to the VLM one)."""
    expected = {"qwen3_vl": Qwen3VLAdapter, "internvl": Qwen2Adapter, "mistral3": MistralAdapter,
                "gemma3": Gemma3TextAdapter}
    for family, adapter_cls in expected.items():
        decoder = tiny_families.build(family).model.language_model
        assert type(adapter_for(decoder)) is adapter_cls and adapter_for(decoder).text_model is decoder


def test_attn_implementation_request_switches_the_decoder_only(case):
    _, model, _ = case
    assert_attn_request_switches_the_decoder_only(model)


class CountingZeroBias(Intervention):
    """A zero logit bias (forces the call through nograd.kernels) that counts the calls it saw."""

    def __init__(self):
        self.calls = 0

    def key_bias(self, call):
        self.calls += 1
        return torch.zeros(1, 1, call.key.shape[2])


def test_attention_path_on_the_decoder(case):
    """Inactive interventions: bit-identical logits; a zero bias through the kernels (sliding windows and Gemma3's
    bidirectional image blocks included): the same logits, every decoder layer called once per forward."""
    family, model, inputs = case
    adapter = adapter_for(model)
    plain, names = logits(model, inputs), attn_names(model)
    handle = nograd.Handle(model, adapter, "test", None)
    intervene(handle, {m: Intervention() for m in adapter.attention_modules})
    assert attn_names(model)["text_config"].startswith("nograd_")
    assert attn_names(model)["vision_config"] == names["vision_config"]
    assert torch.equal(logits(model, inputs), plain)
    handle.remove()
    biases = {m: CountingZeroBias() for m in adapter.attention_modules}
    handle = nograd.Handle(model, adapter, "test", None)
    intervene(handle, biases)
    got = logits(model, inputs)
    handle.remove()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], plain[real], atol=1e-5, rtol=0)
    assert [b.calls for b in biases.values()] == [1, 1]
    assert attn_names(model) == names and torch.equal(logits(model, inputs), plain)


def test_image_grids(case):
    family, model, inputs = case
    adapter = adapter_for(model)
    grids = adapter.image_grids(**inputs)
    found = [(g.batch_row, g.image_index, [(t.kind, t.rows, t.cols) for t in g.tiles]) for g in grids]
    assert found == LAYOUTS[family]
    for row, row_positions in enumerate(adapter.image_token_positions(inputs["input_ids"])):
        row_grids = [g for g in grids if g.batch_row == row]
        for grid in row_grids:
            assert all(t.rows * t.cols == t.positions.numel() and t.newline_positions is None for t in grid.tiles)
            assert torch.equal(torch.cat([t.positions for t in grid.tiles]), grid.positions)
        assert torch.equal(torch.cat([g.positions for g in row_grids]), row_positions)
    bare = adapter_for(model.model).image_grids(**inputs)
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(grids, bare, strict=True))
    fixed = adapter.tokens_per_image  # the families whose config fixes an image's tokens, whatever its size
    assert (fixed is not None) == (family in {"gemma3"})
    assert fixed is None or all(grid.positions.numel() == fixed for grid in grids)


def image_features(family, model, inputs) -> torch.Tensor:
    """Every image token's feature, (tokens, hidden), in the order ``get_image_features`` returns them."""
    keys = {"qwen3_vl": ("pixel_values", "image_grid_thw"), "mistral3": ("pixel_values", "image_sizes")}
    with torch.no_grad():
        out = model.model.get_image_features(**{k: inputs[k] for k in keys.get(family, ("pixel_values",))})
    pooled = out.pooler_output
    return torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled.flatten(0, -2)


def test_grids_hold_the_features_of_their_images(case):
    """The decoder's ``inputs_embeds`` at each grid's positions, grid by grid, are the image features in order."""
    family, model, inputs = case
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    logits(model, inputs)
    hook.remove()
    grids = adapter_for(model).image_grids(**inputs)
    placed = torch.cat([seen["embeds"][g.batch_row, g.positions] for g in grids])
    assert torch.equal(placed, image_features(family, model, inputs))


def test_qwen3_vl_tiles_follow_the_rope_grid():
    model = tiny_families.build("qwen3_vl")
    inputs = tiny_families.make_inputs("qwen3_vl", model)
    assert_tiles_follow_the_rope_grid(model, inputs)


def test_mistral3_raster_rows_end_at_the_break_tokens():
    """Each raster row is a run of image tokens closed by ``[IMG_BREAK]``, the last one by ``[IMG_END]``."""
    model = tiny_families.build("mistral3")
    inputs = tiny_families.make_inputs("mistral3", model)
    ids = inputs["input_ids"]
    for grid in adapter_for(model).image_grids(**inputs):
        (tile,) = grid.tiles
        rows = tile.positions.view(tile.rows, tile.cols)
        assert (rows.diff(dim=1) == 1).all()
        ends = ids[grid.batch_row, rows[:, -1] + 1].tolist()
        assert ends == [tiny_families.BREAK] * (tile.rows - 1) + [tiny_families.IMG_END]


def test_internvl_tile_is_the_pixel_shuffle_raster():
    """``pixel_shuffle`` of a 4x4 patch grid labelled (row, col): token k of the 2x2 tile (flattened as
    ``get_image_features`` does) holds the patches of rows 2(k // 2) + {0, 1} and columns 2(k % 2) + {0, 1}."""
    model = tiny_families.build("internvl")
    rows, cols = adapter_for(model).tile_shape()
    patches = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), dim=-1)[None]
    tokens = model.model.pixel_shuffle(patches, scale_factor=model.config.downsample_ratio).reshape(rows * cols, -1)
    for k, token in enumerate(tokens):
        r, c = divmod(k, cols)
        assert set(token[0::2].tolist()) == {2.0 * r, 2.0 * r + 1}
        assert set(token[1::2].tolist()) == {2.0 * c, 2.0 * c + 1}


def test_gemma3_tile_is_the_pooled_raster():
    """Token k of an image is the average of patch block (k // side, k % side) (``avg_pool`` then ``flatten(2)``)."""
    model = tiny_families.build("gemma3")
    inputs = tiny_families.make_inputs("gemma3", model)
    seen = {}
    pool = model.model.multi_modal_projector.avg_pool
    hook = pool.register_forward_hook(lambda module, args, out: seen.update(inp=args[0], out=out))
    image_features("gemma3", model, inputs)
    hook.remove()
    (tile,) = adapter_for(model).image_grids(**inputs)[0].tiles
    block = seen["inp"].shape[-1] // tile.cols
    tokens = seen["out"].flatten(2)
    for k in range(tile.rows * tile.cols):
        r, c = divmod(k, tile.cols)
        patch_mean = seen["inp"][..., r * block:(r + 1) * block, c * block:(c + 1) * block].mean((-1, -2))
        torch.testing.assert_close(tokens[..., k], patch_mean, atol=1e-6, rtol=0)


REFUSED = {"pyramiddrop": set(), "fastv": set(), "paint": set(), "carve": set()}
"""The families each image-layout method refuses; PyramidDrop and FastV run on all four: InternVL-hf, Mistral3,
Qwen3-VL (boundaries after its deepstack layers: the tiny one has one, so boundary 1 runs) and Gemma3 (per-layer-type
masks and RoPE; ``tests/methods/test_pyramiddrop_families.py``), PAINT on all four
(``tests/methods/test_paint_families.py``), CARVE on all four (``tests/methods/test_carve_families.py``)."""


@pytest.mark.parametrize("method", ["pyramiddrop", "fastv", "paint", "carve"])
def test_image_layout_methods_refuse_before_touching_the_model(case, method):
    family, model, inputs = case
    saved, names = snapshot(model), attn_names(model)
    if family in REFUSED[method]:
        with pytest.raises(UnsupportedModelError, match=rf"\({family}\)"):
            nograd.apply(model, method)
    elif method == "paint":
        with nograd.apply(model, method, layers=(0, None)) as handle:
            logits(model, inputs)
            assert len(handle.stats["selection"]) == len(LAYOUTS[family]) and any(handle.stats["local_tokens"])
    elif method == "carve":  # it needs the processor, and reads attention only while it probes
        from tiny.processor import PROCESSORS

        plain = logits(model, inputs)
        with nograd.apply(model, method, processor=PROCESSORS[family]()) as handle:
            assert handle.stats["layers"] == [1] and torch.equal(logits(model, inputs), plain)
    else:  # the 2-layer decoder: one boundary, after layer 0
        with nograd.apply(model, method, **({"stages": 2} if method == "pyramiddrop" else {"layer": 1})) as handle:
            logits(model, inputs)
            assert handle.stats["boundaries"] == [1] and handle.stats["visual_tokens"]
    assert same_state(model, saved) and attn_names(model) == names and nograd.attached(model) == []


@pytest.mark.parametrize("method, options", [("zerotuning", {"gamma": 3.0}), ("act", {"layers": (0, None)})])
def test_text_methods_steer_the_decoder_and_restore(case, method, options):
    """ZeroTuning / ACT switch only the decoder's attention, change the logits, target each row's first real token
    (Gemma3's decoder gets 4-D masks: the padding is read where Gemma3Model receives it), and undo bit-exactly."""
    family, model, inputs = case
    plain, names, saved = logits(model, inputs), attn_names(model), snapshot(model)
    real = inputs["attention_mask"].bool()
    with nograd.apply(model, method, **options) as handle:
        switched = attn_names(model)
        assert {k for k in names if switched[k] != names[k]} == {"text_config"}
        assert (logits(model, inputs) - plain)[real].abs().max() > 1e-4
        if method == "zerotuning":
            assert handle.stats["target_key"].tolist() == real.int().argmax(dim=1).tolist()
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert attn_names(model) == names and same_state(model, saved)
    assert torch.equal(logits(model, inputs), plain)
