"""Built-in tiny models for the demo: built from configs with seeded random weights, offline, in a second.

They show the *mechanics* of each method (what runs, what is recorded, what the heatmaps and masks look like), not
its quality: the weights are random, so the answers and images are noise. Every builder returns fresh objects.

- ``vlm()``: a LLaVA-1.5 (2-layer CLIP tower, 28x28 images of 7x7 patches = 16 image tokens, 8-layer Llama decoder)
  and its real ``LlavaProcessor`` over a character-level tokenizer.
- ``llm()``: a 4-layer Llama over the same character-level tokenizer.
- ``sd3_pipeline()``: a complete ``StableDiffusion3Pipeline`` (2 joint blocks, 2-level VAE, CLIP/T5 encoders and
  letter-level tokenizers); needs diffusers.
"""

from __future__ import annotations

import string

import torch
import transformers as tf

LABEL = "built-in tiny model (random weights): shows the mechanics only, not the quality of any method"
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,?!:'-"
PAD, BOS, EOS, IMAGE = 0, 1, 2, 4 + len(CHARS)
VOCAB = IMAGE + 2  # the characters, the image token and one spare id: every answer decodes to text
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=7)
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


def tokenizer(special: dict[str, int] | None = None) -> tf.PreTrainedTokenizerFast:
    """One token per character of ``CHARS`` (ids 4..), pad 0, BOS 1, EOS 2, unk 3, and ``special`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    special = special or {}
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS)}, **special}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", padding_side="left")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def vlm(seed: int = 0, layers: int = 8):
    """(LlavaForConditionalGeneration, LlavaProcessor), both tiny and offline."""
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION),
                            text_config=tf.LlamaConfig(**TEXT, num_hidden_layers=layers),
                            image_token_index=IMAGE, image_seq_length=16)
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer({"<image>": IMAGE}), patch_size=7,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=TEMPLATE, image_token="<image>")
    return model, processor


def llm(seed: int = 0, layers: int = 4):
    """(LlamaForCausalLM, tokenizer), both tiny and offline."""
    config = tf.LlamaConfig(**TEXT, num_hidden_layers=layers)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval(), tokenizer()


def sd3_pipeline(seed: int = 0):
    """A complete tiny ``StableDiffusion3Pipeline`` on CPU (diffusers' own test sizes, letters-only tokenizers)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline

    letters = string.ascii_lowercase
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        clip_vocab.update({letter + suffix: len(clip_vocab) + i for i, letter in enumerate(letters)})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(prefix + letter, -3.0) for prefix in ("\u2581", "") for letter in letters]

    def clip():
        torch.manual_seed(seed)
        config = tf.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, projection_dim=32, max_position_embeddings=77,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return tf.CLIPTextModelWithProjection(config).eval(), tf.CLIPTokenizer(vocab=clip_vocab, merges=[],
                                                                               model_max_length=77)

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=32, qk_norm="rms_norm").eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    (encoder, tok), (encoder_2, tok_2) = clip(), clip()
    torch.manual_seed(seed)
    t5 = tf.T5EncoderModel(tf.T5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                       relative_attention_num_buckets=8)).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
        tokenizer=tok, text_encoder_2=encoder_2, tokenizer_2=tok_2, text_encoder_3=t5,
        tokenizer_3=tf.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512))


def image(width: int = 56, height: int = 56, seed: int = 0):
    """A smooth random RGB PIL image (the demo's example picture)."""
    from PIL import Image

    low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed))
    pixels = torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear", align_corners=False)
    return Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
