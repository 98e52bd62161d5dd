"""Where an image's LLM tokens lie in its pixels: token maps -> (H, W) saliency for CARVE (spec ``carve.md`` §5.2).

One ``View`` per raster of an image's tokens (``adapter.image_grids``): which of the image's tokens it holds (its
patch tokens, newlines left out), its rows x cols and the pixel box of the original image it covers. A map over the
image's tokens is reshaped row-major onto each view, upsampled bilinearly (``align_corners=False``, as PIL's
``BILINEAR`` the official code uses) into the view's box and summed; pixels no view covers (``covered_pixels``) get
the map's minimum, and ``select_regions`` never keeps them (its threshold is taken over the covered pixels only).

- Qwen2-VL / Qwen2.5-VL: one raster of ``h/merge x w/merge`` merged tokens over the whole image (the processor's
  ``smart_resize`` keeps the aspect ratio), read from ``image_grid_thw``: never a square guess (the official code's
  table of square sizes mis-shapes e.g. an 8x32 grid).
- LLaVA-1.5: the CLIP processor resizes the short side and centre-crops a square, so the raster covers the central
  ``min(H, W)`` square (``geometry="processor"``); the official code stretches it over the whole image
  (``geometry="official"``).
- LLaVA-NeXT / OneVision "anyres": the high-resolution raster (the crops stitched, unpadded, without newlines) over
  the whole image; an image left unsplit has only its base raster, also over the whole image.
- Idefics3 / SmolVLM: one raster per crop, over its cell of the uniform R x C split (the processor stretches the
  image to whole tiles before cutting it); an unsplit image has only its global image, over the whole image.
- Qwen3-VL: as Qwen2-VL (its processor uses Qwen2-VL's image processor and ``smart_resize``; ``image_grid_thw``).
- Gemma3: one square raster of ``mm_tokens_per_image`` over the whole image: ``Gemma3ImageProcessor`` resizes
  (stretches) every image to the square ``size``; pan-and-scan (crops written as extra images) is not handled.
- Mistral3 (Pixtral processor): one raster over the whole image: ``PixtralImageProcessor.resize`` shrinks the image
  keeping its aspect and rounds each side up to a multiple of ``patch_size * spatial_merge_size`` (a slight
  stretch), and ``image_sizes`` holds the result, whose ``[IMG_BREAK]``-ended rows the adapter's raster leaves out.
- InternVL-hf (``GotOcr2ImageProcessor.crop_to_patches``): one raster per crop, over its cell of the uniform R x C
  split (the image is stretched to C x R tiles and cut row-major), the thumbnail left out; an unsplit image is one
  raster over the whole image. R and C are not in the inputs: ``crop_split`` re-derives them from the image size and
  the image processor's ``size``, ``min_patches`` and ``max_patches`` with the processor's own
  ``get_optimal_tiled_canvas``, checked against the number of crops the tokens hold.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

GEOMETRIES = ("processor", "official")


@dataclass(frozen=True)
class View:
    index: torch.Tensor
    """(rows * cols,) indices into the image's token map, row-major."""
    rows: int
    cols: int
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in the original image's pixels, x1 / y1 exclusive."""


def crop_split(adapter, image_processor, size: tuple[int, int]) -> tuple[int, int] | None:
    """InternVL-hf: (R, C) of the crops ``crop_to_patches`` cuts an image of ``size`` = (W, H) into, as the image
    processor decides it (``get_optimal_tiled_canvas`` over its ``size``, ``min_patches``, ``max_patches``); None for
    the other families. Whether the image was split at all is read from its tokens (``image_views``)."""
    if adapter.family != "internvl":
        return None
    module = importlib.import_module(type(image_processor).__module__)
    canvas = getattr(module, "get_optimal_tiled_canvas", None)
    tile = getattr(image_processor, "size", None)
    tile = {k: tile.get(k) if isinstance(tile, dict) else getattr(tile, k, None) for k in ("height", "width")}
    if canvas is None or not tile["height"] or not tile["width"]:
        raise NotImplementedError(f"carve: InternVL crops need the GotOcr2 image processor's tiling rules; "
                                  f"{type(image_processor).__name__} has none")
    width, height = size
    cols, rows = canvas((height, width), (tile["height"], tile["width"]), image_processor.min_patches,
                        image_processor.max_patches)
    return rows, cols


def centre_crop_box(size: tuple[int, int], resize: dict | None, crop: dict | None) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) of an image of ``size`` = (W, H) that a CLIP image processor's resize then
    centre crop keep (transformers' ``get_resize_output_image_size`` and ``center_crop``): ``resize`` is its
    ``size`` (``{"shortest_edge": S}`` keeps the aspect ratio, ``{"height", "width"}`` stretches), ``crop`` its
    ``crop_size``; a crop larger than the resized image keeps all of it."""
    width, height = size
    if resize and resize.get("shortest_edge"):
        short = resize["shortest_edge"]
        scaled = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    elif resize and resize.get("height") and resize.get("width"):
        scaled = (resize["width"], resize["height"])
    else:
        scaled = (width, height)
    crop_w, crop_h = (crop["width"], crop["height"]) if crop else scaled
    left, top = (scaled[0] - crop_w) // 2, (scaled[1] - crop_h) // 2
    fx, fy = width / scaled[0], height / scaled[1]
    return (max(0, round(left * fx)), max(0, round(top * fy)), min(width, round((left + crop_w) * fx)),
            min(height, round((top + crop_h) * fy)))


def image_views(adapter, grid, size: tuple[int, int], geometry: str = "processor",
                crop_box: tuple[int, int, int, int] | None = None,
                split: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[View]]:
    """The token positions of one image (``ImageGrid``) whose map CARVE reads, and its views, for an original image
    of ``size`` = (W, H). ``crop_box``: the pixels a LLaVA-1.5 processor's centre crop keeps (``centre_crop_box``;
    None: the ``min(W, H)`` square of a processor whose resize and crop sizes agree). ``split``: InternVL-hf's
    (R, C) (``crop_split``)."""
    width, height = size
    tiles = list(grid.tiles)
    if adapter.family in ("llava_next", "llava_onevision", "idefics3", "internvl"):
        tiles = [t for t in tiles if t.kind == "crop"] or [t for t in tiles if t.kind == "base"][:1]
    if adapter.family == "internvl" and tiles[0].kind == "crop":
        if split is None or split[0] * split[1] != len(tiles):
            raise ValueError(f"carve: an InternVL image of {len(tiles)} crops, but its image processor splits an "
                             f"image of {width}x{height} into {split} crops")
        rows, cols = split
        tiles = [replace(t, cell=(k // cols, k % cols, rows, cols)) for k, t in enumerate(tiles)]
    positions = torch.cat([tile.positions for tile in tiles])
    views, start = [], 0
    for tile in tiles:
        box = (0, 0, width, height)
        if tile.cell is not None:
            r, c, rows, cols = tile.cell
            box = (c * width // cols, r * height // rows, (c + 1) * width // cols, (r + 1) * height // rows)
        elif adapter.family == "llava" and geometry == "processor":
            side = min(width, height)
            x0, y0 = (width - side) // 2, (height - side) // 2
            box = crop_box or (x0, y0, x0 + side, y0 + side)
        count = tile.rows * tile.cols
        views.append(View(torch.arange(start, start + count), tile.rows, tile.cols, box))
        start += count
    return positions, views


def processor_views(adapter, processor, grid, size: tuple[int, int],
                    geometry: str = "processor") -> tuple[torch.Tensor, list[View]]:
    """``image_views`` with what ``processor`` decides: LLaVA-1.5's centre crop, InternVL-hf's R x C split."""
    image_processor = getattr(processor, "image_processor", None)
    crop_box = (0, 0, *size)  # no crop: the whole image
    if getattr(image_processor, "do_center_crop", False):
        resize = getattr(image_processor, "size", None) if getattr(image_processor, "do_resize", True) else None
        crop_box = centre_crop_box(size, resize, getattr(image_processor, "crop_size", None))
    split = crop_split(adapter, image_processor, size)
    return image_views(adapter, grid, size, geometry, crop_box, split)


def covered_pixels(views: list[View], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: the pixels of an image of ``size`` = (W, H) that ``views`` cover (all of them but outside
    LLaVA-1.5's centre crop)."""
    width, height = size
    covered = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in (view.box for view in views):
        covered[y0:y1, x0:x1] = True
    return covered


def to_pixels(token_map: torch.Tensor, views: list[View], size: tuple[int, int],
              covered: torch.Tensor | None = None) -> torch.Tensor:
    """(H, W) fp32: ``token_map`` (N,) spread over the image through ``views``; the pixels they do not cover
    (``covered``, the views' ``covered_pixels`` where the caller has them) get the minimum of those they do."""
    width, height = size
    canvas = torch.zeros(height, width, dtype=torch.float32, device=token_map.device)
    for view in views:
        x0, y0, x1, y1 = view.box
        if x1 <= x0 or y1 <= y0:  # a crop cell of an image smaller than its grid (1x1 split in 2x2) covers no pixel
            continue
        raster = token_map.float()[view.index.to(token_map.device)].reshape(1, 1, view.rows, view.cols)
        canvas[y0:y1, x0:x1] += F.interpolate(raster, size=(y1 - y0, x1 - x0), mode="bilinear",
                                              align_corners=False)[0, 0]
    covered = (covered_pixels(views, size) if covered is None else covered).to(token_map.device)
    if not bool(covered.all()):
        canvas[~covered] = canvas[covered].min()
    return canvas
