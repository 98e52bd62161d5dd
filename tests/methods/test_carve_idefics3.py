"""CARVE on Idefics3 and SmolVLM with the real (tiny) ``Idefics3Processor``: every crop's cell in the split equals
the processor's own ``<row_r_col_c>`` tag, a planted attention peak on one token of one crop lands in that token's
pixel box (crops tile the original image uniformly), and ``generate`` runs end to end."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

import nograd
from planting import planted_peak, probe_grids  # (importing planting registers "test_plant_key")
from nograd.methods.carve_geometry import image_views
from tiny.processor import PROCESSORS, image

QUESTION = "What is on the left?"


def probe_grid(carve, picture):
    inputs, grids = probe_grids(carve, picture, QUESTION)
    return inputs["input_ids"], grids[0]


@pytest.mark.parametrize("size, split", [((60, 30), (1, 2)), ((30, 60), (2, 1)), ((40, 56), (2, 2)), ((14, 14), (2, 2))])
def test_crop_cells_are_the_processors_tags(carve_models, size, split):
    processor = PROCESSORS["idefics3"]()
    with nograd.apply(carve_models("idefics3"), "carve", processor=processor) as carve:
        input_ids, grid = probe_grid(carve, image(*size))
    crops = [tile for tile in grid.tiles if tile.kind == "crop"]
    assert len(crops) == split[0] * split[1] and grid.tiles[-1].kind == "base"
    for tile in crops:
        tag = processor.tokenizer.convert_ids_to_tokens(int(input_ids[0, tile.positions[0] - 1]))
        r, c = map(int, re.fullmatch(r"<row_(\d)_col_(\d)>", tag).groups())
        assert tile.cell == (r - 1, c - 1, *split)


# (family, image (W, H), crop (r, c), token (i, j) of its 2x2 raster, the token's pixel box (x0, y0, x1, y1)).
# The processor resizes the longest edge to 56 and stretches to whole 28-pixel tiles, so the R x C crops tile the
# original image uniformly, each crop's 2x2 tokens its quarters.
CASES = [
    ("idefics3", (60, 30), (0, 1), (1, 0), (30, 15, 45, 30)),   # 1x2 crops of 30x30, cells of 15x15
    ("idefics3", (40, 56), (1, 0), (0, 1), (10, 28, 20, 42)),   # 2x2 crops of 20x28, cells of 10x14
    ("smolvlm", (30, 60), (1, 0), (1, 1), (15, 45, 30, 60)),    # 2x1 crops of 30x30, cells of 15x15
]


@pytest.mark.parametrize("family, size, crop, token, box", CASES)
def test_a_planted_peak_lands_in_its_pixel_box(carve_models, family, size, crop, token, box):
    picture = image(*size)
    model = carve_models(family)
    with nograd.apply(model, "carve", processor=PROCESSORS[family](), steps="first", probe_max_new_tokens=1,
                      answer_suffix=None) as carve:
        _, grid = probe_grid(carve, picture)
        positions, views = image_views(carve.adapter, grid, picture.size)
        (k,) = [k for k, t in enumerate(t for t in grid.tiles if t.kind == "crop") if t.cell[:2] == crop]
        tile, view = grid.tiles[k], views[k]
        assert torch.equal(positions[view.index], tile.positions)
        key = int(tile.positions[token[0] * tile.cols + token[1]])
        saliency, (x, y) = planted_peak(carve, picture, QUESTION, key)
    x0, y0, x1, y1 = box
    assert saliency.shape == (size[1], size[0]) and x0 <= x < x1 and y0 <= y < y1


def test_generate_runs_end_to_end_and_restores(carve_models):
    model = carve_models("smolvlm")
    picture = image(60, 40, seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with nograd.apply(model, "carve", processor=PROCESSORS["smolvlm"](), probe_max_new_tokens=4,
                      max_new_tokens=4) as handle:
        out = handle.generate(picture, QUESTION)
    assert out.mask.shape == (40, 60) and out.mask.dtype == torch.bool and bool(out.mask.any())
    assert isinstance(out.refined_image, Image.Image) and isinstance(out.text, str)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("size", [(1, 1), (1, 2)])
def test_an_image_smaller_than_its_split(carve_models, size):
    """A 1x1 image split into 2x2 crops: cells that cover no pixel add nothing (their interpolation into an empty
    box raised); the saliency is the image's size, finite, and the pixels come from the covering cells."""
    model = carve_models("smolvlm")
    with nograd.apply(model, "carve", processor=PROCESSORS["smolvlm"](), probe_max_new_tokens=2,
                      max_new_tokens=2) as carve:
        saliency = carve.saliency(image(*size), QUESTION)
        out = carve.generate(image(*size), QUESTION)
    assert saliency.shape == (size[1], size[0]) and torch.isfinite(saliency).all()
    assert out.mask.shape == (size[1], size[0])


def test_cells_of_a_hand_written_two_by_three_split(carve_models):
    """``make_inputs`` writes a 2 x 3 split (then the global image) in even rows and an unsplit image in odd rows."""
    from tiny.vlm import make_inputs

    model = carve_models("idefics3")
    inputs = make_inputs("idefics3", model)
    image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    split, unsplit = nograd.patches.adapter_for(model).image_grids(inputs["input_ids"], **image_inputs)
    assert [t.cell for t in split.tiles] == [(r, c, 2, 3) for r in range(2) for c in range(3)] + [None]
    assert [t.kind for t in unsplit.tiles] == ["base"] and unsplit.tiles[0].cell is None
