"""CARVE refinement stage (``nograd.methods.carve_regions``): the threshold equals numpy's percentile, 4-connected
labelling against a reference, the keep count of both rules on planted blobs, the three ranking strategies, and the
geometry of Phi (cover size, blackout, empty-mask identity)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from nograd.methods import carve_regions as cr
from nograd.methods.carve_regions import Regions, is_flat, label_components, refine_image, select_regions


def reference_labels(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Breadth-first 4-connected labelling, components numbered in raster order of their first pixel."""
    h, w = mask.shape
    grid = mask.tolist()
    labels = [[0] * w for _ in range(h)]
    count = 0
    for r in range(h):
        for c in range(w):
            if grid[r][c] and not labels[r][c]:
                count += 1
                labels[r][c] = count
                queue = deque([(r, c)])
                while queue:
                    y, x = queue.popleft()
                    for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                        if 0 <= yy < h and 0 <= xx < w and grid[yy][xx] and not labels[yy][xx]:
                            labels[yy][xx] = count
                            queue.append((yy, xx))
    return torch.tensor(labels, dtype=torch.long).view(h, w), count


@pytest.fixture
def torch_only(monkeypatch):
    monkeypatch.setattr(cr, "_label_scipy", lambda mask: None)


def planted(blobs, shape=(16, 20), seed=0):
    """Saliency: noise in [0, 0.01) with each blob (y0, x0, y1, x1, level) set to level + noise in [0, 0.01); the
    top_p whose threshold falls between the largest background value and the smallest blob value."""
    g = torch.Generator().manual_seed(seed)
    saliency = torch.rand(shape, generator=g, dtype=torch.float64) * 0.01
    inside = torch.zeros(shape, dtype=torch.bool)
    for y0, x0, y1, x1, level in blobs:
        saliency[y0:y1, x0:x1] += level
        inside[y0:y1, x0:x1] = True
    pixels, area = inside.numel(), int(inside.sum())
    top_p = (area - 0.5 * (1 - area / pixels)) / pixels
    return saliency, inside, top_p


def grid_blobs(n, level=1.0):
    """n 3x3 blobs in 4x4 cells of a 16x20 map (4 rows of 5), levels rising so no two blobs tie."""
    return [(4 * (i // 5), 4 * (i % 5), 4 * (i // 5) + 3, 4 * (i % 5) + 3, level + 0.1 * i) for i in range(n)]


# ---- threshold ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_equals_numpy_percentile(dtype):
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1), (7, 9), (31, 17)]:
        saliency = torch.randn(shape, generator=g, dtype=dtype)
        for top_p in (0.2, 0.4, 1 / 3, 0.6, 0.999, 1.0, 1e-6):
            regions = select_regions(saliency, top_p=top_p)
            # against numpy in float64, to the input dtype's rounding (numpy's own float32 interpolation differs
            # between numpy 2.2 and 2.4)
            expected = float(np.percentile(saliency.double().numpy(), (1.0 - top_p) * 100))
            tolerance = 4 * torch.finfo(dtype).eps * float(saliency.abs().max())
            assert regions.threshold == pytest.approx(expected, rel=0, abs=tolerance)
    rounded = (torch.randn(40, 40, generator=g) * 2).round()  # many ties
    for top_p in (0.2, 0.5, 0.75):
        expected = float(np.percentile(rounded.numpy(), (1.0 - top_p) * 100))
        assert select_regions(rounded, top_p=top_p).threshold == expected


@pytest.mark.parametrize("top_p", [0.05, 0.2, 0.4, 0.77])
def test_mask_area_at_most_top_p_on_a_tie_free_map(top_p):
    saliency = torch.randperm(50 * 60, generator=torch.Generator().manual_seed(2)).view(50, 60).double()
    regions = select_regions(saliency, top_p=top_p, strategy="remove_small", outlier_percent=0.0)
    thresholded = saliency >= regions.threshold
    assert torch.equal(regions.mask, thresholded)
    assert int(thresholded.sum()) <= top_p * saliency.numel() + 1
    assert int(thresholded.sum()) >= top_p * saliency.numel() - 1
    assert regions.mask.dtype == torch.bool and regions.mask.shape == saliency.shape


@pytest.mark.parametrize("strategy", cr.STRATEGIES)
def test_top_p_one_keeps_every_pixel(strategy):
    saliency = torch.rand(13, 11, generator=torch.Generator().manual_seed(3))
    regions = select_regions(saliency, top_p=1.0, strategy=strategy)
    assert bool(regions.mask.all()) and regions.bbox == (0, 0, 11, 13)
    assert regions.num_components == 1 and regions.kept == 1


# ---- labelling ------------------------------------------------------------------------------------------------------
def test_torch_labelling_equals_breadth_first_reference(torch_only):
    g = torch.Generator().manual_seed(4)
    for _ in range(60):
        h, w = torch.randint(1, 30, (2,), generator=g).tolist()
        mask = torch.rand(h, w, generator=g) < torch.rand(1, generator=g).item()
        labels, count = label_components(mask)
        expected, expected_count = reference_labels(mask)
        assert count == expected_count and torch.equal(labels, expected)


def test_torch_labelling_on_long_snakes(torch_only):
    rows = torch.zeros(41, 41, dtype=torch.bool)
    rows[::2] = True
    rows[1::4, -1] = True
    rows[3::4, 0] = True
    cols = rows.T.contiguous()
    for snake in (rows, cols):
        labels, count = label_components(snake)
        assert count == 1 and torch.equal(labels, snake.long())
    assert label_components(torch.zeros(3, 4, dtype=torch.bool))[1] == 0


def test_diagonal_neighbours_are_two_components(torch_only):
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0:3, 0:3] = True
    mask[3:6, 3:6] = True
    labels, count = label_components(mask)
    assert count == 2
    assert bool((labels[0:3, 0:3] == 1).all()) and bool((labels[3:6, 3:6] == 2).all())
    saliency = mask.double() + 0.001 * torch.arange(36).view(6, 6)
    assert select_regions(saliency, top_p=0.5, min_regions=1, keep_rule="paper").num_components == 2


def test_labels_in_raster_order_of_first_pixel(torch_only):
    mask = torch.tensor([[0, 0, 0, 1],
                         [1, 0, 0, 1],
                         [1, 0, 1, 1],
                         [0, 0, 0, 0],
                         [1, 1, 1, 1]], dtype=torch.bool)
    labels, count = label_components(mask)
    assert count == 3
    assert labels.tolist() == [[0, 0, 0, 1], [2, 0, 0, 1], [2, 0, 1, 1], [0, 0, 0, 0], [3, 3, 3, 3]]


def test_torch_labelling_equals_scipy():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        mask = torch.rand(37, 23, generator=g) < 0.55
        with_scipy = label_components(mask)
        first = cr._label_torch(mask)
        roots, inverse = torch.unique(first[mask], sorted=True, return_inverse=True)
        labels = torch.zeros(mask.shape, dtype=torch.long)
        labels[mask] = inverse + 1
        assert with_scipy[1] == roots.numel() and torch.equal(with_scipy[0], labels)


# ---- keep count and ranking -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 12, 20])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_keep_count_of_both_rules(n, k):
    saliency, inside, top_p = planted(grid_blobs(n))
    official = select_regions(saliency, top_p=top_p, min_regions=k, keep_rule="official")
    assert torch.equal(saliency >= official.threshold, inside) and official.num_components == n
    assert official.kept == min(n, max(k, int(top_p * n)))
    assert label_components(official.mask)[1] == official.kept
    paper = select_regions(saliency, top_p=top_p, min_regions=k, keep_rule="paper")
    assert paper.kept == min(k, n) and label_components(paper.mask)[1] == min(k, n)
    if n >= 12:
        assert int(top_p * n) > 3  # the two rules disagree on these
    # attention_sum keeps the highest blobs: the last planted ones
    kept_levels = sorted({round(float(v)) for v in (saliency[paper.mask] - 1) * 10})
    assert kept_levels == list(range(n - min(k, n), n))


def test_attention_sum_and_size_disagree():
    big = [(0, 0, 4, 4, 1.0), (0, 10, 4, 14, 1.1)]  # 16 px, sum ~16-18
    small = [(10, 0, 11, 2, 20.0), (10, 10, 11, 12, 21.0)]  # 2 px, sum ~40-42
    saliency, inside, top_p = planted(big + small)
    kw = dict(top_p=top_p, min_regions=2, keep_rule="paper")
    by_sum = select_regions(saliency, strategy="attention_sum", **kw)
    by_size = select_regions(saliency, strategy="size", **kw)
    assert by_sum.num_components == by_size.num_components == 4
    small_mask = torch.zeros_like(inside)
    for y0, x0, y1, x1, _ in small:
        small_mask[y0:y1, x0:x1] = True
    assert torch.equal(by_sum.mask, small_mask)
    assert torch.equal(by_size.mask, inside & ~small_mask)
    assert by_sum.bbox == (0, 10, 12, 11)
    assert by_size.bbox == (0, 0, 14, 4)


def test_remove_small_drops_tiny_blobs():
    big = [(0, 0, 5, 5, 1.0), (0, 8, 5, 13, 1.0), (8, 0, 13, 5, 1.0)]  # 75 px
    tiny = [(10, 10, 11, 11, 5.0), (12, 15, 13, 16, 5.0), (2, 18, 3, 19, 5.0)]  # 1 px each
    saliency, inside, top_p = planted(big + tiny)
    regions = select_regions(saliency, top_p=top_p, strategy="remove_small", outlier_percent=2.0)  # min size 1
    assert regions.num_components == 6 and regions.kept == 6
    regions = select_regions(saliency, top_p=top_p, strategy="remove_small", outlier_percent=3.0)  # min size 2
    assert regions.kept == 3 and int(regions.mask.sum()) == 75
    assert not bool(regions.mask[10, 10]) and bool(regions.mask[0, 0])
    regions = select_regions(saliency, top_p=top_p, strategy="remove_small", outlier_percent=40.0)  # min size 31
    assert regions.kept == 0 and regions.bbox is None and not bool(regions.mask.any())


def test_is_flat():
    assert is_flat(torch.full((4, 5), 0.3))
    assert is_flat(torch.zeros(4, 5))
    assert is_flat(torch.tensor([[1.0, float("nan")]]))
    assert is_flat(torch.tensor([[1.0, 1.0005]]))
    assert not is_flat(torch.tensor([[1.0, 1.002]]))
    assert not is_flat(torch.tensor([[-1.0, 1.0]]))


# ---- Phi ------------------------------------------------------------------------------------------------------------
def make_image(w=40, h=30, seed=6):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(1, 256, (h, w, 3), generator=g, dtype=torch.uint8)  # no pixel is 0
    return Image.fromarray(pixels.numpy()), pixels


def regions_of(mask: torch.Tensor) -> Regions:
    return Regions(mask=mask, threshold=0.0, num_components=1, kept=1, bbox=cr.bounding_box(mask))


@pytest.mark.parametrize("box", [(0, 0, 10, 10), (5, 3, 12, 25), (2, 20, 39, 26), (30, 29, 31, 30), (0, 0, 40, 30)])
@pytest.mark.parametrize("mode", ["mask_crop_resize", "crop_resize"])
@pytest.mark.parametrize("margin", [0, 3])
def test_refined_size_covers_the_original(box, mode, margin):
    image, _ = make_image()
    mask = torch.zeros(30, 40, dtype=torch.bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    refined = refine_image(image, regions_of(mask), mode=mode, bbox_margin=margin)
    w, h = refined.size
    assert (w == 40 and h >= 30) or (h == 30 and w >= 40)
    cw, ch = min(40, x1 + margin) - max(0, x0 - margin), min(30, y1 + margin) - max(0, y0 - margin)
    if 40 / cw >= 30 / ch:
        assert w == 40 and abs(h - ch * 40 / cw) <= 0.5
    else:
        assert h == 30 and abs(w - cw * 30 / ch) <= 0.5


def test_mask_mode_blacks_out_every_channel():
    image, pixels = make_image()
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[4:10, 5:15] = True
    mask[20:25, 30:38] = True
    refined = torch.from_numpy(np.array(refine_image(image, regions_of(mask), mode="mask")))
    assert refined.shape == pixels.shape
    assert bool((refined[~mask] == 0).all()) and torch.equal(refined[mask], pixels[mask])


def test_crop_without_resize_blacks_out_gaps_and_crop_resize_keeps_them():
    image, pixels = make_image()
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[0:5, 0:6] = True  # corners: the bbox is the whole image, so no resize
    mask[26:30, 33:40] = True
    regions = regions_of(mask)
    assert regions.bbox == (0, 0, 40, 30)
    refined = torch.from_numpy(np.array(refine_image(image, regions)))
    assert bool((refined[~mask] == 0).all()) and torch.equal(refined[mask], pixels[mask])
    kept = refine_image(image, regions, mode="crop_resize")
    assert torch.equal(torch.from_numpy(np.array(kept)), pixels)


def test_crop_is_the_bbox_of_the_masked_image():
    image, pixels = make_image()
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[10:13, 8:12] = True  # 4x3 crop, scale 10: 40x30, one pixel becomes a 10x10 LANCZOS block
    mask[11, 10] = False
    refined = torch.from_numpy(np.array(refine_image(image, regions_of(mask)))).int()
    assert refined.shape == (30, 40, 3)
    assert int(refined[14, 24].abs().max()) <= 40  # centre of the blacked-out pixel's block: near black
    assert int((refined[5, 5] - pixels[10, 8].int()).abs().max()) <= 40  # centre of a kept pixel's block


def test_empty_mask_returns_an_identical_copy():
    image, pixels = make_image()
    saliency = torch.rand(30, 40, generator=torch.Generator().manual_seed(7))
    regions = select_regions(saliency, top_p=0.3, strategy="remove_small", outlier_percent=100.0)
    assert regions.bbox is None and regions.kept == 0
    for mode in cr.REFINE_MODES:
        refined = refine_image(image, regions, mode=mode)
        assert refined is not image and refined.size == image.size
        assert torch.equal(torch.from_numpy(np.array(refined)), pixels)


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(min_regions=0), "min_regions"), (dict(min_regions=2.0), "min_regions"),
    (dict(min_regions=True), "min_regions"),
    (dict(keep_rule="max"), "keep_rule"), (dict(strategy="sum"), "strategy"),
    (dict(outlier_percent=-1.0), "outlier_percent"), (dict(outlier_percent=101), "outlier_percent"),
])
def test_select_regions_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        select_regions(torch.rand(5, 6), **kwargs)


def test_bad_maps_and_refine_arguments_raise():
    with pytest.raises(ValueError, match="saliency"):
        select_regions(torch.rand(5))
    with pytest.raises(ValueError, match="saliency"):
        select_regions(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="mask"):
        label_components(torch.ones(3, 3))
    with pytest.raises(ValueError, match="tol"):
        is_flat(torch.rand(3, 3), tol=-1)
    image, _ = make_image()
    regions = select_regions(torch.rand(30, 40))
    with pytest.raises(ValueError, match="mode"):
        refine_image(image, regions, mode="soft")
    with pytest.raises(ValueError, match="bbox_margin"):
        refine_image(image, regions, bbox_margin=-1)
    with pytest.raises(ValueError, match="regions"):
        refine_image(image, select_regions(torch.rand(40, 30)))
    with pytest.raises(ValueError, match="regions"):
        refine_image(image, regions.mask)
