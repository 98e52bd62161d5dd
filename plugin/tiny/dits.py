"""Tiny MM-DiTs (SD3/SD3.5, FLUX.1) and full tiny diffusers pipelines around them, offline.

Sizes follow diffusers' own pipeline tests (``tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py``,
``tests/pipelines/flux/test_pipeline_flux.py``), except that those download tiny tokenizers and T5 from the hub:
here the CLIP and T5 tokenizers are built in memory over a letters-only vocabulary (transformers 5 tokenizers take
``vocab``/``merges`` directly) and every model comes from a config with seeded random weights.

- ``sd3``: 2 joint blocks, 4 heads x 8, patch 2; block 0 has SD3.5's second, image-only attention (``attn2``)
  and q/k RMSNorm. Pass ``dual_attention_layers=()`` for an SD3.0-shaped model.
- ``flux``: 2 dual-stream + 2 single-stream blocks, 2 heads x 16 (rope axes 4+4+8), 4 packed latent channels.
Both pipelines use a 2-level VAE (``vae_scale_factor`` 2), so a 32x32 image is 8x8 = 64 image tokens.
"""

from __future__ import annotations

import string

import torch
import transformers as tf
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

TRANSFORMER_CONFIGS = {
    "sd3": (
        SD3Transformer2DModel,
        dict(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
    ),
    "flux": (
        FluxTransformer2DModel,
        dict(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
        ),
    ),
}

LETTERS = string.ascii_lowercase
CLIP_MAX_LENGTH = 77


def _builder(family):
    model_cls, config = TRANSFORMER_CONFIGS[family]

    def build(seed: int = 0, dtype=torch.float32, **overrides):
        torch.manual_seed(seed)
        model = model_cls(**{**config, **overrides})
        # `.to()` on a diffusers model warns about dtype casting even when it is a no-op.
        return (model if dtype == torch.float32 else model.to(dtype)).eval()

    return build


BUILDERS = {family: _builder(family) for family in TRANSFORMER_CONFIGS}


# ---- text side ------------------------------------------------------------------------------------------------
def clip_tokenizer() -> tf.CLIPTokenizer:
    """CLIP BPE over single letters (no merges): ``<|startoftext|>`` 0, ``<|endoftext|>`` 1 (also pad)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({letter + suffix: len(vocab) + i for i, letter in enumerate(LETTERS)})
    return tf.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> tf.T5TokenizerFast:
    """T5 unigram over letters and word-initial letters: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no sentinel ids."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(prefix + letter, -3.0) for prefix in ("▁", "") for letter in LETTERS]
    return tf.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_text_encoder(model_cls, seed: int):
    config = tf.CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def t5_encoder(seed: int) -> tf.T5EncoderModel:
    config = tf.T5Config(
        vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8
    )
    torch.manual_seed(seed)
    return tf.T5EncoderModel(config).eval()


def vae(latent_channels: int, seed: int) -> AutoencoderKL:
    """Two resolution levels: ``vae_scale_factor`` = 2 ** (2 - 1) = 2."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def build_pipeline(family: str, seed: int = 0):
    """A complete tiny ``StableDiffusion3Pipeline`` (``"sd3"``) or ``FluxPipeline`` (``"flux"``) on CPU."""
    transformer = BUILDERS[family](seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler()
    if family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae(transformer.config.in_channels, seed),
            text_encoder=clip_text_encoder(tf.CLIPTextModelWithProjection, seed),
            tokenizer=clip_tokenizer(),
            text_encoder_2=clip_text_encoder(tf.CLIPTextModelWithProjection, seed + 1),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5_encoder(seed),
            tokenizer_3=t5_tokenizer(),
        )
    if family == "flux":
        return FluxPipeline(
            transformer=transformer,
            scheduler=scheduler,
            # FluxPipeline packs 2x2 latent patches into the transformer's channels.
            vae=vae(transformer.config.in_channels // 4, seed),
            text_encoder=clip_text_encoder(tf.CLIPTextModel, seed),
            tokenizer=clip_tokenizer(),
            text_encoder_2=t5_encoder(seed),
            tokenizer_2=t5_tokenizer(),
        )
    raise KeyError(f"no tiny pipeline for {family!r}; known: {sorted(BUILDERS)}")


TEXT_LEN = 5
ROWS, COLS = 3, 4


def transformer_inputs(family, model, text_seed=0, image_seed=0):
    """Direct transformer inputs (batch 1) for ``TEXT_LEN`` text tokens and a ``ROWS x COLS`` image-token grid."""
    cfg = model.config
    text = torch.randn(1, TEXT_LEN, cfg.joint_attention_dim, generator=torch.Generator().manual_seed(text_seed))
    image_gen = torch.Generator().manual_seed(image_seed)
    common = dict(
        encoder_hidden_states=text,
        pooled_projections=torch.ones(1, cfg.pooled_projection_dim),
        timestep=torch.tensor([0.5]),
    )
    if family == "sd3":
        latents = torch.randn(1, cfg.in_channels, ROWS * cfg.patch_size, COLS * cfg.patch_size, generator=image_gen)
        return dict(hidden_states=latents, **common)
    packed = torch.randn(1, ROWS * COLS, cfg.in_channels, generator=image_gen)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, ROWS, COLS, "cpu", torch.float32)
    return dict(hidden_states=packed, img_ids=img_ids, txt_ids=torch.zeros(TEXT_LEN, 3), **common)
