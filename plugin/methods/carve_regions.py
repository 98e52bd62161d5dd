"""CARVE's refinement stage: saliency -> regions -> refined image (Ge et al., arXiv 2509.06461; spec ``carve.md``).

Pure functions, no model. The official code ``YuyaoGe/CARVE`` (``carve/masking.py``: ``create_attention_mask``,
``apply_mask_to_image``, ``get_crop_bbox_from_mask``, ``resize_crop_to_match_original``) does, on the fused (H, W)
saliency S of the original image:
1. threshold ``tau = numpy.percentile(S, 100 (1 - p))`` (linear interpolation), ``M0 = S >= tau``; over the pixels
   the map covers, where it covers only part of the image (``valid``: LLaVA-1.5's centre crop, spec §5.2);
2. 4-connected components of ``M0`` (``scipy.ndimage.label``), ranked by a strategy: ``attention_sum`` (sum of S over
   the component, v3/v4), ``size`` (pixel count, v2), or ``remove_small`` (v1: no ranking, components smaller than
   ``outlier_percent`` % of the area of ``M0`` are dropped);
3. keep the best ``max(K, floor(p n))`` of the n components (K is a *minimum* in the code; the paper calls it the
   maximum number of regions: ``keep_rule="paper"`` keeps ``min(K, n)``);
4. Phi: black outside the kept regions (every channel, a hard mask), crop to their bounding box, and enlarge with
   LANCZOS by ``max(W / cw, H / ch)`` so the crop covers the original size.
Where we differ from the official code: with no component (an empty mask) the image is returned as it is, not
black (spec §3 bug 9, §6 row 13); the enlarged size is rounded (``int`` there) so that one side equals the
original exactly; ``bbox_margin`` and the ``crop_resize`` / ``mask`` modes are extensions (spec §5.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import is_int

STRATEGIES = ("attention_sum", "size", "remove_small")
KEEP_RULES = ("official", "paper")
REFINE_MODES = ("mask_crop_resize", "crop_resize", "mask")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"carve_regions: {name} must be one of {allowed}; got {value!r}")


def is_flat(saliency: torch.Tensor, tol: float = 1e-3) -> bool:
    """``(max - min) <= tol * |mean|`` (spec §5.3 flat-map guard): no region stands out, CARVE leaves the image as
    it is. Also True for an empty, non-finite or constant map."""
    if not (_number(tol) and tol >= 0):
        raise ValueError(f"carve_regions: tol must be a finite number >= 0; got {tol!r}")
    if saliency.numel() == 0:
        return True
    values = saliency.detach().double()
    if not bool(torch.isfinite(values).all()):
        return True
    spread = float(values.max() - values.min())
    return spread <= tol * abs(float(values.mean()))


# ---- 4-connected components ---------------------------------------------------------------------------------------
def _component_roots(count: int, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Connected components of the graph on ``count`` vertices with edges ``(first[i], second[i])``: each vertex's
    root, the least vertex of its component. FastSV (Zhang, Azad, Hu, SIAM PP 2020): every vertex points to a no
    larger vertex of its component; each round hooks the tree of one end of every edge under the other end's
    grandparent, and halves paths, until the pointers stop changing (then every tree is a star and the two ends of
    every edge share a root)."""
    parent = torch.arange(count, device=first.device)
    source, target = torch.cat([first, second]), torch.cat([second, first])
    while source.numel():
        grandparent = parent[parent]
        hooked = parent.clone()
        hooked.scatter_reduce_(0, parent[source], grandparent[target], reduce="amin")
        hooked.scatter_reduce_(0, source, grandparent[target], reduce="amin")
        hooked = torch.minimum(hooked, grandparent)
        if torch.equal(hooked, parent):
            break
        parent = hooked
    return parent


def _shift_right(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` moved one column right, False in the first column: each pixel's left neighbour."""
    return torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)


def _label_torch(mask: torch.Tensor) -> torch.Tensor:
    """Each pixel of the mask labelled with the number of its component's first run, which grows with the raster
    index of the component's first pixel (-1 off the mask). The vertices are the horizontal runs of each row,
    numbered in raster order; two runs of adjacent rows that share a column are joined (one edge where their overlap
    begins), and ``_component_roots`` joins them. Rounds ~ log of the runs, not the components' diameters."""
    h, w = mask.shape
    starts = mask & ~_shift_right(mask)
    run = (torch.cumsum(starts.flatten(), 0) - 1).view(h, w)
    below = mask[:-1] & mask[1:]
    rows, cols = (below & ~_shift_right(below)).nonzero(as_tuple=True)
    roots = _component_roots(int(starts.sum()), run[rows, cols], run[rows + 1, cols])
    labels = torch.full((h, w), -1, dtype=torch.long, device=mask.device)
    labels[mask] = roots[run[mask]]
    return labels


def _label_scipy(mask: torch.Tensor) -> torch.Tensor | None:
    """``scipy.ndimage.label`` (default structure: 4-connectivity), each component labelled with the raster index
    of its first pixel (ordered as ``_label_torch``'s); None when scipy is not installed."""
    try:
        from scipy import ndimage
    except ImportError:
        return None
    labelled, count = ndimage.label(mask.cpu().numpy())
    labelled = torch.from_numpy(labelled).to(torch.long).flatten()
    pixels = labelled.numel()
    first = torch.full((count + 1,), pixels, dtype=torch.long)
    first.scatter_reduce_(0, labelled, torch.arange(pixels), reduce="amin")
    return first[labelled].view(mask.shape).to(mask.device)


def label_components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """4-connected components of a (H, W) bool mask: (H, W) long labels 1..n (0 = background) and n, numbered in
    raster order of their first pixel. ``scipy.ndimage.label`` (the official code's) when scipy is importable, else
    a run-based min-label propagation with pointer jumping in torch (``_label_torch``, any device); both give the
    same labels."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"carve_regions: mask must be a (H, W) bool tensor; got {mask.dtype} {tuple(mask.shape)}")
    labels = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    if not bool(mask.any()):
        return labels, 0
    first = _label_scipy(mask)
    if first is None:
        first = _label_torch(mask)
    roots, inverse = torch.unique(first[mask], sorted=True, return_inverse=True)
    labels[mask] = inverse + 1
    return labels, int(roots.numel())


# ---- Regions ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Regions:
    mask: torch.Tensor
    """(H, W) bool, the union of the kept components."""
    threshold: float
    """tau, the (1 - top_p) percentile of the saliency (over its ``valid`` pixels)."""
    num_components: int
    """n, components of the thresholded map ``S >= tau``."""
    kept: int
    """components kept."""
    bbox: tuple[int, int, int, int] | None
    """(x0, y0, x1, y1) of the mask, x1 / y1 exclusive; None when the mask is empty."""


def percentile_threshold(saliency: torch.Tensor, top_p: float) -> torch.Tensor:
    """``numpy.percentile(S, 100 (1 - top_p))`` with its default linear interpolation, as a 0-d tensor of S's dtype
    (numpy's virtual index ``(n - 1) q`` and its two-sided lerp, so float32 maps give numpy's value to the bit);
    ``kthvalue`` in place of ``torch.quantile``, which refuses large inputs."""
    values = saliency.flatten()
    count = values.numel()
    q = (1.0 - top_p) * 100 / 100
    position = (count - 1) * q
    below = min(math.floor(position), count - 1)
    above = min(below + 1, count - 1)
    gamma = position - below
    low = values.kthvalue(below + 1).values
    if above == below or gamma == 0:
        return low
    high = values.kthvalue(above + 1).values
    step = high - low
    return high - step * (1 - gamma) if gamma >= 0.5 else low + step * gamma


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the True pixels, x1 / y1 exclusive (official ``get_crop_bbox_from_mask``); None if none."""
    rows = mask.any(dim=1).nonzero().flatten()
    if rows.numel() == 0:
        return None
    cols = mask.any(dim=0).nonzero().flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def keep_count(num_components: int, top_p: float, min_regions: int, keep_rule: str) -> int:
    """Components kept: ``max(K, floor(p n))`` (official, K a minimum) or ``min(K, n)`` (paper), at most n."""
    wanted = max(min_regions, int(num_components * top_p)) if keep_rule == "official" else min_regions
    return min(wanted, num_components)


def _check_selection(saliency, top_p, min_regions, keep_rule, strategy, outlier_percent, valid) -> None:
    if not isinstance(saliency, torch.Tensor) or saliency.dim() != 2 or saliency.numel() == 0:
        raise ValueError("carve_regions: saliency must be a non-empty (H, W) tensor; got "
                         f"{type(saliency).__name__} {tuple(getattr(saliency, 'shape', ()))}")
    if not saliency.is_floating_point() or not bool(torch.isfinite(saliency).all()):
        raise ValueError("carve_regions: saliency must be a finite floating-point map (test is_flat first)")
    if not (_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"carve_regions: top_p must be a number in (0, 1]; got {top_p!r}")
    if not (is_int(min_regions) and min_regions >= 1):
        raise ValueError(f"carve_regions: min_regions must be an integer >= 1; got {min_regions!r}")
    _choice("keep_rule", keep_rule, KEEP_RULES)
    _choice("strategy", strategy, STRATEGIES)
    if not (_number(outlier_percent) and 0 <= outlier_percent <= 100):
        raise ValueError(f"carve_regions: outlier_percent must be a number in [0, 100]; got {outlier_percent!r}")
    if valid is not None and not (isinstance(valid, torch.Tensor) and valid.dtype == torch.bool
                                  and valid.shape == saliency.shape and bool(valid.any())):
        raise ValueError(f"carve_regions: valid must be None or a (H, W) = {tuple(saliency.shape)} bool tensor with a "
                         f"True pixel; got {type(valid).__name__} {tuple(getattr(valid, 'shape', ()))}")


def select_regions(saliency: torch.Tensor, top_p: float = 0.2, min_regions: int = 3, keep_rule: str = "official",
                   strategy: str = "attention_sum", outlier_percent: float = 0.1,
                   valid: torch.Tensor | None = None) -> Regions:
    """The regions of the (H, W) saliency S that CARVE keeps (official ``create_attention_mask``).

    ``tau`` = the ``(1 - top_p)`` percentile of S over all pixels (``percentile_threshold``), ``M0 = S >= tau``, its
    4-connected components ranked by ``strategy`` (``attention_sum``: sum of S over the component; ``size``: pixel
    count; ties keep the lower-numbered component, as the official stable sort) of which ``keep_count`` are kept
    (``keep_rule="official"``: ``max(min_regions, floor(top_p n))``, ``min_regions`` a minimum, as the code;
    ``"paper"``: ``min(min_regions, n)``); ``remove_small`` ranks nothing and drops the components smaller than
    ``int(outlier_percent / 100 * |M0|)`` pixels. ``top_p=1`` keeps every pixel. ``valid`` (H, W) bool: the pixels
    the map covers (``carve_geometry.covered_pixels``); ``tau`` is the percentile over them and ``M0`` holds none of
    the others, which are never kept (they hold the map's minimum: over all pixels they would tie at ``tau`` once
    ``top_p`` reaches the covered fraction). None: every pixel, as the official code."""
    _check_selection(saliency, top_p, min_regions, keep_rule, strategy, outlier_percent, valid)
    values = saliency.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid.to(values.device)
    threshold = percentile_threshold(values[valid], top_p)
    thresholded = (values >= threshold) & valid
    labels, count = label_components(thresholded)
    flat_labels = labels.flatten()
    sizes = torch.bincount(flat_labels, minlength=count + 1)[1:]
    if strategy == "remove_small":
        smallest = int(int(thresholded.sum()) * outlier_percent / 100)
        chosen = (sizes >= smallest).nonzero().flatten() + 1
    else:
        if strategy == "size":
            scores = sizes.double()
        else:
            scores = torch.zeros(count + 1, dtype=torch.float64, device=values.device)
            scores.index_add_(0, flat_labels, values.flatten().double())
            scores = scores[1:]
        order = torch.sort(scores, descending=True, stable=True).indices
        chosen = order[:keep_count(count, top_p, min_regions, keep_rule)] + 1
    keep = torch.zeros(count + 1, dtype=torch.bool, device=values.device)
    keep[chosen] = True
    mask = keep[labels]
    return Regions(mask=mask, threshold=float(threshold), num_components=count, kept=int(chosen.numel()),
                   bbox=bounding_box(mask))


# ---- Phi: masking -> cropping -> magnifying -----------------------------------------------------------------------
def cover_size(crop: tuple[int, int], original: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of ``crop`` scaled by ``max(W / cw, H / ch)`` (official ``resize_crop_to_match_original``): the side
    that sets the scale equals the original exactly, the other is rounded and at least the original."""
    (cw, ch), (width, height) = crop, original
    if width * ch >= height * cw:
        return width, max(height, round(ch * width / cw))
    return max(width, round(cw * height / ch)), height


def refine_image(image, regions: Regions, mode: str = "mask_crop_resize", bbox_margin: int = 0):
    """Phi on a PIL image (official ``apply_mask_to_image`` -> ``get_crop_bbox_from_mask`` -> crop ->
    ``resize_crop_to_match_original``): black outside ``regions.mask`` (every channel 0, a hard mask), crop to its
    bbox widened by ``bbox_margin`` pixels (clamped to the image), and enlarge with LANCZOS to ``cover_size``.
    ``mode="crop_resize"``: no blackout (ViCrop-like); ``"mask"``: blackout only, no crop. An empty mask returns a
    copy of the image: the official code returns a black image there (spec §3 bug 9)."""
    from PIL import Image

    _choice("mode", mode, REFINE_MODES)
    if not (is_int(bbox_margin) and bbox_margin >= 0):
        raise ValueError(f"carve_regions: bbox_margin must be an integer >= 0; got {bbox_margin!r}")
    if not isinstance(image, Image.Image):
        raise ValueError(f"carve_regions: image must be a PIL image; got {type(image).__name__}")
    if not isinstance(regions, Regions):
        raise ValueError(f"carve_regions: regions must be a Regions (select_regions); got {type(regions).__name__}")
    width, height = image.size
    if tuple(regions.mask.shape) != (height, width):
        raise ValueError(f"carve_regions: regions has a mask of shape {tuple(regions.mask.shape)}; the image needs "
                         f"(H, W) = {(height, width)}")
    if regions.bbox is None:
        return image.copy()
    refined = image
    if mode != "crop_resize":
        stencil = Image.fromarray(regions.mask.detach().cpu().to(torch.uint8).mul(255).numpy())
        refined = Image.composite(image, Image.new(image.mode, image.size), stencil)
    if mode == "mask":
        return refined if refined is not image else image.copy()
    x0, y0, x1, y1 = regions.bbox
    box = (max(0, x0 - bbox_margin), max(0, y0 - bbox_margin), min(width, x1 + bbox_margin),
           min(height, y1 + bbox_margin))
    crop = refined.crop(box)
    size = cover_size(crop.size, image.size)
    if size == crop.size:
        return crop
    return crop.resize(size, Image.LANCZOS)
