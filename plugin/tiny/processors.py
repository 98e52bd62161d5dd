"""Processors for the tiny VLMs, built offline: a character-level tokenizer whose ids fit the tiny vocabularies
(characters 4..149, the image and vision tokens of ``nograd.tiny.vlms``), a one-turn chat template, and the family's PIL
image processor. LLaVA gets the real ``LlavaProcessor``, LLaVA-NeXT the real ``LlavaNextProcessor``; Qwen2-VL / 2.5-VL
the real ``Qwen2VLProcessor`` and LLaVA-OneVision the real ``LlavaOnevisionProcessor``, both without their video
processor (``NoVideo``, ``OnevisionProcessor``: the video processor needs torchvision, and ``ProcessorMixin`` rejects
``None`` for it; images never touch it). All with their PIL image processors at the tiny models' sizes
(``nograd.tiny.vlms``: 28x28 tiles of 7x7 patches, ``PINPOINTS``), so their image-token counts are the models' own.
Idefics3 and SmolVLM get the real ``Idefics3Processor`` with its PIL image processor.

Qwen3-VL, Gemma3, Mistral3 and InternVL-hf get their real processors (``Qwen3VLProcessor`` and ``InternVLProcessor``
without a video processor, the ``NoVideo`` mixin; ``Gemma3Processor``; ``PixtralProcessor``, whose module needs a
stand-in for a torchvision import) with PIL image processors, at the sizes of the tiny models of those families
(``nograd.tiny.vlm_families``): their special tokens take its ids ``BEGIN`` and ``END``.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (CLIPImageProcessorPil, Gemma3Processor, Idefics3Processor, InternVLProcessor,
                          LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaOnevisionImageProcessorPil,
                          LlavaOnevisionProcessor, LlavaProcessor, PreTrainedTokenizerFast, Qwen2VLProcessor,
                          Qwen3VLProcessor)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .vlm_families import BEGIN, END
from .vlms import FAKE, GLOBAL, IMAGE, PINPOINTS, ROW_COL_TAGS, VIDEO, VISION_END, VISION_START

CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,?!:'-"
LETTERS = "".join(map(chr, range(0x410, 0x450))) + "".join(map(chr, range(0x3B1, 0x3BD)))
"""Cyrillic and Greek letters for ids 74..149 (up to the image token): every id a tiny model generates below the
special tokens decodes to a character, so a random model's answer is never empty."""
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}{{ image }}"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
QWEN_TEMPLATE = TEMPLATE.replace("{{ image }}", "<|vision_start|><|image_pad|><|vision_end|>")


def tokenizer(special: dict[str, int] | None = None, **named: str) -> PreTrainedTokenizerFast:
    """One token per character of ``CHARS`` (ids 4..73) and ``LETTERS`` (74..149), pad 0, BOS 1, EOS 2, unk 3, and
    the ``special`` tokens; left padding, and decoding joins the characters back into the text. ``named``: model
    specific token attributes (``image_token="<image>"`` gives ``tokenizer.image_token`` and ``.image_token_id``)."""
    special = special or {}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS + LETTERS)},
             **special}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left", **named)
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


class NoVideo:
    """Mixin for a real processor built without its video processor: ``ProcessorMixin`` checks each sub-processor's
    class, and looking up the video processor's class fails without torchvision; images never use it."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def __call__(self, *args, videos=None, **kwargs):
        refuse_videos(self, videos)
        return super().__call__(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Refused before writing anything: the real class would reload it with a video processor (which needs
        torchvision), and ``ProcessorMixin`` fails on the missing one after writing the tokenizer alone."""
        raise NotImplementedError(f"the tiny {type(self).__name__} has no video processor and cannot be saved as a "
                                  "processor; save its image_processor and tokenizer, or use a tiny LLaVA / "
                                  "LLaVA-NeXT / Idefics3 processor, which save and reload")


def refuse_videos(processor, videos) -> None:
    """The offline processors encode images only: ``videos=`` raises, naming how to build video inputs instead."""
    if videos is not None:
        raise NotImplementedError(f"the tiny {type(processor).__name__} encodes images only (a video processor needs "
                                  "torchvision); build video inputs with nograd.tiny.vlms.make_video_inputs")


class OnevisionProcessor(NoVideo, LlavaOnevisionProcessor):
    """The real ``LlavaOnevisionProcessor`` with no video processor."""


def llava_onevision_processor() -> OnevisionProcessor:
    """The tiny LLaVA-OneVision (SigLIP tower without CLS, strategy "full", 16 tokens per tile,
    ``vision_aspect_ratio="anyres_max_1"`` as ``nograd.tiny.vlms`` configures it: a crop raster above 1.1 x 16 tokens is
    shrunk). A single-image prompt is split into crops, each image of a multi-image prompt is left unsplit."""
    images = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
    return OnevisionProcessor(image_processor=images, tokenizer=tokenizer({"<image>": IMAGE, "<video>": VIDEO}),
                              video_processor=None, num_image_tokens=16, vision_feature_select_strategy="full",
                              vision_aspect_ratio="anyres_max_1", image_token="<image>", video_token="<video>",
                              chat_template=TEMPLATE.replace("{{ image }}", "<image>"))


class Qwen2VLImagesProcessor(NoVideo, Qwen2VLProcessor):
    """The real ``Qwen2VLProcessor`` with no video processor."""


def qwen2_vl_processor() -> Qwen2VLImagesProcessor:
    """The tiny Qwen2-VL / 2.5-VL (7x7 patches, merge 2): the real processor with Qwen2-VL's PIL image processor,
    ``smart_resize`` to multiples of 14 between 4 and 64 merged tokens, ``<|image_pad|>`` per merged token between
    ``<|vision_start|>`` and ``<|vision_end|>``, and ``mm_token_type_ids``."""
    return Qwen2VLImagesProcessor(image_processor=qwen_image_processor(), tokenizer=qwen_tokenizer(),
                                  video_processor=None, chat_template=QWEN_TEMPLATE)


def idefics3_processor() -> Idefics3Processor:
    """The real ``Idefics3Processor`` at the tiny models' sizes: the longest edge resized to 56, split into up to 2 x 2
    crops of 28 plus the global image, 4 image tokens per tile (``image_seq_len``); the tags ``<row_r_col_c>`` of a
    2 x 2 split take the vocabulary's last ids. SmolVLM writes images the same way (its own processor needs
    torchvision for its video processor), so the tiny SmolVLM uses this one too."""
    tags = {f"<row_{r}_col_{c}>": ROW_COL_TAGS + 2 * (r - 1) + (c - 1) for r in (1, 2) for c in (1, 2)}
    images = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
    # <end_of_utterance>, which the processor adds when missing, gets an id Idefics3 leaves unused (Qwen's vision end):
    # added, it took the first free id, another after a reload (a tag's: save_pretrained gave other input_ids)
    tokens = tokenizer({"<image>": IMAGE, "<fake_token_around_image>": FAKE, "<global-img>": GLOBAL, **tags,
                        "<end_of_utterance>": VISION_END})
    return Idefics3Processor(image_processor=images, tokenizer=tokens, image_seq_len=4,
                             chat_template=TEMPLATE.replace("{{ image }}", "<image>"))


# ---- Qwen3-VL, Gemma3, Mistral3, InternVL-hf (the tiny models of tests/tiny/vlm_families.py) --------------------


class Qwen3VLImagesProcessor(NoVideo, Qwen3VLProcessor):
    """The real ``Qwen3VLProcessor`` with no video processor."""


def qwen3_vl_processor() -> Qwen3VLImagesProcessor:
    """The tiny Qwen3-VL: as ``qwen2_vl_processor`` (Qwen2-VL's PIL image processor is Qwen3-VL's own image
    processor class)."""
    return Qwen3VLImagesProcessor(image_processor=qwen_image_processor(), tokenizer=qwen_tokenizer(),
                                  video_processor=None, chat_template=QWEN_TEMPLATE)


def qwen_image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=7, merge_size=2, temporal_patch_size=2, min_pixels=14 * 14 * 4,
                                    max_pixels=14 * 14 * 64)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return tokenizer({"<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO, "<|vision_start|>": VISION_START,
                      "<|vision_end|>": VISION_END})


def gemma3_processor() -> Gemma3Processor:
    """The real ``Gemma3Processor``: every image stretched to 28x28 (``Gemma3ImageProcessorPil``, pan-and-scan off)
    and written ``<start_of_image>`` + 4 ``<image_soft_token>`` + ``<end_of_image>`` (``mm_tokens_per_image``)."""
    tokens = tokenizer({"<image_soft_token>": IMAGE, "<start_of_image>": BEGIN, "<end_of_image>": END},
                       boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
                           tokenizer=tokens, image_seq_length=4,
                           chat_template=TEMPLATE.replace("{{ image }}", "<start_of_image>"))


def _pixtral_processor_class():
    """``PixtralProcessor``: its module imports a helper from the torchvision image processor module, which fails
    without torchvision; the PIL module holds the same helper, put in its place when that import fails."""
    import importlib
    import sys
    import types

    from transformers.models.pixtral import image_processing_pil_pixtral

    name = "transformers.models.pixtral.image_processing_pixtral"
    try:
        importlib.import_module(name)
    except ImportError:
        stub = types.ModuleType(name)
        stub.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        sys.modules[name] = stub
    return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor


def mistral3_processor():
    """The real ``PixtralProcessor`` (Mistral3's) with ``PixtralImageProcessorPil``: the longest edge shrunk to at
    most 28 keeping the aspect, each side rounded up to a multiple of 14 (patch 7 x merge 2); per row of tokens
    ``[IMG]`` x cols + ``[IMG_BREAK]``, the last row ending in ``[IMG_END]``."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokens = tokenizer({"[IMG]": IMAGE, "[IMG_BREAK]": BEGIN, "[IMG_END]": END})
    images = PixtralImageProcessorPil(size={"longest_edge": 28}, patch_size={"height": 7, "width": 7})
    return _pixtral_processor_class()(image_processor=images, tokenizer=tokens, patch_size=7, spatial_merge_size=2,
                                      chat_template=TEMPLATE.replace("{{ image }}", "[IMG]"))


class InternVLImagesProcessor(NoVideo, InternVLProcessor):
    """The real ``InternVLProcessor`` with no video processor."""


def internvl_processor() -> InternVLImagesProcessor:
    """The real ``InternVLProcessor`` with ``GotOcr2ImageProcessorPil`` at the tiny model's sizes: ``crop_to_patches``
    into R x C tiles of 28x28 (1 to 4 tiles; R x C from ``get_optimal_tiled_canvas``) plus a thumbnail when split,
    4 ``<IMG_CONTEXT>`` tokens per tile (``image_seq_length``) between ``<img>`` and ``</img>``."""
    tokens = tokenizer({"<IMG_CONTEXT>": IMAGE, "<video>": VIDEO, "<img>": BEGIN, "</img>": END},
                       start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                       video_token="<video>")
    images = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    return InternVLImagesProcessor(image_processor=images, tokenizer=tokens, video_processor=None,
                                   image_seq_length=4, chat_template=TEMPLATE.replace("{{ image }}", "<IMG_CONTEXT>"))


PROCESSORS = {"llava": llava_processor, "llava_next": llava_next_processor,
              "llava_onevision": llava_onevision_processor, "qwen2_vl": qwen2_vl_processor,
              "qwen2_5_vl": qwen2_vl_processor,
              "idefics3": idefics3_processor, "smolvlm": idefics3_processor,
              "qwen3_vl": qwen3_vl_processor, "gemma3": gemma3_processor, "mistral3": mistral3_processor,
              "internvl": internvl_processor}


def image(width: int, height: int, seed: int = 0):
    """A random RGB PIL image."""
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())
