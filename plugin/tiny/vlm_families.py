"""Tiny Qwen3-VL, InternVL-hf, Mistral3 and Gemma3 (random seeded weights, built from configs), inputs for them,
and a homologous FRANK trio per family.

Every model has a 2-layer vision tower (hidden 32, 28x28 images of 7x7 patches: a 4x4 patch grid) and a decoder of
``text_layers`` layers (hidden 64, 4 heads, 2 kv heads, head_dim 16, vocab 160), token ids as in ``nograd.tiny.vlms``:

- ``qwen3_vl``: spatial merge 2, deepstack after vision block 0; ``image_grid_thw`` 1x4x6 in even rows (2x3 tokens),
  1x2x4 in odd rows (1x2), each between ``<|vision_start|>`` and ``<|vision_end|>``.
- ``internvl``: pixel shuffle 0.5, 2x2 = 4 tokens per 28x28 tile; even rows: one image of 2 crops + thumbnail (3
  tiles), odd rows: two unsplit images; each written ``<img>`` + 4 * tiles image tokens + ``</img>``.
- ``mistral3``: Pixtral tower, spatial merge 2; even rows: one 28x28 image (2x2 tokens), odd rows a 28x14 (2x1) and
  a 14x28 (1x2) image; each row of tokens ends with ``[IMG_BREAK]``, the last with ``[IMG_END]`` (Pixtral processor).
- ``gemma3``: SigLIP tower pooled to ``mm_tokens_per_image`` 4 (2x2) per image, between ``<start_of_image>`` and
  ``<end_of_image>``; even rows one image, odd rows two; ``token_type_ids`` (1 on image tokens) for the bidirectional
  image mask. Decoder layers alternate sliding (window 6) and full attention.
"""

from __future__ import annotations

import copy

import torch
import transformers as tf

from .llms import CONFIGS as TEXT_CONFIGS
from .vlms import IMAGE, QWEN_TOKENS, QWEN_VISION, TEXT, VISION, VISION_END, VISION_START, padded_prompts

BEGIN, END = 156, 157  # InternVL <img> </img>; Mistral3 [IMG_BREAK] [IMG_END]; Gemma3 <start_of_image> <end_of_image>
BREAK, IMG_END = BEGIN, END
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
SLIDING_WINDOW = 6


def _text(family: str, layers: int) -> dict:
    """The decoder's config values, shared by the MLLM's text config and its trio's text LLMs."""
    text = dict(TEXT, num_hidden_layers=layers, head_dim=16, rope_parameters=dict(ROPE))
    if family == "qwen3_vl":
        text["rope_parameters"]["mrope_section"] = [2, 3, 3]
    if family == "mistral3":
        text["sliding_window"] = None
    if family == "gemma3":  # one RoPE per layer type (transformers 5.17 reads no flat rope_parameters here)
        text.update(sliding_window=SLIDING_WINDOW, rope_parameters={"full_attention": dict(ROPE),
                                                                   "sliding_attention": dict(ROPE)},
                    layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (
                        layers % 2))
    return text


def _config(family: str, layers: int):
    text = _text(family, layers)
    if family == "qwen3_vl":
        return tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig(
            text_config=text, vision_config=dict(QWEN_VISION, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                 deepstack_visual_indexes=[0]), **QWEN_TOKENS)
    if family == "internvl":
        return tf.InternVLForConditionalGeneration, tf.InternVLConfig(
            text_config=tf.Qwen2Config(**text), image_token_id=IMAGE, image_seq_length=4,
            vision_config=dict(VISION, image_size=[28, 28], patch_size=[7, 7]))
    if family == "mistral3":
        return tf.Mistral3ForConditionalGeneration, tf.Mistral3Config(
            text_config=tf.MistralConfig(**text), image_token_index=IMAGE, spatial_merge_size=2,
            vision_config=dict(VISION, head_dim=16))
    if family == "gemma3":
        return tf.Gemma3ForConditionalGeneration, tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**text), mm_tokens_per_image=4, image_token_index=IMAGE,
            boi_token_index=BEGIN, eoi_token_index=END, vision_config=VISION)
    raise KeyError(family)


def build(family: str, seed: int = 0, text_layers: int = 2, attn_implementation: str | None = None,
          dtype=torch.float32):
    """A tiny ``family`` VLM in eval mode, weights drawn from ``torch.manual_seed(seed)``."""
    model_cls, config = _config(family, text_layers)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype).eval()
    draw_zero_matrices(model, config.get_text_config().initializer_range)
    return model


def draw_zero_matrices(model, std: float) -> None:
    """Draw from N(0, std) the matrices transformers' init leaves at zero where a trained model has weights:
    Gemma3's ``mm_input_projection_weight`` (all-zero, it gave every image the same zero features, so no image
    changed the output), InternVL's vision position embeddings and CLS token."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, std)


FAMILIES = ("qwen3_vl", "internvl", "mistral3", "gemma3")
TEXT_LLM = {"qwen3_vl": "qwen3", "internvl": "qwen2", "mistral3": "mistral"}


def build_text(family: str, seed: int = 0, text_layers: int = 2):
    """The text LLM whose decoder has the same tensors (names and shapes) as ``family``'s language model."""
    text = _text(family, text_layers)
    if family == "gemma3":
        config_cls, model_cls = tf.Gemma3TextConfig, tf.Gemma3ForCausalLM
    else:
        config_cls, model_cls, _ = TEXT_CONFIGS[TEXT_LLM[family]]
    if family == "qwen3_vl":
        text["rope_parameters"] = dict(ROPE)
    torch.manual_seed(seed)
    return model_cls._from_config(config_cls(**text)).eval()


def noisy(module, scale, seed):
    """Add seeded Gaussian noise of std ``scale`` to every parameter of ``module``, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make_trio(family: str, layers: int):
    """(mllm, reasoning, base) of ``family`` with ``layers`` decoder layers (``homologous``)."""
    return homologous(build(family, text_layers=layers), build_text(family, text_layers=layers))


def homologous(mllm, base):
    """(mllm, reasoning, base), FRANK's homologous trio: the MLLM's language model and lm_head become the base's,
    its layers plus 0.01 noise; the reasoning LLM is the base plus 0.02 noise on its layers (spec ``frank.md``
    §5.7)."""
    decoder = mllm.get_decoder()
    decoder.load_state_dict(base.model.state_dict())
    with torch.no_grad():
        mllm.lm_head.weight.copy_(base.lm_head.weight)
    noisy(decoder.layers, 0.01, 1)
    reasoning = copy.deepcopy(base)
    noisy(reasoning.model.layers, 0.02, 2)
    return mllm, reasoning, base


# ---- inputs -------------------------------------------------------------------------------------------------------
def _qwen3_vl(row, generator, model):
    grid = torch.tensor([[1, 4, 6]] if row % 2 == 0 else [[1, 2, 4]])
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    tokens = int(grid.prod()) // vision.spatial_merge_size ** 2
    images = {"pixel_values": torch.randn(int(grid.prod()), width, generator=generator), "image_grid_thw": grid}
    return images, [VISION_START] + [IMAGE] * tokens + [VISION_END]


INTERNVL_TILES = {0: [3], 1: [1, 1]}  # row parity -> tiles per image
MISTRAL3_SIZES = {0: [[28, 28]], 1: [[28, 14], [14, 28]]}  # row parity -> (H, W) per image


def _internvl(row, generator, model):
    tiles = INTERNVL_TILES[row % 2]
    prompt = [t for n in tiles for t in [BEGIN] + [IMAGE] * 4 * n + [END]]
    return {"pixel_values": torch.randn(sum(tiles), 3, 28, 28, generator=generator)}, prompt


def _mistral3(row, generator, model):
    sizes = MISTRAL3_SIZES[row % 2]
    pixels = torch.zeros(len(sizes), 3, 28, 28)
    prompt = []
    for index, (h, w) in enumerate(sizes):
        pixels[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        rows = [[IMAGE] * (w // 14) + [BREAK] for _ in range(h // 14)]
        rows[-1][-1] = IMG_END
        prompt += [t for r in rows for t in r]
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}, prompt


def _gemma3(row, generator, model):
    count = 1 + row % 2
    prompt = [t for _ in range(count) for t in [BEGIN] + [IMAGE] * 4 + [END]]
    return {"pixel_values": torch.randn(count, 3, 28, 28, generator=generator)}, prompt


IMAGES = {"qwen3_vl": _qwen3_vl, "internvl": _internvl, "mistral3": _mistral3, "gemma3": _gemma3}


def make_inputs(family: str, model, batch: int = 2, seed: int = 0) -> dict:
    """Row r is ``BOS, 2 text tokens, image part, 3 text tokens``, odd rows left-padded by ``LEFT_PAD`` more (as
    ``tiny/vlm.py``); plus ``mm_token_type_ids`` (Qwen3-VL) or ``token_type_ids`` (Gemma3), 1 on image tokens."""
    generator = torch.Generator().manual_seed(seed)
    parts = [IMAGES[family](row, generator, model) for row in range(batch)]
    input_ids, attention_mask = padded_prompts([image_prompt for _, image_prompt in parts], generator)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              **{key: torch.cat([images[key] for images, _ in parts]) for key in parts[0][0]}}
    if family == "qwen3_vl":
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).int()
    if family == "gemma3":
        inputs["token_type_ids"] = (input_ids == IMAGE).long()
    return inputs
