"""Per-family adapters: where the layers, attention modules, heads and image tokens of each architecture are.

``adapter_for(model)`` returns the adapter of a loaded model or raises ``nograd.UnsupportedModelError``.
Recognition is by class (``isinstance`` against each family's base class), never by name strings.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, ImageGrid, TileGrid
from .dit import DIT_ADAPTERS
from .text_lm import TEXT_ADAPTERS
from .vlm import VLM_ADAPTERS

ADAPTERS: tuple[type[Adapter], ...] = TEXT_ADAPTERS + VLM_ADAPTERS + DIT_ADAPTERS


def supported_families(kind: str | None = None) -> list[str]:
    """Family names nograd has adapters for (optionally only those of one ``kind``: text, vlm, dit)."""
    return [a.family for a in ADAPTERS if kind is None or a.kind == kind]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``; raises ``UnsupportedModelError`` naming the class and the supported families."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(model):
            return adapter_cls(model)
    raise UnsupportedModelError(
        f"nograd has no adapter for {type(model).__name__}; supported families: {', '.join(supported_families())}"
    )


__all__ = ["ADAPTERS", "Adapter", "ImageGrid", "TileGrid", "adapter_for", "supported_families"]
