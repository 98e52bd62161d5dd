"""Tiny VLMs: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM; and inputs for them.

Every model pairs a 2-layer vision tower (hidden 32, 28x28 images of 7x7 patches: a 4x4 patch grid) with a 2-layer
decoder (hidden 64, 4 heads, 2 kv heads, vocab 160). Token ids: pad 0, BOS 1, EOS 2, text 4..99, and the
special tokens below, all inside the vocabulary.

``make_inputs(family, model)`` builds by hand what the family's processor would return for a batch of prompts
(even rows: text, images, text; odd rows the same, left-padded by 3 pad tokens). The image tokens per image are
counted by the model itself (``get_image_features``), so they always match what its forward checks. The images:

- ``llava``: one image in even rows, two in odd rows.
- ``llava_next``: a 10x56 image (H x W) in even rows, a 56x40 one in odd rows; pinpoints 28x56, 56x28, 56x56.
- ``llava_onevision``: a 56x40 image in even rows, its crop raster shrunk by ``vision_aspect_ratio="anyres_max_1"``;
  a 28x28 and a 40x20 image in odd rows, which a multi-image row leaves unsplit (``batch_num_images``).
- ``qwen2_vl`` / ``qwen2_5_vl``: a 4x6-patch image (``image_grid_thw`` 1x4x6) in even rows, 2x4 in odd rows.
- ``idefics3`` / ``smolvlm``: an image split 2 rows x 3 cols plus its global image in even rows, an unsplit image
  (global image only) in odd rows, in the processor's ``<fake_token_around_image><row_r_col_c>`` prompt format.
"""

from __future__ import annotations

import inspect

import torch
import transformers as tf
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

PAD, BOS, EOS = 0, 1, 2
IMAGE, VIDEO = 150, 151
VISION_START, VISION_END = 152, 153  # Qwen: <|vision_start|> <|vision_end|>
FAKE, GLOBAL, NEWLINE = 154, 155, 13  # Idefics3/SmolVLM: <fake_token_around_image>, <global-img>, "\n"
ROW_COL = 120  # Idefics3/SmolVLM: <row_r_col_c> is ROW_COL + 6 * (r - 1) + (c - 1) in hand-built prompts
ROW_COL_TAGS = 156  # ... and ROW_COL_TAGS + 2 * (r - 1) + (c - 1) (up to 2 x 2) in the tiny processor's vocabulary
LEFT_PAD = 3

TEXT = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=7)
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
QWEN_TEXT = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
QWEN_TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                   vision_end_token_id=VISION_END)
QWEN_VISION = dict(depth=2, num_heads=2, patch_size=7, spatial_merge_size=2, temporal_patch_size=2)


def _configs():
    """Family -> (model class, config). Built on demand: each config is a fresh object."""
    return {
        "llava": (tf.LlavaForConditionalGeneration, tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**VISION), text_config=tf.LlamaConfig(**TEXT),
            image_token_index=IMAGE, image_seq_length=16)),
        "llava_next": (tf.LlavaNextForConditionalGeneration, tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(**VISION), text_config=tf.LlamaConfig(**TEXT),
            image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS, image_seq_length=16)),
        "llava_onevision": (tf.LlavaOnevisionForConditionalGeneration, tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**VISION), text_config=tf.Qwen2Config(**TEXT),
            image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS,
            vision_aspect_ratio="anyres_max_1")),
        "qwen2_vl": (tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig(
            text_config=QWEN_TEXT, vision_config=dict(QWEN_VISION, embed_dim=32, hidden_size=64),
            **QWEN_TOKENS)),
        "qwen2_5_vl": (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig(
            text_config=QWEN_TEXT,
            vision_config=dict(QWEN_VISION, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                               window_size=28, fullatt_block_indexes=[1]),
            **QWEN_TOKENS)),
        "idefics3": (tf.Idefics3ForConditionalGeneration, tf.Idefics3Config(
            vision_config=VISION, text_config=tf.LlamaConfig(**TEXT), image_token_id=IMAGE, scale_factor=2)),
        "smolvlm": (tf.SmolVLMForConditionalGeneration, tf.SmolVLMConfig(
            vision_config=VISION, text_config=tf.LlamaConfig(**TEXT), image_token_id=IMAGE, scale_factor=2)),
    }


def _builder(family):
    def build(seed: int = 0, attn_implementation: str | None = None, dtype=torch.float32, text_layers: int = 0,
              **overrides):
        """``text_layers``: a deeper decoder than the default 2 layers (for methods that work in stages)."""
        model_cls, config = _configs()[family]
        if text_layers:
            text = config.text_config
            text.num_hidden_layers = text_layers
            if getattr(text, "layer_types", None) is not None:
                text.layer_types = [text.layer_types[0]] * text_layers
        for key, value in overrides.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        return model.eval()

    return build


BUILDERS = {family: _builder(family) for family in _configs()}


# ---- inputs -------------------------------------------------------------------------------------------------------
def _pixels(generator, *shape):
    return torch.randn(*shape, generator=generator)


def _llava_images(row, generator, model):
    """LLaVA-1.5: (num_images, 3, 28, 28)."""
    return {"pixel_values": _pixels(generator, 1 + row % 2, 3, 28, 28)}


def _anyres_images(sizes, generator, model, split=True):
    """LLaVA-NeXT/-OneVision: ``image_sizes`` (H, W) and per image 1 base + n crop tiles of 28x28, padded to 5."""
    config = model.config
    tiles = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
             if split else 1 for size in sizes]
    pixels = torch.zeros(len(sizes), 5, 3, 28, 28)
    for index, count in enumerate(tiles):
        pixels[index, :count] = _pixels(generator, count, 3, 28, 28)
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


def _llava_next_images(row, generator, model):
    return _anyres_images([[10, 56]] if row % 2 == 0 else [[56, 40]], generator, model)


def _onevision_images(row, generator, model):
    if row % 2 == 0:
        return {**_anyres_images([[56, 40]], generator, model), "batch_num_images": torch.tensor([1])}
    return {**_anyres_images([[28, 28], [40, 20]], generator, model, split=False),
            "batch_num_images": torch.tensor([2])}


def _qwen_images(row, generator, model):
    """Qwen2-VL/2.5-VL: flattened patches (t*h*w, 3 * temporal_patch_size * patch^2) and ``image_grid_thw``."""
    grid = torch.tensor([[1, 4, 6]] if row % 2 == 0 else [[1, 2, 4]])
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {"pixel_values": _pixels(generator, int(grid.prod()), width), "image_grid_thw": grid}


def _idefics_images(row, generator, model):
    """Idefics3/SmolVLM: (1, 7, 3, 28, 28): 2x3 crops and the global image, or the global image then all-zero
    padding tiles, which the model drops."""
    tiles = 7 if row % 2 == 0 else 1
    pixels, mask = torch.zeros(1, 7, 3, 28, 28), torch.zeros(1, 7, 28, 28, dtype=torch.bool)
    pixels[:, :tiles], mask[:, :tiles] = _pixels(generator, 1, tiles, 3, 28, 28), True
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


IMAGES = {"llava": _llava_images, "llava_next": _llava_next_images, "llava_onevision": _onevision_images,
          "qwen2_vl": _qwen_images, "qwen2_5_vl": _qwen_images, "idefics3": _idefics_images,
          "smolvlm": _idefics_images}


def _idefics_prompt(row, seq_len):
    """The image part of the prompt, as ``Idefics3Processor.replace_image_token`` writes it."""
    def tile(tag):
        return [FAKE, tag] + [IMAGE] * seq_len

    if row % 2 == 1:
        return tile(GLOBAL) + [FAKE]
    crops = [token for r in range(2) for token in
             [t for c in range(3) for t in tile(ROW_COL + 6 * r + c)] + [NEWLINE]]
    return crops + [NEWLINE] + tile(GLOBAL) + [FAKE]


def _image_prompt(family, row, images, model):
    """The image tokens (and the tokens around them) of one row, with the model's own count per image."""
    if family in ("idefics3", "smolvlm"):
        return _idefics_prompt(row, model.model.image_seq_len)
    with torch.no_grad():
        features = model.get_image_features(**images).pooler_output
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return [token for f in features for token in [VISION_START] + [IMAGE] * len(f) + [VISION_END]]
    return [IMAGE] * sum(len(f) for f in features)


def padded_prompts(image_prompts: list[list[int]], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): row r is ``BOS, 2 random text tokens, image_prompts[r], 3 random text tokens``,
    all rows left-padded to the longest, odd rows by ``LEFT_PAD`` more pad tokens."""
    prompts = [[BOS, *torch.randint(4, 100, (2,), generator=generator).tolist(), *image_prompt,
                *torch.randint(4, 100, (3,), generator=generator).tolist()] for image_prompt in image_prompts]
    length = max(len(p) + LEFT_PAD * (row % 2) for row, p in enumerate(prompts))
    input_ids = torch.full((len(prompts), length), PAD)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


def make_inputs(family: str, model, batch: int = 2, seed: int = 0) -> dict:
    """Model inputs for ``batch`` prompts: ``input_ids``, ``attention_mask`` and the family's image inputs.

    Row r is ``BOS, 2 text tokens, image part, 3 text tokens``; odd rows are left-padded by ``LEFT_PAD`` extra pad
    tokens (all rows are left-padded to the longest). Qwen rows also get ``mm_token_type_ids`` (1 on image tokens).
    """
    if family not in IMAGES:
        raise ValueError(f"make_inputs: no tiny inputs for {family!r} here (families: {', '.join(IMAGES)}); the newer "
                         "families are nograd.tiny.vlm_families.make_inputs's")
    generator = torch.Generator().manual_seed(seed)
    images = [IMAGES[family](row, generator, model) for row in range(batch)]
    input_ids, attention_mask = padded_prompts([_image_prompt(family, row, images[row], model)
                                                for row in range(batch)], generator)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              **{key: torch.cat([row[key] for row in images]) for key in images[0]}}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).int()
    return inputs


# ---- video inputs (Qwen2-VL / 2.5-VL, LLaVA-OneVision: a video token apart from the image token) -------------------
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


def _video_tokens(family, model, videos: dict) -> list[int]:
    """The video part of one row's prompt: the model's own token count per video (Qwen: between vision start/end)."""
    rest = {key: value for key, value in videos.items() if key != "pixel_values_videos"}
    with torch.no_grad():  # the pixels positionally: OneVision names them pixel_values before transformers 5.24
        features = model.model.get_video_features(videos["pixel_values_videos"], **rest).pooler_output
    if family == "llava_onevision":
        count = features.shape[1]
        if "image_newline" not in inspect.getsource(type(model.model).get_video_features):
            count += 1  # transformers < 5.24 appends the newline in the forward, not in get_video_features
        return [VIDEO] * count
    return [token for f in features for token in [VISION_START] + [VIDEO] * len(f) + [VISION_END]]


def _video(family, row, generator, model) -> dict:
    """One row's video: 2 frames of 28x28 (OneVision), or a (2, 4, 6) / (2, 2, 4) patch grid (Qwen)."""
    if family == "llava_onevision":
        return {"pixel_values_videos": _pixels(generator, 1, 2, 3, 28, 28)}
    grid = torch.tensor([[2, 4, 6]] if row % 2 == 0 else [[2, 2, 4]])
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {"pixel_values_videos": _pixels(generator, int(grid.prod()), width), "video_grid_thw": grid}


def make_video_inputs(family: str, model, batch: int = 2, seed: int = 0, images: bool = True) -> dict:
    """Model inputs for ``batch`` prompts with a video: as ``make_inputs``, with each row's image part followed by
    a video (``images=False``: the video alone). Qwen rows get ``mm_token_type_ids`` (1 image, 2 video tokens)."""
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"family={family!r} has no video token; expected one of {VIDEO_FAMILIES}")
    generator = torch.Generator().manual_seed(seed)
    image_inputs = [IMAGES[family](row, generator, model) for row in range(batch)] if images else []
    videos = [_video(family, row, generator, model) for row in range(batch)]
    parts = [(_image_prompt(family, row, image_inputs[row], model) if images else [])
             + _video_tokens(family, model, videos[row]) for row in range(batch)]
    input_ids, attention_mask = padded_prompts(parts, generator)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              **{key: torch.cat([row[key] for row in videos]) for key in videos[0]}}
    if images:
        inputs.update({key: torch.cat([row[key] for row in image_inputs]) for key in image_inputs[0]})
    if family in ("qwen2_vl", "qwen2_5_vl"):
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    return inputs
