"""The adapter contract: what nograd needs to know about one loaded model, in one place per architecture.

Methods never look at a model's class, attribute names or config keys: they ask its adapter. An adapter answers
for a *loaded* model (weights, config and current attention implementation as they are now) and changes nothing.

Three kinds share the contract:
- ``"text"``: decoder-only LLMs (Llama, Mistral, Qwen2/3, Gemma/Gemma2, text-only Gemma3).
- ``"vlm"``: a vision tower, a projector and one of those decoders; adds image-token positions and grid layout.
- ``"dit"``: diffusers MM-DiT transformers (SD3, FLUX); adds the joint-attention token order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class TileGrid:
    """One raster of image tokens: ``rows x cols`` patches, row-major, with optional newline tokens.

    ``positions`` holds the sequence positions of the ``rows * cols`` patch tokens in raster order;
    ``newline_positions`` the positions of the row-end tokens some models insert (LLaVA-NeXT, -OneVision),
    ``None`` where the model has none. ``kind`` says what the tile shows: ``"base"`` (the whole image, resized),
    ``"crop"`` (one crop of a high-resolution split) or ``"frame"`` (a video frame / temporal slice). ``cell`` is a
    crop's place in a uniform split of the image, ``(row, col, rows, cols)``, where the model keeps crops apart
    (Idefics3 / SmolVLM); ``None`` elsewhere.
    """

    rows: int
    cols: int
    positions: torch.Tensor
    newline_positions: torch.Tensor | None = None
    kind: str = "base"
    cell: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ImageGrid:
    """The tokens of one image in one batch row: every position it occupies and its tiles."""

    batch_row: int
    image_index: int
    positions: torch.Tensor
    tiles: tuple[TileGrid, ...]


class Adapter:
    """Base adapter. Subclasses set ``family``, ``kind`` and ``model_classes`` and override what differs.

    ``model_classes`` are ``"module:Class"`` strings, imported lazily, so a family whose transformers/diffusers
    module is missing in the installed version is simply not matched.
    """

    family: ClassVar[str] = ""
    kind: ClassVar[str] = "text"
    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # ---- recognition ------------------------------------------------------------------------------------------
    @classmethod
    def classes(cls) -> tuple[type, ...]:
        found = []
        for spec in cls.model_classes:
            module_name, _, class_name = spec.partition(":")
            try:
                found.append(getattr(importlib.import_module(module_name), class_name))
            except (ImportError, AttributeError):
                continue
        return tuple(found)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        classes = cls.classes()
        return bool(classes) and isinstance(model, classes)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family!r} model={type(self.model).__name__}>"

    # ---- the decoder stack (text and vlm) -------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        """The module that owns the decoder layers (``...Model`` with ``.layers``)."""
        raise NotImplementedError

    @property
    def text_config(self):
        return self.text_model.config

    @property
    def padding_mask_module(self) -> nn.Module:
        """The module whose forward receives the batch's 2-D ``attention_mask`` (1 = real token)."""
        return self.text_model

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.text_model.layers)

    @property
    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of every decoder layer, in layer order (index == ``module.layer_idx``)."""
        return [layer.self_attn for layer in self.decoder_layers]

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    # ---- attention implementation ------------------------------------------------------------------------------
    attn_config_key: ClassVar[str | None] = None
    """The sub-config key whose attention implementation nograd switches (``None``: the top-level config)."""

    @property
    def attn_implementation(self) -> str:
        """The attention implementation the decoder stack uses now (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...)."""
        return self.text_config._attn_implementation

    def attn_implementation_request(self, name: str) -> str | dict:
        """The argument of ``model.set_attn_implementation`` that switches only the decoder stack to ``name``."""
        return name if self.attn_config_key is None else {self.attn_config_key: name}

    # ---- images (vlm) ----------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int | None:
        return None

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean (B, S): which sequence positions hold image tokens (all False for a text model)."""
        token = self.image_token_id
        if token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token

    @property
    def video_token_id(self) -> int | None:
        """The placeholder token of video frames, where the model has one apart from its image token (Qwen2-VL,
        Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision; the other families write frames as images)."""
        return None

    marker_id_attrs: ClassVar[tuple[str, ...]] = ()
    """Config attributes naming the tokens that frame each image (or video) and exist only with it."""

    @property
    def visual_marker_ids(self) -> tuple[int, ...]:
        """The ids of those framing tokens (Qwen-VL's ``<|vision_start|>`` / ``<|vision_end|>``, Gemma3's
        ``<start_of_image>`` / ``<end_of_image>``); () where the config names none."""
        ids = (getattr(self.model.config, name, None) for name in self.marker_id_attrs)
        return tuple(int(i) for i in ids if i is not None)

    def visual_token_mask(self, input_ids: torch.Tensor, video: bool = True) -> torch.Tensor:
        """Boolean (B, S): the image tokens, and with ``video`` the video tokens too (the visual tokens)."""
        mask = self.image_token_mask(input_ids)
        token = self.video_token_id if video else None
        return mask if token is None else mask | (input_ids == token)

    def image_token_positions(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """For each batch row, the sorted positions of its image tokens (empty for a text-only row)."""
        mask = self.image_token_mask(input_ids)
        return [row.nonzero().flatten() for row in mask]

    def image_grids(self, input_ids: torch.Tensor, **inputs) -> list[ImageGrid]:
        """The layout of every image in the batch, from ``input_ids`` and the processor outputs in ``inputs``."""
        raise NotImplementedError(f"{type(self).__name__} has no image grid")

    # ---- joint attention (dit) ---------------------------------------------------------------------------------
    joint_layout: ClassVar[str | None] = None
    """For MM-DiTs: ``"image_first"`` or ``"text_first"``, the order of the joint-attention sequence."""
