"""CARVE on the "anyres" families, LLaVA-NeXT and LLaVA-OneVision, with their real (tiny) processors: a planted
attention peak on one token of the high-resolution raster (the crop tiles stitched, newlines left out) lands in that
token's pixel box of a non-square image, and ``generate`` runs end to end (probe batch, refinement, final pass on the
original and the refined image: a two-image prompt, which OneVision leaves unsplit)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import nograd
from planting import planted_peak, probe_grids  # (importing planting registers "test_plant_key")
from nograd.methods.carve_geometry import image_views
from tiny.processor import PROCESSORS, image

QUESTION = "What is on the left?"


# (family, image (W, H), high-res raster rows x cols, planted token (r, c), its pixel box (x0, y0, x1, y1)).
# The tiles are 28x28 of 7x7 patches (4x4 tokens); pinpoints (H, W) 28x56, 56x28, 56x56. The processor resizes the
# image into the best pinpoint (keeping its aspect, ``get_patch_output_size``), pads it centred and cuts it into
# tiles; the model stitches the tiles' tokens into one raster of 4 * (tiles per column) x 4 * (tiles per row),
# removes the rows or columns that are all padding (``unpad_image``) and appends a newline token per row.
CASES = [
    # NeXT 120x60: pinpoint 28x56 (1x2 tiles), the image resized to exactly 56x28, no padding: a 4x8 raster over the
    # whole image, cells of 120/8 = 15 by 60/4 = 15 px; token (1, 5) -> x in [75, 90), y in [15, 30).
    ("llava_next", (120, 60), (4, 8), (1, 5), (75, 15, 90, 30)),
    # NeXT 60x120: pinpoint 56x28 (2x1 tiles): an 8x4 raster, cells 15x15 px; token (6, 1) -> x [15, 30), y [90, 105).
    ("llava_next", (60, 120), (8, 4), (6, 1), (15, 90, 30, 105)),
    # NeXT 70x42: pinpoint 56x56 (2x2 tiles, an 8x8 raster). The image is resized to 56 x ceil(42 * 0.8) = 34 px and
    # padded by 11 rows above; ``unpad_image`` keeps raster rows 2..5 (round(42 * 8 / 70) = 4 rows, 2 cut each side).
    # Kept row r covers padded rows [14 + 7r, 21 + 7r), i.e. resized rows [3 + 7r, 10 + 7r), i.e. original rows
    # [(3 + 7r) * 42/34, (10 + 7r) * 42/34): for r = 2, [20.99, 29.65). Columns: 8 of 70/8 = 8.75 px; c = 5 ->
    # x in [43.75, 52.5). (CARVE stretches the 4 rows over all 42 rows, cells of 10.5: row 2's centre, 26.25, lies
    # inside the true box.)
    ("llava_next", (70, 42), (4, 8), (2, 5), (43.75, (3 + 14) * 42 / 34, 52.5, (10 + 14) * 42 / 34)),
    # OneVision 120x60: as NeXT, a 4x8 raster (32 tokens); vision_aspect_ratio "anyres_max_1" allows 1 tile of 16
    # tokens, ratio sqrt(32 / 16) = 1.41 > 1.1, so the model shrinks it (bilinear) to int(4 / 1.41) x int(8 / 1.41)
    # = 2x5, still over the whole image: cells 120/5 = 24 by 60/2 = 30 px; token (1, 3) -> x [72, 96), y [30, 60).
    ("llava_onevision", (120, 60), (2, 5), (1, 3), (72, 30, 96, 60)),
    # OneVision 60x120: 8x4 shrunk to 5x2, cells 30 by 24 px; token (3, 0) -> x [0, 30), y [72, 96).
    ("llava_onevision", (60, 120), (5, 2), (3, 0), (0, 72, 30, 96)),
]


@pytest.mark.parametrize("family, size, shape, token, box", CASES)
def test_a_planted_peak_lands_in_its_pixel_box(carve_models, family, size, shape, token, box):
    model = carve_models(family)
    picture = image(*size)
    with nograd.apply(model, "carve", processor=PROCESSORS[family](), steps="first", probe_max_new_tokens=1,
                      answer_suffix=None) as carve:
        _, grids = probe_grids(carve, picture, QUESTION)
        grid = grids[0]  # batch row 0's image
        positions, views = image_views(carve.adapter, grid, picture.size)
        (view,) = views
        crop = [t for t in grid.tiles if t.kind == "crop"]
        assert len(crop) == 1 and (view.rows, view.cols) == shape == (crop[0].rows, crop[0].cols)
        assert len(crop[0].newline_positions) == shape[0] and torch.equal(positions, crop[0].positions)
        r, c = token
        saliency, (x, y) = planted_peak(carve, picture, QUESTION, int(positions[view.index[r * view.cols + c]]))
    x0, y0, x1, y1 = box
    assert saliency.shape == (size[1], size[0]) and x0 <= x < x1 and y0 <= y < y1


@pytest.mark.parametrize("family, size", [("llava_next", (120, 60)), ("llava_onevision", (60, 120))])
def test_generate_runs_end_to_end(carve_models, family, size):
    model = carve_models(family)
    picture = image(*size, seed=7)
    # the official options, fewer tokens per pass (steps="all" still fuses several steps)
    with nograd.apply(model, "carve", processor=PROCESSORS[family](), probe_max_new_tokens=8,
                      max_new_tokens=4) as handle:
        out = handle.generate(picture, QUESTION)
        passes = handle.stats["passes"]
    assert out.mask.shape == (size[1], size[0]) and out.mask.dtype == torch.bool and bool(out.mask.any())
    assert out.saliency.shape == (size[1], size[0]) and isinstance(out.refined_image, Image.Image)
    assert passes == 2 and isinstance(out.text, str)
    assert out.maps["task"].shape[-1] == out.maps["positions"].shape[-1]
