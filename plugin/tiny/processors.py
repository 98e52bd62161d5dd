"""Processors for the tiny VLMs, built offline: a character-level tokenizer whose ids fit the tiny vocabularies
(characters 4..149, the image and vision tokens of ``nograd.tiny.vlms``), a one-turn chat template, and the family's PIL image
processor. LLaVA gets the real ``LlavaProcessor``; Qwen2-VL's own processor needs torchvision (its video processor),
so ``QwenProcessor`` does what it does for images: ``<|image_pad|>`` repeated per merged patch, ``mm_token_type_ids``.
LLaVA-NeXT gets the real ``LlavaNextProcessor``; LLaVA-OneVision the real ``LlavaOnevisionProcessor`` without its video
processor (``OnevisionProcessor``: the video processor needs torchvision, and ``ProcessorMixin`` rejects ``None`` for
it; images never touch it). Both with their PIL image processors at the tiny models' sizes (``nograd.tiny.vlms``: 28x28
tiles of 7x7 patches, ``PINPOINTS``), so their image-token counts are the models' own. Idefics3 and SmolVLM get
the real ``Idefics3Processor`` with its PIL image processor.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (BatchFeature, CLIPImageProcessorPil, Idefics3Processor, LlavaNextImageProcessorPil,
                          LlavaNextProcessor, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, LlavaProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .vlms import FAKE, GLOBAL, IMAGE, PINPOINTS, ROW_COL_TAGS, VIDEO, VISION_END, VISION_START

CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,?!:'-"
LETTERS = "".join(map(chr, range(0x410, 0x450))) + "".join(map(chr, range(0x3B1, 0x3BD)))
"""Cyrillic and Greek letters for ids 74..149 (up to the image token): every id a tiny model generates below the
special tokens decodes to a character, so a random model's answer is never empty."""
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}{{ image }}"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


def tokenizer(special: dict[str, int] | None = None) -> PreTrainedTokenizerFast:
    """One token per character of ``CHARS`` (ids 4..73) and ``LETTERS`` (74..149), pad 0, BOS 1, EOS 2, unk 3, and
    the ``special`` tokens; left padding, and decoding joins the characters back into the text."""
    special = special or {}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS + LETTERS)},
             **special}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def llava_processor() -> LlavaProcessor:
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer({"<image>": IMAGE}), patch_size=7,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=TEMPLATE.replace("{{ image }}", "<image>"), image_token="<image>")


def llava_next_processor() -> LlavaNextProcessor:
    """The tiny LLaVA-NeXT (CLIP tower with a CLS, strategy "default"): per image the 4x4 base tile and the crops of
    the best pinpoint, unpadded, one newline per raster row."""
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer({"<image>": IMAGE}), patch_size=7,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=TEMPLATE.replace("{{ image }}", "<image>"), image_token="<image>")


class OnevisionProcessor(LlavaOnevisionProcessor):
    """The real ``LlavaOnevisionProcessor`` with no video processor: ``ProcessorMixin`` checks each sub-processor's
    class, and looking up the video processor's class fails without torchvision; images never use it."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def llava_onevision_processor() -> OnevisionProcessor:
    """The tiny LLaVA-OneVision (SigLIP tower without CLS, strategy "full", 16 tokens per tile,
    ``vision_aspect_ratio="anyres_max_1"`` as ``nograd.tiny.vlms`` configures it: a crop raster above 1.1 x 16 tokens is
    shrunk). A single-image prompt is split into crops, each image of a multi-image prompt is left unsplit."""
    images = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
    return OnevisionProcessor(image_processor=images, tokenizer=tokenizer({"<image>": IMAGE, "<video>": VIDEO}),
                              video_processor=None, num_image_tokens=16, vision_feature_select_strategy="full",
                              vision_aspect_ratio="anyres_max_1", image_token="<image>", video_token="<video>",
                              chat_template=TEMPLATE.replace("{{ image }}", "<image>"))


class QwenProcessor:
    """Qwen2-VL's processor for images only (no torchvision): the same token expansion and outputs."""

    def __init__(self):
        self.tokenizer = tokenizer({"<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO, "<|vision_start|>": VISION_START,
                                    "<|vision_end|>": VISION_END})
        self.image_processor = Qwen2VLImageProcessorPil(patch_size=7, merge_size=2, temporal_patch_size=2,
                                                        min_pixels=14 * 14 * 4, max_pixels=14 * 14 * 64)
        self.chat_template = TEMPLATE.replace("{{ image }}", "<|vision_start|><|image_pad|><|vision_end|>")

    def apply_chat_template(self, conversation, add_generation_prompt=True, tokenize=False, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text, images=None, padding=False, return_tensors="pt", **kwargs):
        text = [text] if isinstance(text, str) else list(text)
        features = self.image_processor(images=images, return_tensors="pt") if images else {}
        counts = iter((features["image_grid_thw"].prod(-1) // 4).tolist() if images else [])
        expanded = []
        for prompt in text:
            while "<|image_pad|>" in prompt:
                prompt = prompt.replace("<|image_pad|>", "<|placeholder|>" * next(counts), 1)
            expanded.append(prompt.replace("<|placeholder|>", "<|image_pad|>"))
        encoded = self.tokenizer(expanded, padding=padding, return_tensors="pt")
        out = {**encoded, **features, "mm_token_type_ids": (encoded["input_ids"] == IMAGE).int()}
        return BatchFeature(out)

    def batch_decode(self, tokens, **kwargs):
        return self.tokenizer.batch_decode(tokens, **kwargs)


def idefics3_processor() -> Idefics3Processor:
    """The real ``Idefics3Processor`` at the tiny models' sizes: the longest edge resized to 56, split into up to 2 x 2
    crops of 28 plus the global image, 4 image tokens per tile (``image_seq_len``); the tags ``<row_r_col_c>`` of a
    2 x 2 split take the vocabulary's last ids. SmolVLM writes images the same way (its own processor needs
    torchvision for its video processor), so the tiny SmolVLM uses this one too."""
    tags = {f"<row_{r}_col_{c}>": ROW_COL_TAGS + 2 * (r - 1) + (c - 1) for r in (1, 2) for c in (1, 2)}
    images = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
    tokens = tokenizer({"<image>": IMAGE, "<fake_token_around_image>": FAKE, "<global-img>": GLOBAL, **tags})
    return Idefics3Processor(image_processor=images, tokenizer=tokens, image_seq_len=4,
                             chat_template=TEMPLATE.replace("{{ image }}", "<image>"))


PROCESSORS = {"llava": llava_processor, "llava_next": llava_next_processor,
              "llava_onevision": llava_onevision_processor, "qwen2_vl": QwenProcessor, "qwen2_5_vl": QwenProcessor,
              "idefics3": idefics3_processor, "smolvlm": idefics3_processor}


def image(width: int, height: int, seed: int = 0):
    """A random RGB PIL image."""
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())
