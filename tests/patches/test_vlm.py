"""VLM adapters against tiny random VLMs: recognition, decoder facts, attention switching and image layouts.

Image layouts are checked three ways: the concrete tiles the tiny configs and inputs imply (see ``tiny/vlm.py``);
that the tiles and newlines of a row's images cover exactly its image-token positions; and against the model itself
where it exposes the layout: the ``image_newline`` embedding LLaVA-NeXT/-OneVision write at newline positions, and
the 3D RoPE (t, h, w) positions Qwen2-VL/2.5-VL give image tokens.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from checks import assert_attn_request_switches_the_decoder_only, assert_tiles_follow_the_rope_grid
from nograd.patches import adapter_for, supported_families
from nograd.patches.text_lm import LlamaAdapter, Qwen2Adapter
from nograd.patches.vlm import (
    Idefics3Adapter,
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2_5_VLAdapter,
    Qwen2VLAdapter,
)
from tiny import vlm as tiny_vlm

FAMILIES = sorted(tiny_vlm.BUILDERS)
EXPECTED = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter, "llava_onevision": LlavaOnevisionAdapter,
            "qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter, "idefics3": Idefics3Adapter,
            "smolvlm": Idefics3Adapter}

BASE = ("base", 4, 4, None)  # a 28x28 tile of 7x7 patches
IDEFICS_TILE = 2  # 4x4 patches, pixel-shuffled by scale_factor 2
LAYOUTS = {
    # family -> every image as (batch row, index in row, tiles as (kind, rows, cols, number of newlines or None))
    "llava": [(0, 0, [BASE]), (1, 0, [BASE]), (1, 1, [BASE])],
    "llava_next": [
        # 10x56 -> pinpoint 28x56: 1x2 crops, a 4x8 raster unpadded to 2 rows.
        (0, 0, [BASE, ("crop", 2, 8, 2)]),
        # 56x40 -> pinpoint 56x56: 2x2 crops, an 8x8 raster unpadded to 6 columns.
        (1, 0, [BASE, ("crop", 8, 6, 8)]),
    ],
    "llava_onevision": [
        # 56x40 -> 8x6 as in LLaVA-NeXT, then shrunk by anyres_max_1: ratio sqrt(48/16), to 4x3.
        (0, 0, [BASE, ("crop", 4, 3, 4)]),
        # A two-image row: both unsplit, the base tile followed by one newline.
        (1, 0, [("base", 4, 4, 1)]),
        (1, 1, [("base", 4, 4, 1)]),
    ],
    "qwen2_vl": [(0, 0, [("base", 2, 3, None)]), (1, 0, [("base", 1, 2, None)])],  # grid_thw (1,4,6), (1,2,4)
    "idefics3": [
        (0, 0, [("crop", IDEFICS_TILE, IDEFICS_TILE, None)] * 6 + [("base", IDEFICS_TILE, IDEFICS_TILE, None)]),
        (1, 0, [("base", IDEFICS_TILE, IDEFICS_TILE, None)]),
    ],
}
LAYOUTS["qwen2_5_vl"] = LAYOUTS["qwen2_vl"]
LAYOUTS["smolvlm"] = LAYOUTS["idefics3"]


def tokens_per_row(family) -> list[int]:
    counts = [0, 0]
    for row, _, tiles in LAYOUTS[family]:
        counts[row] += sum(rows * cols + (newlines or 0) for _, rows, cols, newlines in tiles)
    return counts


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    """``(family, model, inputs)``: a tiny model of each VLM family and a left-padded batch for it."""
    family = request.param
    model = tiny.build(family)
    return family, model, tiny_vlm.make_inputs(family, model)


def test_supported_families_lists_vlm_families():
    assert set(supported_families("vlm")) == {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
                                              "qwen3_vl", "idefics3", "internvl", "mistral3", "gemma3"}


def test_adapter_facts(case):
    family, model, _ = case
    adapter, bare = adapter_for(model), adapter_for(model.model)
    assert type(adapter) is type(bare) is EXPECTED[family] and adapter.kind == "vlm"
    decoder = model.model.text_model if family in ("idefics3", "smolvlm") else model.model.language_model
    assert adapter.text_model is bare.text_model is decoder
    assert adapter.text_config is model.config.text_config
    modules = adapter.attention_modules
    assert len(modules) == adapter.num_layers == model.config.text_config.num_hidden_layers == 2
    assert [m.layer_idx for m in modules] == list(range(adapter.num_layers))
    assert all(m is layer.self_attn for m, layer in zip(modules, decoder.layers))
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16) == (
        model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads,
        modules[0].head_dim)
    assert adapter.attn_implementation == model.config.text_config._attn_implementation
    assert adapter.attn_implementation_request("x") == {"text_config": "x"}
    assert adapter.image_token_id == tiny_vlm.IMAGE


def test_decoder_inside_is_matched_by_its_own_family(case):
    """The top model goes to the VLM adapter; its decoder alone to the text adapter (Qwen-VL's to the VLM one)."""
    family, model, _ = case
    decoder = adapter_for(model).text_model
    inner = adapter_for(decoder)
    expected = {"llava_onevision": Qwen2Adapter, "qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter}
    assert type(inner) is expected.get(family, LlamaAdapter)
    assert inner.text_model is decoder


def test_image_token_positions(case):
    family, model, inputs = case
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = adapter_for(model).image_token_positions(ids)
    assert [p.numel() for p in positions] == tokens_per_row(family)
    assert (mask[1, : tiny_vlm.LEFT_PAD] == 0).all()
    for row, found in enumerate(positions):
        assert torch.equal(found, (ids[row] == tiny_vlm.IMAGE).nonzero().flatten())
        assert (mask[row, found] == 1).all()


def test_image_grids(case):
    family, model, inputs = case
    adapter = adapter_for(model)
    grids = adapter.image_grids(**inputs)
    found = [(g.batch_row, g.image_index,
              [(t.kind, t.rows, t.cols, None if t.newline_positions is None else t.newline_positions.numel())
               for t in g.tiles]) for g in grids]
    assert found == LAYOUTS[family]
    positions = adapter.image_token_positions(inputs["input_ids"])
    for row, row_positions in enumerate(positions):
        covered = []
        for grid in (g for g in grids if g.batch_row == row):
            parts = [t.positions for t in grid.tiles] + [t.newline_positions for t in grid.tiles
                                                          if t.newline_positions is not None]
            assert all(t.rows * t.cols == t.positions.numel() for t in grid.tiles)
            assert torch.equal(torch.cat(parts).sort().values, grid.positions)
            covered.append(grid.positions)
        assert torch.equal(torch.cat(covered), row_positions)
    bare = adapter_for(model.model).image_grids(**inputs)
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(grids, bare, strict=True))
    fixed = adapter.tokens_per_image  # the families whose config fixes an image's tokens, whatever its size
    assert (fixed is not None) == (family in {"llava"})
    assert fixed is None or all(grid.positions.numel() == fixed for grid in grids)


def test_llava_full_strategy_keeps_the_cls_token_outside_the_raster():
    model = tiny.build("llava", vision_feature_select_strategy="full")
    inputs = tiny_vlm.make_inputs("llava", model)
    grids = adapter_for(model).image_grids(**inputs)
    assert [g.positions.numel() for g in grids] == [17, 17, 17]
    assert all(torch.equal(g.tiles[0].positions, g.positions[1:]) for g in grids)


def test_idefics3_images_end_at_their_global_image():
    """A row with a 1x2-split image then an unsplit one, in the processor's prompt format."""
    v = tiny_vlm
    crop = [v.FAKE, v.ROW_COL] + [v.IMAGE] * 4
    whole = [v.FAKE, v.GLOBAL] + [v.IMAGE] * 4 + [v.FAKE]
    ids = torch.tensor([[v.BOS] + crop + crop + [v.NEWLINE, v.NEWLINE] + whole + whole])
    grids = adapter_for(tiny.build("idefics3")).image_grids(ids)
    assert [(g.image_index, [t.kind for t in g.tiles]) for g in grids] == [(0, ["crop", "crop", "base"]), (1, ["base"])]
    assert torch.equal(grids[1].positions, torch.arange(24, 28))


def test_image_grids_refuse_images_that_do_not_fill_the_tokens():
    model = tiny.build("llava")
    inputs = tiny_vlm.make_inputs("llava", model)
    with pytest.raises(ValueError, match="no image"):
        adapter_for(model).image_grids(**{**inputs, "pixel_values": inputs["pixel_values"][:2]})


def decoder_inputs_embeds(model, inputs) -> torch.Tensor:
    """The ``inputs_embeds`` the decoder receives (text and image features merged) in a forward pass."""
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = adapter_for(model).text_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_newline_positions_hold_the_image_newline(family):
    model = tiny.build(family)
    inputs = tiny_vlm.make_inputs(family, model)
    embeds = decoder_inputs_embeds(model, inputs)
    newline = model.model.image_newline
    for grid in adapter_for(model).image_grids(**inputs):
        for tile in grid.tiles:
            if tile.newline_positions is not None:
                assert torch.allclose(embeds[grid.batch_row, tile.newline_positions], newline.expand(
                    tile.newline_positions.numel(), -1))
            assert not torch.isclose(embeds[grid.batch_row, tile.positions], newline).all(-1).any()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tiles_follow_the_rope_grid(family):
    """Each tile's tokens, in raster order, get 3D RoPE heights row by row and widths column by column."""
    model = tiny.build(family)
    inputs = tiny_vlm.make_inputs(family, model)
    assert_tiles_follow_the_rope_grid(model, inputs)


def test_forward_and_generate(case):
    family, model, inputs = case
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_implementation_request_switches_the_decoder_only(family):
    assert_attn_request_switches_the_decoder_only(tiny.build(family))
