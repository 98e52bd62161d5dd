"""CARVE on Gemma3, Qwen3-VL, Mistral3 and InternVL-hf with their real (tiny) processors (``nograd.tiny.processors``
at the sizes of ``tiny/vlm_families.py``): the views agree with the layout the processor wrote, a planted attention
peak on one token lands in that token's pixel box (derived below from the processor's resize rules), and
``generate`` runs end to end and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import nograd
from planting import planted_peak, probe_grids  # (importing planting registers "test_plant_key")
from nograd.methods.carve import RowProbe
from nograd.methods.carve_geometry import crop_split, image_views
from tiny.processor import PROCESSORS, image

QUESTION = "What is on the left?"


def probe_grid(carve, picture):
    """The probe batch's inputs and the grid of its row 0's image."""
    inputs, grids = probe_grids(carve, picture, QUESTION)
    assert len(grids) == 2
    return inputs, grids[0]


# (family, image (W, H), views as (rows, cols) each, the planted view and its token (r, c), the token's pixel box).
CASES = [
    # Gemma3: the image is stretched to 28x28 (``size`` height = width = 28), its 4x4 patches pooled to 2x2 tokens:
    # each token is a quarter of the whole image. 60x30: cells of 30x15, token (1, 0) -> x [0, 30), y [15, 30).
    ("gemma3", (60, 30), [(2, 2)], 0, (1, 0), (0, 15, 30, 30)),
    # 30x60: cells of 15x30, token (0, 1) -> x [15, 30), y [0, 30).
    ("gemma3", (30, 60), [(2, 2)], 0, (0, 1), (15, 0, 30, 30)),
    # Qwen3-VL (Qwen2-VL's image processor, factor patch 7 x merge 2 = 14): smart_resize(H=60, W=120) rounds each side
    # to a multiple of 14, 56 x 126 (12544 >= 7056 >= 784 pixels: no rescale), 8x18 patches, 4x9 merged tokens over
    # the whole image, cells of 120/9 x 15; token (2, 7) -> x [93.3, 106.7), y [30, 45).
    ("qwen3_vl", (120, 60), [(4, 9)], 0, (2, 7), (7 * 120 / 9, 30, 8 * 120 / 9, 45)),
    # 60x120: 126 x 56 -> 9x4 tokens, cells of 15 x 120/9; token (6, 1) -> x [15, 30), y [80, 93.3).
    ("qwen3_vl", (60, 120), [(9, 4)], 0, (6, 1), (15, 6 * 120 / 9, 30, 7 * 120 / 9)),
    # Mistral3 (Pixtral: longest edge 28, sides rounded up to multiples of 7 x 2 = 14). 56x42: ratio max(42, 56) / 28
    # = 2 -> 21 x 28 -> rounded up to 28 x 28: 2x2 tokens over the whole image, cells of 28x21; token (1, 0) ->
    # x [0, 28), y [21, 42).
    ("mistral3", (56, 42), [(2, 2)], 0, (1, 0), (0, 21, 28, 42)),
    # 60x30: ratio 60/28 -> floor(14.0) x floor(28.0) = 14 x 28: 1x2 tokens, cells 30x30; token (0, 1) -> x [30, 60).
    ("mistral3", (60, 30), [(1, 2)], 0, (0, 1), (30, 0, 60, 30)),
    # 30x45: ratio 45/28 -> 28 x 18, the width rounded up to 28 (a stretch): 2x2 tokens, cells 15 x 22.5; token (0, 1)
    # -> x [15, 30), y [0, 22.5).
    ("mistral3", (30, 45), [(2, 2)], 0, (0, 1), (15, 0, 30, 22.5)),
    # InternVL-hf (crop_to_patches, tiles 28x28, 1..4 tiles): get_optimal_tiled_canvas picks the grid of the closest
    # aspect ratio; the image is stretched to C x R tiles, cut row-major, then the thumbnail (left out). Each tile
    # has 2x2 tokens. 60x30: aspect 2 -> 1 x 2 crops of 30x30; crop (0, 1), token (1, 0) -> x [30, 45), y [15, 30).
    ("internvl", (60, 30), [(2, 2)] * 2, 1, (1, 0), (30, 15, 45, 30)),
    # 30x60: 2 x 1 crops of 30x30; crop (1, 0), token (0, 1) -> x [15, 30), y [30, 45).
    ("internvl", (30, 60), [(2, 2)] * 2, 1, (0, 1), (15, 30, 30, 45)),
    # 50x50: aspect 1 ties 1x1 and 2x2; area 2500 > 0.5 * 4 * 28^2 = 1568 favours 2 x 2 crops of 25x25; crop (1, 1)
    # (the 4th), token (0, 0) -> x [25, 37.5), y [25, 37.5).
    ("internvl", (50, 50), [(2, 2)] * 4, 3, (0, 0), (25, 25, 37.5, 37.5)),
    # 28x28: the tie stays 1x1 (784 < 1568): one tile, no thumbnail, over the whole image; token (1, 1) -> [14, 28).
    ("internvl", (28, 28), [(2, 2)], 0, (1, 1), (14, 14, 28, 28)),
]


@pytest.mark.parametrize("family, size, shapes, k, token, box", CASES)
def test_a_planted_peak_lands_in_its_pixel_box(carve_models, family, size, shapes, k, token, box):
    model, picture, processor = carve_models(family), image(*size), PROCESSORS[family]()
    with nograd.apply(model, "carve", processor=processor, steps="first", probe_max_new_tokens=1,
                      answer_suffix=None) as carve:
        _, grid = probe_grid(carve, picture)
        split = crop_split(carve.adapter, processor.image_processor, picture.size)
        positions, views = image_views(carve.adapter, grid, picture.size, split=split)
        assert [(v.rows, v.cols) for v in views] == shapes
        view = views[k]
        key = int(positions[view.index[token[0] * view.cols + token[1]]])
        saliency, (x, y) = planted_peak(carve, picture, QUESTION, key)
    x0, y0, x1, y1 = box
    assert saliency.shape == (size[1], size[0]) and x0 <= x < x1 and y0 <= y < y1


@pytest.mark.parametrize("size", [(60, 30), (30, 60), (50, 50), (28, 28), (90, 20), (40, 100)])
def test_internvl_split_is_the_processors(carve_models, size):
    """R x C re-derived by ``crop_split`` covers as many crops as the processor cut (``num_patches`` less the
    thumbnail), and the views are the crops in row-major order, over uniform cells of the image."""
    processor = PROCESSORS["internvl"]()
    picture = image(*size)
    tiles = int(processor.image_processor(images=[picture])["num_patches"][0])
    with nograd.apply(carve_models("internvl"), "carve", processor=processor) as carve:
        _, grid = probe_grid(carve, picture)
        split = crop_split(carve.adapter, processor.image_processor, picture.size)
        positions, views = image_views(carve.adapter, grid, picture.size, split=split)
    crops = [t for t in grid.tiles if t.kind == "crop"]
    assert len(crops) == (tiles - 1 if tiles > 1 else 0) and len(views) == max(len(crops), 1)
    if crops:
        rows, cols = split
        assert rows * cols == len(crops) and torch.equal(positions, torch.cat([t.positions for t in crops]))
        width, height = size
        assert [v.box for v in views] == [(c * width // cols, r * height // rows, (c + 1) * width // cols,
                                           (r + 1) * height // rows) for r in range(rows) for c in range(cols)]
    else:
        assert views[0].box == (0, 0, *size)


def test_mistral3_rows_end_in_break_tokens(carve_models):
    """The Pixtral processor ends each row of tokens with ``[IMG_BREAK]``, the last with ``[IMG_END]``: the view's
    rows are those rows, the break tokens left out."""
    processor = PROCESSORS["mistral3"]()
    with nograd.apply(carve_models("mistral3"), "carve", processor=processor) as carve:
        inputs, grid = probe_grid(carve, image(56, 42))
        positions, (view,) = image_views(carve.adapter, grid, (56, 42))
    ids = inputs["input_ids"][0]
    ends = positions.reshape(view.rows, view.cols)[:, -1] + 1
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[ends].tolist())
    assert tokens == ["[IMG_BREAK]"] * (view.rows - 1) + ["[IMG_END]"]


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl", "mistral3", "internvl"])
def test_generate_runs_end_to_end_and_restores(carve_models, family):
    model = carve_models(family)
    picture = image(60, 40, seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with nograd.apply(model, "carve", processor=PROCESSORS[family](), probe_max_new_tokens=4,
                      max_new_tokens=4) as handle:
        out = handle.generate(picture, QUESTION)
        passes = handle.stats["passes"]
    assert out.mask.shape == (40, 60) and out.mask.dtype == torch.bool and bool(out.mask.any())
    assert out.saliency.shape == (40, 60) and isinstance(out.refined_image, Image.Image)
    assert passes == 2 and isinstance(out.text, str)
    assert out.maps["task"].shape[-1] == out.maps["positions"].shape[-1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and nograd.attached(model) == []


def test_gemma3_pan_and_scan_is_refused(carve_models):
    """Pan-and-scan (off by default) writes crops as images of their own after the original: carve refuses, before
    generating."""
    processor = PROCESSORS["gemma3"]()

    class PanAndScan(type(processor)):  # the call's own kwargs win over the processor's defaults, in every version
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, do_pan_and_scan=True, pan_and_scan_min_crop_size=14, **kwargs)

    processor.__class__ = PanAndScan
    with nograd.apply(carve_models("gemma3"), "carve", processor=processor) as carve:
        with pytest.raises(NotImplementedError, match="pan-and-scan"):
            carve.generate(image(120, 30), QUESTION)
        assert carve.stats["passes"] == 0


def test_rows_of_a_sliding_window_cache_are_shifted_to_their_keys():
    """Gemma3's sliding layers see only the last K keys while decoding: step t of a prompt of 5 tokens has 5 + t
    positions, so key j of a 3-key row is position 5 + t - 3 + j; image keys the window dropped read 0. A static
    cache longer than the sequence holds position j at key j."""
    probe = RowProbe(1)
    probe.start(torch.tensor([[2, 3]]), 5)
    probe.record(0, torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]]))  # prefill: every key
    probe.record(0, torch.tensor([[0.5, 0.6, 0.7]]))  # t = 1: positions 3, 4, 5
    probe.record(0, torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]]))  # t = 2, a full layer: every key
    probe.record(0, torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.0]]))  # t = 3, a static cache of 9
    expected = torch.tensor([[0.2, 0.3], [0.0, 0.5], [0.3, 0.4], [0.3, 0.4]])
    torch.testing.assert_close(probe.stop()[0, :, 0], expected)
