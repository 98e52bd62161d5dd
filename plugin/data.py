"""Local evaluation data: ``nograd.data.refcoco(path)`` reads a RefCOCO-style referring-expression folder.

Nothing is downloaded and nothing needs pycocotools. The folder holds one JSON file (``refs.json`` by default) and
the images::

    path/
      refs.json            # a list of references (or {"refs": [...]})
      images/<file_name>   # or path/<file_name>

One reference is an object::

    {"ref_id": 0,                               # optional (defaults to its position)
     "file_name": "COCO_train2014_000000000009.jpg",
     "sentences": ["the man in the red jacket", {"sent": "man on the left"}],   # strings or {"sent": ...}
     "segmentation": [[x1, y1, x2, y2, ...], ...],  # COCO polygons in pixels (any number of parts), or
     "mask": "masks/0.png",                     #   a mask image (non-zero = object), relative to the folder, or
     "bbox": [x, y, w, h],                      #   only a box (then the mask is the box)
     "split": "val"}                            # optional

This is what the official ``refer`` toolkit's ``refs(unc).p`` plus ``instances.json`` hold, flattened to one record
per reference (its ``sentences[i]["sent"]`` and the annotation's ``segmentation``/``bbox``). Every sentence of a
reference is one sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["RefSample", "RefDataset", "refcoco", "polygons_to_mask"]


def polygons_to_mask(polygons, height: int, width: int) -> torch.Tensor:
    """(height, width) bool: the union of COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` in continuous pixel
    coordinates (pixel (r, c) covers [c, c+1) x [r, r+1)); a pixel is inside when its centre is (even-odd rule), so
    the box ``[0, 0, w, 0, w, h, 0, h]`` is exactly ``w x h`` pixels."""
    ys = torch.arange(height, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float64)[None, :] + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool)
    for polygon in polygons:
        points = torch.tensor([float(v) for v in polygon[: len(polygon) // 2 * 2]], dtype=torch.float64).view(-1, 2)
        if len(points) < 3:
            continue
        inside = torch.zeros(height, width, dtype=torch.bool)
        for (x0, y0), (x1, y1) in zip(points.tolist(), points.roll(-1, 0).tolist()):
            if y0 == y1:
                continue
            crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
            at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (xs < at)
        mask |= inside
    return mask


@dataclass
class RefSample:
    """One (image, expression, mask) sample; the image and mask load on first use."""

    ref_id: object
    expression: str
    image_path: str
    split: str | None = None
    bbox: tuple | None = None
    segmentation: list | None = None
    mask_path: str | None = None

    @property
    def image(self):
        from PIL import Image

        with Image.open(self.image_path) as image:
            return image.convert("RGB")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        from PIL import Image

        with Image.open(self.image_path) as image:
            return image.size

    @property
    def mask(self) -> torch.Tensor:
        """(H, W) bool ground-truth mask."""
        width, height = self.size
        if self.mask_path is not None:
            from PIL import Image

            with Image.open(self.mask_path) as image:
                grey = image.convert("L")
                if grey.size != (width, height):
                    raise ValueError(f"mask {self.mask_path} is {grey.size}, the image is {(width, height)}")
                return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(height, width) > 0
        if self.segmentation:
            return polygons_to_mask(self.segmentation, height, width)
        if self.bbox is None:
            raise ValueError(f"reference {self.ref_id!r} has no segmentation, mask or bbox")
        x, y, w, h = self.bbox
        return polygons_to_mask([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)


class RefDataset(Sequence):
    """A list of ``RefSample`` (one per sentence)."""

    def __init__(self, samples: list[RefSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return RefDataset(self.samples[index])
        return self.samples[index]

    def __repr__(self) -> str:
        return f"<RefDataset: {len(self)} samples>"


def refcoco(path, split: str | None = None, annotations: str = "refs.json", limit: int | None = None) -> RefDataset:
    """The samples of the RefCOCO-style folder ``path`` (format in the module docstring), optionally one ``split``
    and at most ``limit`` samples. Raises ``FileNotFoundError`` naming what is missing, ``ValueError`` on a record
    without an expression or a location."""
    path = os.fspath(path)
    file = os.path.join(path, annotations)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"refcoco: no {annotations} in {path} (see nograd.data's docstring for the format)")
    with open(file) as f:
        refs = json.load(f)
    if isinstance(refs, dict):
        refs = refs.get("refs", [])
    samples = []
    for position, ref in enumerate(refs):
        if split is not None and ref.get("split") != split:
            continue
        name = ref.get("file_name")
        if not name:
            raise ValueError(f"refcoco: reference {position} has no file_name")
        image_path = next((p for p in (os.path.join(path, "images", name), os.path.join(path, name))
                           if os.path.isfile(p)), None)
        if image_path is None:
            raise FileNotFoundError(f"refcoco: image {name!r} of reference {position} is neither in "
                                    f"{os.path.join(path, 'images')} nor in {path}")
        if not (ref.get("segmentation") or ref.get("mask") or ref.get("bbox")):
            raise ValueError(f"refcoco: reference {position} has no segmentation, mask or bbox")
        sentences = [s["sent"] if isinstance(s, dict) else s for s in ref.get("sentences", [])]
        if not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
            raise ValueError(f"refcoco: reference {position} has no sentences")
        segmentation = ref.get("segmentation")
        if isinstance(segmentation, dict):
            raise ValueError(f"refcoco: reference {position} has an RLE segmentation; give polygons or a mask file")
        for sentence in sentences:
            samples.append(RefSample(ref.get("ref_id", position), sentence, image_path, ref.get("split"),
                                     tuple(ref["bbox"]) if ref.get("bbox") else None, segmentation,
                                     os.path.join(path, ref["mask"]) if ref.get("mask") else None))
            if limit is not None and len(samples) >= limit:
                return RefDataset(samples)
    return RefDataset(samples)
