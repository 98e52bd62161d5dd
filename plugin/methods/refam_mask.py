"""RefAM's image side: token-grid heatmap -> pixel heatmap -> argmax point -> mask (spec ``refam.md`` §1.9-1.10,
§5.7), and the overlay. Torch and numpy; no scipy, no weights.

Geometry: token (r, c) of a ``rows x cols`` grid covers the pixel cell ``[r H/rows, (r+1) H/rows) x [c W/cols, ...)``
of the image (FLUX packs latents row-major, SD3 patchifies row-major), so bilinear upsampling with
``align_corners=False`` puts each token's value at its cell centre, for any aspect ratio.

Training-free mask (ours, after spec §5.7): threshold the pixel heatmap (Otsu's threshold by default, or the mean as
in ConceptAttention, or a fraction of the maximum), keep the 8-connected component that holds the argmax point,
fill its holes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

THRESHOLDS = ("otsu", "mean")


def smooth(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (rows, cols) map blurred by a Gaussian of ``sigma`` tokens (replicate padding); ``sigma=0``: unchanged."""
    if sigma <= 0:
        return grid
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=grid.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = grid.float()[None, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out[0, 0]


def to_pixels(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (rows, cols) token map upsampled bilinearly to (height, width) pixels (cell centres aligned)."""
    return F.interpolate(grid.float()[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def spatial_ramp(cues: list[str], height: int, width: int, beta: float = 1.0, device=None) -> torch.Tensor:
    """(height, width) product of the coordinate ramps of ``cues`` (spec §1.9 [D]): left ``(1-x)^beta``, right
    ``x^beta``, top ``(1-y)^beta``, bottom ``y^beta``, middle ``1-|2x-1|``; x, y in [0, 1] at pixel centres."""
    x = ((torch.arange(width, device=device) + 0.5) / width)[None, :].expand(height, width)
    y = ((torch.arange(height, device=device) + 0.5) / height)[:, None].expand(height, width)
    ramp = torch.ones(height, width, device=device)
    for cue in cues:
        ramp = ramp * {"left": (1 - x) ** beta, "right": x ** beta, "top": (1 - y) ** beta,
                       "bottom": y ** beta, "middle": 1 - (2 * x - 1).abs()}[cue]
    return ramp


def normalise(heatmap: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] (a flat map becomes all zeros)."""
    low, high = heatmap.min(), heatmap.max()
    return (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)


def argmax_point(heatmap: torch.Tensor) -> tuple[int, int]:
    """(x, y) pixel of the maximum (the first in row-major order on ties)."""
    index = int(heatmap.flatten().argmax())
    return index % heatmap.shape[1], index // heatmap.shape[1]


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (maximises the between-class variance of a ``bins``-bin histogram)."""
    values = values.flatten().float()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    hist = torch.histc(values, bins=bins, min=low, max=high).double()
    centres = low + (torch.arange(bins, dtype=torch.float64) + 0.5) * (high - low) / bins
    weight0 = hist.cumsum(0)
    weight1 = hist.sum() - weight0
    mass0 = (hist * centres).cumsum(0)
    mean0 = mass0 / weight0.clamp_min(1e-12)
    mean1 = (mass0[-1] - mass0) / weight1.clamp_min(1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    best = int(between[:-1].argmax())
    return float(low + (best + 1) * (high - low) / bins)


def components(foreground: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a (H, W) bool map: each pixel's label is the smallest flat index in its
    component, background is ``H * W``. Run-length labelling: the runs of each row, runs of adjacent rows that touch
    (diagonals included) joined by union-find, so the cost follows the number of runs, not the shape's diameter."""
    import numpy as np

    height, width = foreground.shape
    image = foreground.cpu().numpy().astype(np.int8)
    edges = np.diff(np.pad(image, ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; same row-major order as the starts
    parent = list(range(len(starts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(height + 1))  # runs of row r: first[r]:first[r + 1]
    for r in range(1, height):
        above, here = slice(first[r - 1], first[r]), slice(first[r], first[r + 1])
        if above.start == above.stop or here.start == here.stop:
            continue
        lows = np.searchsorted(ends[above], starts[here], side="left") + above.start  # end >= start (8-conn)
        highs = np.searchsorted(starts[above], ends[here], side="right") + above.start  # start <= end
        for j, lo, hi in zip(range(here.start, here.stop), lows.tolist(), highs.tolist()):
            for i in range(lo, hi):
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # runs are in row-major order: the root is the first run
    lengths = ends - starts
    run_labels = np.array([rows[root(i)] * width + starts[root(i)] for i in range(len(starts))], dtype=np.int64)
    labels = np.full(height * width, height * width, dtype=np.int64)
    if len(starts):
        offsets = np.repeat(rows * width + starts - np.cumsum(lengths) + lengths, lengths)
        labels[offsets + np.arange(int(lengths.sum()))] = np.repeat(run_labels, lengths)
    return torch.from_numpy(labels).view(height, width).to(foreground.device)


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with every background region that does not touch the border filled."""
    labels = components(~mask)
    border = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).unique()
    return mask | ~torch.isin(labels, border)


def heatmap_mask(heatmap: torch.Tensor, point: tuple[int, int], threshold: str | float = "otsu") -> torch.Tensor:
    """The training-free mask: pixels above the threshold, the component holding ``point``, holes filled."""
    if threshold == "otsu":
        level = otsu_threshold(heatmap)
    elif threshold == "mean":
        level = float(heatmap.mean())
    else:
        level = float(heatmap.min() + threshold * (heatmap.max() - heatmap.min()))
    above = heatmap >= level
    x, y = point
    above[y, x] = True
    labels = components(above)
    return fill_holes(labels == labels[y, x])


def sam_mask(sam, image, point: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """SAM's mask for one positive point: ``sam`` is ``(SamModel, SamProcessor)`` (transformers) or a callable
    ``(image, points, labels) -> masks`` ((K, H, W) or (H, W)). Among SAM's multimask outputs the one with the
    highest predicted IoU is taken (spec §1.10 [D]). Returns (mask (H, W) bool, predicted IoU or nan)."""
    if callable(sam) and not isinstance(sam, (tuple, list)):
        masks = torch.as_tensor(sam(image, [list(point)], [1]))
        masks = masks if masks.dim() == 3 else masks[None]
        return masks[0].bool(), float("nan")
    model, processor = sam
    inputs = processor(images=image, input_points=[[[list(map(float, point))]]], return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    model_inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()
                    if k in ("pixel_values", "input_points")}
    with torch.no_grad():
        out = model(**model_inputs, multimask_output=True)
    masks = processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                         inputs["reshaped_input_sizes"])[0][0]
    scores = out.iou_scores[0, 0].float().cpu()
    best = int(scores.argmax())
    return masks[best].bool(), float(scores[best])


def overlay(image, heatmap: torch.Tensor, mask: torch.Tensor | None = None, point=None, alpha: float = 0.5):
    """``image`` (PIL) with the heatmap blended in red-yellow, the mask outline in green and the point as a cross."""
    import numpy as np
    from PIL import Image, ImageDraw

    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    heat = heatmap.clamp(0, 1).cpu().numpy()[..., None]
    colour = np.concatenate([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1)
    blended = (1 - alpha * heat) * base + alpha * heat * colour
    if mask is not None:
        m = mask.cpu()
        edge = m & ~(-F.max_pool2d(-m.float()[None, None], 3, stride=1, padding=1)[0, 0]).bool()
        blended[edge.numpy()] = (0.0, 1.0, 0.0)
    out = Image.fromarray((blended.clip(0, 1) * 255).astype(np.uint8))
    if point is not None:
        draw, (x, y) = ImageDraw.Draw(out), point
        r = max(2, min(out.size) // 40)
        draw.line([(x - r, y), (x + r, y)], fill=(0, 0, 255), width=max(1, r // 3))
        draw.line([(x, y - r), (x, y + r)], fill=(0, 0, 255), width=max(1, r // 3))
    return out
