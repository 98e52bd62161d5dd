"""Vision-language models: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM,
InternVL (transformers' ``InternVLForConditionalGeneration``, "InternVL-hf"), Mistral3 and Gemma3.

Each is a vision tower and a projector in front of a decoder-only LM; nograd's methods act on that decoder. What all
of them share (transformers 5.24, paths under ``transformers/models/``):

- ``<Family>ForConditionalGeneration.model`` is the bare ``<Family>Model``, which holds the decoder as
  ``.language_model`` (``.text_model`` in Idefics3 and SmolVLM); both classes derive from
  ``<Family>PreTrainedModel``, which is what an adapter matches.
- The decoder's config is the model's ``config.text_config`` (the same object as the decoder's ``.config``), so
  ``set_attn_implementation({"text_config": name})`` switches the decoder and leaves the vision tower alone.
- The processor writes every image as a run of ``config.image_token_id`` tokens (LLaVA's ``image_token_index``,
  reached through the config's ``attribute_map``), and the model writes the image features into the image-token
  positions in batch-major order: ``inputs_embeds.masked_scatter(image_mask, image_features)``
  (``get_placeholder_mask``, Idefics3's ``inputs_merger``). The n-th image of the batch therefore owns the next
  tokens in that order; what differs per family is how many tokens an image has and how they are laid out, which
  each adapter's ``image_layouts`` says.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from .base import Adapter, ImageGrid, TileGrid


@dataclass(frozen=True)
class ImageLayout:
    """The tokens of one image, counted from its first image token: tiles whose positions are offsets into them."""

    num_tokens: int
    tiles: tuple[TileGrid, ...]

    def place(self, batch_row: int, image_index: int, positions: torch.Tensor) -> ImageGrid:
        """This layout over ``positions``, the image's ``num_tokens`` sequence positions."""

        def at(offsets):
            return None if offsets is None else positions[offsets.to(positions.device)]

        tiles = tuple(replace(t, positions=at(t.positions), newline_positions=at(t.newline_positions))
                      for t in self.tiles)
        return ImageGrid(batch_row, image_index, positions, tiles)


def raster(rows: int, cols: int, start: int = 0, kind: str = "base") -> TileGrid:
    """A tile of ``rows * cols`` consecutive tokens from offset ``start``, row-major, without newlines."""
    return TileGrid(rows, cols, torch.arange(start, start + rows * cols), kind=kind)


class VLMAdapter(Adapter):
    """Shared logic: the decoder inside the model, the image token, and placing per-image layouts on the batch."""

    kind = "vlm"
    attn_config_key = "text_config"
    language_model_attr: ClassVar[str] = "language_model"
    """Attribute of the bare ``<Family>Model`` that holds the decoder."""

    @property
    def multimodal_model(self) -> nn.Module:
        """The bare ``<Family>Model``: ``.model`` of a ``...ForConditionalGeneration``, else the model itself."""
        return getattr(self.model, "model", self.model)

    @property
    def text_model(self) -> nn.Module:
        model = self.multimodal_model
        # The decoder itself (e.g. a `Qwen2VLTextModel`, also a `Qwen2VLPreTrainedModel`) owns the layers.
        return model if hasattr(model, "layers") else getattr(model, self.language_model_attr)

    @property
    def image_token_id(self) -> int | None:
        return getattr(self.model.config, "image_token_id", None)

    @property
    def video_token_id(self) -> int | None:
        return getattr(self.model.config, "video_token_id", None)

    def image_layouts(self, input_ids: torch.Tensor, **inputs) -> list[ImageLayout]:
        """The layout of every image in the batch, in the order the model consumes them."""
        raise NotImplementedError

    @property
    def tokens_per_image(self) -> int | None:
        """The visual tokens every image gives, where the config fixes them (whatever the image's size), else
        None (tiled, any-resolution and native-resolution families)."""
        return None

    # ---- the vision tower ----------------------------------------------------------------------------------------
    vision_attn_config_key: ClassVar[str] = "vision_config"

    @property
    def vision_tower(self) -> nn.Module:
        """The vision tower module (its forward takes the pixels first)."""
        return self.multimodal_model.vision_tower

    @property
    def vision_layers(self) -> list[nn.Module]:
        """The vision tower's encoder layers (CLIP / SigLIP towers: ``vision_tower[.vision_model].encoder.layers``)."""
        tower = self.vision_tower
        return list(getattr(tower, "vision_model", tower).encoder.layers)

    @property
    def vision_attention_modules(self) -> list[nn.Module]:
        """The self-attention module of every vision encoder layer, in layer order."""
        return [layer.self_attn for layer in self.vision_layers]

    @property
    def vision_has_cls(self) -> bool:
        """Whether the tower prepends a CLS token (CLIP's ``embeddings.class_embedding``; SigLIP has none)."""
        return any(name.endswith("embeddings.class_embedding") for name, _ in self.vision_tower.named_parameters())

    @property
    def vision_full_attention_layers(self) -> list[int]:
        """The encoder layers that attend over whole images (all of them, except in windowed towers)."""
        return list(range(len(self.vision_layers)))

    def vision_token_order(self, grid_thw: torch.Tensor | None) -> torch.Tensor | None:
        """Where the tower's merged-token units sit in the image-token order: ``None`` when it keeps that order,
        else ``order`` with ``tokens[order] = tower_units``."""
        return None

    def patch_scores_to_tokens(self, scores: list[torch.Tensor], image_inputs: dict) -> torch.Tensor:
        """Per-patch scores of a tower without a CLS token, one (patches,) row per tower run unit in the tower's
        order (an image, a tile), as one score per LLM image token in image-token order: the patches the projector
        folds into one token add up."""
        raise NotImplementedError(f"{self.family}: no patch -> token map for a tower without a CLS token")

    @property
    def vision_feature_layer(self) -> int:
        """Index of the encoder layer whose output the projector reads (``hidden_states[vision_feature_layer]``;
        a list of layers: the deepest)."""
        chosen = self.model.config.vision_feature_layer
        chosen = max(chosen, key=lambda i: i % (len(self.vision_layers) + 1)) if isinstance(chosen, list) else chosen
        return len(self.vision_layers) + chosen if chosen < 0 else chosen - 1

    def image_grids(self, input_ids: torch.Tensor, **inputs) -> list[ImageGrid]:
        """Every image of every batch row (``image_index`` counts within the row), in batch-major order."""
        layouts = iter(self.image_layouts(input_ids, **inputs))
        grids = []
        for row, positions in enumerate(self.image_token_positions(input_ids)):
            start, image_index = 0, 0
            while start < len(positions):
                layout = next(layouts, None)
                if layout is None or start + layout.num_tokens > len(positions):
                    raise ValueError(f"batch row {row} has image tokens that no image of the inputs fills")
                grids.append(layout.place(row, image_index, positions[start:start + layout.num_tokens]))
                start, image_index = start + layout.num_tokens, image_index + 1
        if next(layouts, None) is not None:
            raise ValueError("the inputs have more images than the image tokens of input_ids hold")
        return grids


class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5 (``llava/modeling_llava.py``): one square raster per image, ``pixel_values`` (images, C, H, W).

    The tower returns (image_size / patch_size)^2 patch features, after a CLS feature for a CLIP tower
    (``CLIPVisionEmbeddings.class_embedding``); ``LlavaModel.get_image_features`` drops the first feature when
    ``vision_feature_select_strategy == "default"``. With CLIP, "default" leaves the raster and "full" the CLS then
    the raster: the CLS is one of the image's positions but in no tile.
    """

    family = "llava"
    model_classes = ("transformers.models.llava.modeling_llava:LlavaPreTrainedModel",)

    def image_layouts(self, input_ids, pixel_values, image_sizes=None, vision_feature_select_strategy=None,
                      **inputs):
        if image_sizes is not None:
            raise NotImplementedError("LLaVA with image_sizes (a Pixtral vision tower, per-image rasters split "
                                      "by [IMG_BREAK] tokens) has no grid in nograd")
        leading, side = self._raster(vision_feature_select_strategy)
        return [ImageLayout(leading + side * side, (raster(side, side, leading),))] * len(pixel_values)

    def _raster(self, strategy: str | None) -> tuple[int, int]:
        """(tokens before the raster, raster side) of every image under ``strategy`` (None: the config's)."""
        config = self.model.config
        strategy = strategy or config.vision_feature_select_strategy
        leading = int(self.vision_has_cls) - int(strategy == "default")
        if leading < 0:
            raise NotImplementedError('vision_feature_select_strategy="default" on a tower without CLS drops a '
                                      "patch, leaving no raster")
        return leading, config.vision_config.image_size // config.vision_config.patch_size

    @property
    def tokens_per_image(self) -> int | None:
        if getattr(self.model.config.vision_config, "model_type", None) == "pixtral":  # per-image rasters
            return None
        leading, side = self._raster(None)
        return leading + side * side

    def patch_scores_to_tokens(self, scores, image_inputs):
        """One (patches,) row per image: the projector maps patch i to the raster's token i (no folding)."""
        return torch.cat(list(scores))


class AnyResAdapter(VLMAdapter):
    """LLaVA-NeXT and -OneVision "anyres": per image a base tile, then a high-resolution raster with newlines.

    ``get_image_features`` runs the tower on the image's tiles of ``vision_config.image_size`` (how many:
    ``image_size_to_num_patches`` from ``image_sizes``, or 1 for an image left unsplit), (image_size /
    patch_size)^2 features each. ``pack_image_features`` keeps tile 0 as the base, stitches the other tiles into one
    raster (``get_anyres_image_grid_shape``), cuts off the processor's padding (``unpad_image``; OneVision may also
    shrink it, ``vision_aspect_ratio``) and appends ``image_newline`` to every raster row; an unsplit image gets
    the base and one newline. The adapter does not re-derive those sizes: it runs the model's own
    ``pack_image_features`` on a one-channel probe of zeros with newline 1 and reads the layout off the output.
    The base is a "base" tile (carrying the newline when unsplit), the raster a "crop" tile of all crops.
    """

    def image_layouts(self, input_ids, image_sizes, **inputs):
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        image_sizes = torch.as_tensor(image_sizes).cpu()
        layouts = []
        for size, tiles in zip(image_sizes, self.tiles_per_image(image_sizes, **inputs)):
            (packed,), _ = self.pack([torch.zeros(tiles, side * side, 1)], size[None], torch.ones(1), **inputs)
            layouts.append(self.layout_from_probe(packed[:, 0] == 1, side))
        return layouts

    @staticmethod
    def layout_from_probe(is_newline: torch.Tensor, side: int) -> ImageLayout:
        """The layout of a packed image whose tokens ``is_newline`` marks, the first ``side * side`` its base."""
        offsets, base = torch.arange(len(is_newline)), side * side
        patches, newlines = offsets[base:][~is_newline[base:]], offsets[is_newline]
        if patches.numel() == 0:
            return ImageLayout(len(offsets), (TileGrid(side, side, offsets[:base], newlines),))
        crop = TileGrid(len(newlines), len(patches) // len(newlines), patches, newlines, kind="crop")
        return ImageLayout(len(offsets), (raster(side, side), crop))

    def tiles_per_image(self, image_sizes, **inputs) -> list[int]:
        """How many tower tiles each image has (``image_size_to_num_patches``; 1 for an image left unsplit)."""
        config = self.model.config
        count_tiles = importlib.import_module(type(self.multimodal_model).__module__).image_size_to_num_patches
        sizes = torch.as_tensor(image_sizes).cpu()
        return [count_tiles(size, config.image_grid_pinpoints, config.vision_config.image_size) if split else 1
                for size, split in zip(sizes, self.split_images(len(sizes), **inputs))]

    def split_images(self, num_images: int, **inputs) -> list[bool]:
        """Which images ``get_image_features`` splits into tiles."""
        return [True] * num_images

    def pack(self, features, image_sizes, image_newline, **inputs):
        """The model's ``pack_image_features`` on ``features`` (a list of (tiles, tokens, channels) tensors)."""
        raise NotImplementedError


class LlavaNextAdapter(AnyResAdapter):
    """LLaVA-NeXT (``llava_next/modeling_llava_next.py``): every image is split."""

    family = "llava_next"
    model_classes = ("transformers.models.llava_next.modeling_llava_next:LlavaNextPreTrainedModel",)

    def pack(self, features, image_sizes, image_newline, vision_feature_select_strategy=None, **inputs):
        strategy = vision_feature_select_strategy or self.model.config.vision_feature_select_strategy
        return self.multimodal_model.pack_image_features(features, image_sizes, strategy, image_newline)


class LlavaOnevisionAdapter(AnyResAdapter):
    """LLaVA-OneVision (``llava_onevision/modeling_llava_onevision.py``): the images of a multi-image batch row
    stay unsplit (``get_image_features``: ``need_patching = [n == 1 for n in batch_num_images ...]``)."""

    family = "llava_onevision"
    model_classes = ("transformers.models.llava_onevision.modeling_llava_onevision:LlavaOnevisionPreTrainedModel",)

    def split_images(self, num_images, batch_num_images=None, **inputs):
        if batch_num_images is None:
            return super().split_images(num_images)
        return [int(n) == 1 for n in batch_num_images for _ in range(int(n))]

    def pack(self, features, image_sizes, image_newline, vision_aspect_ratio=None, **inputs):
        ratio = vision_aspect_ratio or self.model.config.vision_aspect_ratio
        return self.multimodal_model.pack_image_features(features, image_sizes, image_newline, ratio)


class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL (``qwen2_vl/modeling_qwen2_vl.py``): ``image_grid_thw[i] = (t, h, w)`` counts image i's patches.

    The ``PatchMerger`` merges ``vision_config.spatial_merge_size``^2 neighbours, so the image has t*h*w / m^2
    tokens (``get_image_features``' ``split_sizes``) in row-major (t, h/m, w/m) order, the order in which
    ``get_vision_position_ids`` gives them their 3D RoPE positions. One tile of h/m x w/m per temporal slice: a
    "base" tile for an image (t == 1), "frame" tiles otherwise.
    """

    family = "qwen2_vl"
    model_classes = ("transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLPreTrainedModel",)
    marker_id_attrs = ("vision_start_token_id", "vision_end_token_id")

    @property
    def vision_tower(self) -> nn.Module:
        """``model.visual``: blocks over every image's patches, attention per image (``cu_seqlens``), no CLS."""
        return self.multimodal_model.visual

    @property
    def vision_layers(self) -> list[nn.Module]:
        return list(self.vision_tower.blocks)

    @property
    def vision_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.vision_layers]

    @property
    def vision_has_cls(self) -> bool:
        return False

    @property
    def vision_feature_layer(self) -> int:
        """The merger reads the last block."""
        return len(self.vision_layers) - 1

    def patch_scores_to_tokens(self, scores, image_inputs):
        """The tower orders each image's patches so that every run of ``spatial_merge_size^2`` is one merged token;
        windowed towers (Qwen2.5-VL) permute those units (``vision_token_order``), undone here."""
        merge = self.vision_tower.spatial_merge_size ** 2
        units = torch.cat(list(scores)).reshape(-1, merge).sum(dim=-1)
        order = self.vision_token_order(image_inputs.get("image_grid_thw"))
        if order is None:
            return units
        tokens = torch.empty_like(units)
        tokens[order.to(units.device)] = units
        return tokens

    def image_layouts(self, input_ids, image_grid_thw, **inputs):
        merge = self.model.config.vision_config.spatial_merge_size
        layouts = []
        for t, h, w in image_grid_thw.tolist():
            rows, cols, kind = h // merge, w // merge, "base" if t == 1 else "frame"
            tiles = tuple(raster(rows, cols, frame * rows * cols, kind) for frame in range(t))
            layouts.append(ImageLayout(t * rows * cols, tiles))
        return layouts


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL (``qwen2_5_vl/modeling_qwen2_5_vl.py``): Qwen2-VL's layout. The tower's window attention permutes
    the patches and undoes it after the merger (``merged_hidden_states[reverse_indices]``)."""

    family = "qwen2_5_vl"
    model_classes = ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLPreTrainedModel",)

    @property
    def vision_full_attention_layers(self) -> list[int]:
        """``vision_config.fullatt_block_indexes``; the other blocks attend within windows."""
        return list(self.model.config.vision_config.fullatt_block_indexes)

    def vision_token_order(self, grid_thw):
        """The tower permutes merged-token units into windows (``get_vision_window_index``) before its first block
        and restores the order after the merger."""
        from transformers.vision_utils import get_vision_window_index

        tower = self.vision_tower
        order, _ = get_vision_window_index(grid_thw, spatial_merge_size=tower.spatial_merge_size,
                                           window_size=tower.window_size, patch_size=tower.patch_size)
        return order


class Idefics3Adapter(VLMAdapter):
    """Idefics3 and SmolVLM (``idefics3/``, ``smolvlm/``; SmolVLM's modeling is Idefics3's under a new name).

    The image processor splits a large image into R x C crops of ``vision_config.image_size``, row-major, and
    appends the whole image resized to one tile, the global image (``Idefics3ImageProcessor.split_images``). Each
    tile's (image_size / patch_size)^2 features are folded by the connector's ``pixel_shuffle`` into a row-major
    grid of side (image_size / patch_size) / scale_factor: ``Idefics3Model.image_seq_len`` tokens. The processor
    writes each tile as ``<fake_token_around_image><tag>`` and its image tokens, the tag being ``<row_r_col_c>``
    for a crop and ``<global-img>`` for the global image, which comes last (``Idefics3Processor.
    replace_image_token``, SmolVLM's ``get_image_prompt_string``; SmolVLM writes video frames as unsplit images).
    So a batch row's tiles are consecutive runs of image_seq_len image tokens, and an image ends with each run
    tagged like the row's last run, ``<global-img>``. Tiles: one "crop" tile per crop (row-major), then the global
    image as the "base" tile. A crop's ``cell`` is its (r, c, R, C): inside a row of crops a tile starts two tokens
    after the previous one ends (``<fake_token_around_image><row_r_col_c>``), a new row one token later (the ``"\n"``
    the processor writes after each row), which gives C; the processor's resize makes the split uniform over the
    original image (``Idefics3ImageProcessor.resize_for_vision_encoder``, ``split_images``).
    """

    family = "idefics3"
    model_classes = (
        "transformers.models.idefics3.modeling_idefics3:Idefics3PreTrainedModel",
        "transformers.models.smolvlm.modeling_smolvlm:SmolVLMPreTrainedModel",
    )
    language_model_attr = "text_model"

    @property
    def vision_tower(self) -> nn.Module:
        """``Idefics3Model.vision_model``: a SigLIP-like tower (no CLS token) run once on every real tile."""
        return self.multimodal_model.vision_model

    @property
    def vision_feature_layer(self) -> int:
        """The connector reads the tower's ``last_hidden_state``: its last layer."""
        return len(self.vision_layers) - 1

    def patch_scores_to_tokens(self, scores, image_inputs):
        """One row per tile: the connector's own ``pixel_shuffle`` puts each token's ``scale_factor^2`` patches side
        by side (``Idefics3Connector``), where they add up."""
        connector = self.multimodal_model.connector
        tiles = torch.stack(list(scores)).float()
        return connector.pixel_shuffle(tiles[..., None], connector.scale_factor).sum(dim=-1).flatten()

    def image_layouts(self, input_ids, **inputs):
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
        tile = side * side
        layouts = []
        for row, (ids, positions) in enumerate(zip(input_ids, self.image_token_positions(input_ids))):
            if positions.numel() == 0:
                continue
            starts, ends = positions[::tile], positions[tile - 1::tile]
            if len(positions) % tile or (ends - starts != tile - 1).any() or (starts == 0).any():
                raise ValueError(f"batch row {row}: image tokens are not runs of {tile} behind a tag token, "
                                 "as the Idefics3/SmolVLM processor writes them")
            tags = ids[starts - 1]
            previous = -1
            for last in (tags == tags[-1]).nonzero().flatten().tolist():
                crops = last - previous - 1
                cols = self._crops_per_row(starts[previous + 1:last], ends[previous + 1:last], row)
                tiles = tuple(replace(raster(side, side, k * tile, "crop"), cell=(k // cols, k % cols, crops // cols,
                                                                                  cols)) for k in range(crops))
                layouts.append(ImageLayout((crops + 1) * tile, tiles + (raster(side, side, crops * tile),)))
                previous = last
        return layouts

    @staticmethod
    def _crops_per_row(starts: torch.Tensor, ends: torch.Tensor, row: int) -> int:
        """C of an image's R x C crops, from the gaps between its crop tiles (2 tokens inside a row, 3 between rows)."""
        if starts.numel() <= 1:
            return max(starts.numel(), 1)
        breaks = ((starts[1:] - ends[:-1] - 1) > 2).nonzero().flatten()
        cols = int(breaks[0]) + 1 if breaks.numel() else starts.numel()
        if starts.numel() % cols:
            raise ValueError(f"batch row {row}: {starts.numel()} crops do not fill rows of {cols}")
        return cols


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (``qwen3_vl/modeling_qwen3_vl.py``): Qwen2-VL's layout (``get_image_features``' ``split_sizes`` =
    t*h*w / m^2, ``get_vision_position_ids`` over the (t, h/m, w/m) grid) and its ``model.visual`` tower of
    ``blocks`` (no window attention). The decoder ``Qwen3VLTextModel`` (``model.language_model``, config
    ``text_config``) is a Qwen3 decoder with interleaved multimodal RoPE; its ``Qwen3VLTextAttention`` calls
    ``ALL_ATTENTION_FUNCTIONS``. Deepstack: after each of its first ``len(vision_config.deepstack_visual_indexes)``
    layers the decoder adds visual features at the image-token positions (``_deepstack_process``), outside
    attention, so the attention path sees ordinary hidden states; token surgery (dropping image tokens) before those
    layers would break that position mask, which is why the token-drop methods (``methods/token_drop.py``) refuse
    any boundary at or before the last deepstack layer."""

    family = "qwen3_vl"
    model_classes = ("transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLPreTrainedModel",)

    @property
    def vision_feature_layer(self) -> int:
        """The merger (``Qwen3VLVisionModel.merger``, whose output fills the image tokens) reads the last block;
        the deepstack mergers read ``vision_config.deepstack_visual_indexes`` and are added to the decoder's hidden
        states at the image tokens, outside the image tokens' own features: the last block is the feature layer."""
        return len(self.vision_layers) - 1


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class InternVLAdapter(VLMAdapter):
    """InternVL-hf (``internvl/modeling_internvl.py``): tiles of a fixed token count.

    ``get_image_features`` runs the tower on every tile of ``pixel_values`` (tiles, C, H, W), drops the CLS feature
    (``vision_feature_select_strategy="default"``), folds the (H/p) x (W/p) patch grid with ``pixel_shuffle`` by
    ``downsample_ratio`` into a row-major (H/p * r) x (W/p * r) raster (``image_seq_length`` tokens) and projects
    it. The processor (``processing_internvl.py``) writes each image as ``<img>``, its tiles' image tokens, ``</img>``;
    the image processor (``got_ocr2``'s ``crop_to_patches``) gives the R x C crops row-major and then, when it
    split the image, a thumbnail of the whole image. So an image is one unbroken run of image tokens, a whole number
    of tiles: a single tile is the "base" tile, several are "crop" tiles and the thumbnail last as "base". R and C
    are not in the inputs; a video frame (also written ``<img>...</img>``) looks like an unsplit image.
    The decoder is a Qwen2/Llama ``...Model`` at ``model.language_model`` (config ``text_config``).
    The vision tower keeps its layers at ``encoder.layer``, each with ``.attention``, and prepends a CLS token.
    """

    family = "internvl"
    model_classes = ("transformers.models.internvl.modeling_internvl:InternVLPreTrainedModel",)

    @property
    def vision_layers(self) -> list[nn.Module]:
        return list(self.vision_tower.encoder.layer)

    @property
    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self.vision_layers]

    @property
    def vision_has_cls(self) -> bool:
        return True

    def patch_scores_to_tokens(self, scores, image_inputs):
        """One (patches,) row per tile (the CLS left out), in ``pixel_values`` order: the model's own
        ``pixel_shuffle`` by ``downsample_ratio`` puts each token's patches side by side, where they add up (the
        square (patches^0.5)^2 grid ``get_image_features`` reshapes to); the tiles' tokens follow one another."""
        tiles = torch.stack(list(scores)).float()
        side = int(tiles.shape[1] ** 0.5)
        shuffled = self.multimodal_model.pixel_shuffle(tiles.reshape(len(tiles), side, side, 1),
                                                       scale_factor=self.model.config.downsample_ratio)
        return shuffled.sum(dim=-1).flatten()

    def tile_shape(self) -> tuple[int, int]:
        """(rows, cols) of one tile's tokens."""
        config = self.model.config
        vision = config.vision_config
        return tuple(int(side // patch * config.downsample_ratio)
                     for side, patch in zip(_pair(vision.image_size), _pair(vision.patch_size)))

    def image_layouts(self, input_ids, **inputs):
        rows, cols = self.tile_shape()
        tile = rows * cols
        layouts = []
        for row, positions in enumerate(self.image_token_positions(input_ids)):
            runs = torch.tensor_split(positions, ((positions.diff() != 1).nonzero().flatten() + 1).tolist())
            for run in (r for r in runs if r.numel()):
                if run.numel() % tile:
                    raise ValueError(f"batch row {row}: a run of {run.numel()} image tokens is not a whole number of "
                                     f"{tile}-token InternVL tiles")
                crops = run.numel() // tile - 1
                tiles = tuple(raster(rows, cols, k * tile, "crop") for k in range(crops))
                layouts.append(ImageLayout(run.numel(), tiles + (raster(rows, cols, crops * tile),)))
        return layouts


class Mistral3Adapter(VLMAdapter):
    """Mistral3 (``mistral3/modeling_mistral3.py``; Mistral-Small-3.x): a Pixtral tower, one raster per image.

    ``image_sizes[i] = (H, W)`` is image i's size in pixels; ``Mistral3PatchMerger`` unfolds its (H/p) x (W/p) patch
    grid in ``spatial_merge_size`` blocks, row-major, so the image has (H/(p*m)) x (W/(p*m)) tokens
    (``get_image_features``' ``split_sizes``). The Pixtral processor (``pixtral/processing_pixtral.py``) ends each
    row of them with ``[IMG_BREAK]`` and the last with ``[IMG_END]``: token ids the model config does not know, so
    a tile's ``newline_positions`` stay ``None`` and its ``positions`` are the image tokens only. The config names
    the image token ``image_token_index`` (``attribute_map`` gives ``image_token_id``). The decoder is a
    ``MistralModel`` at ``model.language_model`` (config ``text_config``); the tower keeps its layers at
    ``transformer.layers``, each with ``.attention``, and has no CLS token.
    """

    family = "mistral3"
    model_classes = ("transformers.models.mistral3.modeling_mistral3:Mistral3PreTrainedModel",)

    @property
    def vision_layers(self) -> list[nn.Module]:
        return list(self.vision_tower.transformer.layers)

    @property
    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self.vision_layers]

    def patch_scores_to_tokens(self, scores, image_inputs):
        """The tower runs every image of the call as one sequence (``PixtralVisionModel``: each image's (H/p) x
        (W/p) patches row-major, the images one after the other, a block-diagonal mask): one (patches,) row per
        tower call. Split per image by ``image_sizes`` and folded as ``Mistral3PatchMerger`` does, ``unfold`` in
        ``spatial_merge_size`` blocks, where a block's patches add up."""
        merger = self.multimodal_model.multi_modal_projector.patch_merger
        merge, patch = merger.spatial_merge_size, merger.patch_size
        grids = [(int(h) // patch, int(w) // patch) for h, w in torch.as_tensor(image_inputs["image_sizes"]).tolist()]
        patches = torch.cat(list(scores)).float()
        if len(patches) != sum(h * w for h, w in grids):
            raise RuntimeError(f"mistral3: {len(patches)} patch scores for images of {grids} patches")
        tokens = []
        for (h, w), image in zip(grids, patches.split([h * w for h, w in grids])):
            blocks = torch.nn.functional.unfold(image.view(1, 1, h, w), kernel_size=merge, stride=merge)
            tokens.append(blocks[0].sum(dim=0))
        return torch.cat(tokens)

    def image_layouts(self, input_ids, image_sizes, **inputs):
        config = self.model.config
        step = config.vision_config.patch_size * config.spatial_merge_size
        layouts = []
        for height, width in torch.as_tensor(image_sizes).tolist():
            rows, cols = height // step, width // step
            layouts.append(ImageLayout(rows * cols, (raster(rows, cols),)))
        return layouts


class Gemma3Adapter(VLMAdapter):
    """Gemma3 (``gemma3/modeling_gemma3.py``): a SigLIP tower, one square raster of ``mm_tokens_per_image`` per image.

    ``Gemma3MultiModalProjector`` average-pools each image's (image_size / patch_size)^2 patch grid to
    ``tokens_per_side = sqrt(mm_tokens_per_image)`` per side and flattens it row-major; every entry of
    ``pixel_values`` is one image (pan-and-scan crops are written as images of their own, after the original).
    The decoder ``Gemma3TextModel`` (``model.language_model``, config ``text_config``) calls
    ``ALL_ATTENTION_FUNCTIONS`` with ``scaling = query_pre_attn_scalar**-0.5`` and its ``sliding_window`` on sliding
    layers, and passes no ``softcap`` (``attn_logit_softcapping`` is ``None`` in Gemma3's configs and unused by
    ``Gemma3Attention``, unlike Gemma2); with ``token_type_ids`` the model builds a mask in which
    image tokens see each other bidirectionally (``create_masks_for_vision_model``), which nograd's attention path
    passes through as a residual mask. The decoder receives those masks as a dict, so the batch's 2-D padding mask
    is read where ``Gemma3Model`` receives it (``padding_mask_module``). Only the multimodal classes are matched: a
    text-only ``Gemma3ForCausalLM`` is no VLM.
    """

    family = "gemma3"
    model_classes = ("transformers.models.gemma3.modeling_gemma3:Gemma3ForConditionalGeneration",
                     "transformers.models.gemma3.modeling_gemma3:Gemma3Model")
    marker_id_attrs = ("boi_token_index", "eoi_token_index")

    @property
    def padding_mask_module(self) -> nn.Module:
        """``Gemma3Model``: it turns the 2-D ``attention_mask`` into a dict of 4-D masks for the decoder."""
        return self.multimodal_model

    @property
    def vision_feature_layer(self) -> int:
        """The projector reads the tower's ``last_hidden_state`` (``get_image_features``): its last layer (the
        config has no ``vision_feature_layer``)."""
        return len(self.vision_layers) - 1

    def patch_scores_to_tokens(self, scores, image_inputs):
        """One (patches,) row per image: the projector's own ``avg_pool`` over its (patches_per_image)^2 grid
        (``kernel_size``^2 patches per token, row-major as ``Gemma3MultiModalProjector.forward`` reshapes them),
        times ``kernel_size``^2, so that a token's score is the sum of its patches' (as the other families)."""
        projector = self.multimodal_model.multi_modal_projector
        images = torch.stack(list(scores)).float()
        side = projector.patches_per_image
        pooled = projector.avg_pool(images.reshape(len(images), 1, side, side)) * projector.kernel_size ** 2
        return pooled.flatten()

    def image_layouts(self, input_ids, pixel_values, **inputs):
        side = int(self.model.config.mm_tokens_per_image ** 0.5)
        return [ImageLayout(side * side, (raster(side, side),))] * len(pixel_values)

    @property
    def tokens_per_image(self) -> int | None:
        return int(self.model.config.mm_tokens_per_image)


VLM_ADAPTERS = (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter,
                Qwen3VLAdapter, Idefics3Adapter, InternVLAdapter, Mistral3Adapter, Gemma3Adapter)
