"""Tiny random-weight models for trying methods offline; they show the mechanics only, never quality.

Every model is built from a config with seeded random weights, offline, in about a second; every builder returns
fresh objects. The answers and images they give are noise: use them to see what a method runs, records and returns
(``h.stats``, heatmaps, masks, kept tokens), then load a real model the same way you load it today.

    model, tokenizer = nograd.tiny.llm()                      # a 4-layer Llama, character-level tokenizer
    model, processor = nograd.tiny.vlm()                      # LLaVA-1.5 (or family="qwen2_vl", ...) + processor
    pipe = nograd.tiny.sd3()                                  # a complete StableDiffusion3Pipeline (needs diffusers)
    pipe = nograd.tiny.flux()                                 # a complete FluxPipeline (needs diffusers)
    mllm, processor, reasoning, base = nograd.tiny.trio()     # FRANK's homologous trio
    picture = nograd.tiny.image(56, 56)                       # a smooth random RGB PIL image

``build(family, **overrides)`` builds a bare model of any family in ``FAMILIES``. The configs live in the
submodules: ``llms`` (text LLMs), ``vlms`` (VLMs and hand-built batches for them: ``make_inputs`` with images,
``make_video_inputs`` with a video, which the offline processors do not encode), ``vlm_families`` (Qwen3-VL,
InternVL-hf, Mistral3, Gemma3: models, batches and FRANK trios), ``processors`` (their offline processors; no
torchvision) and ``dits`` (MM-DiTs and their pipelines; needs diffusers).
"""

from __future__ import annotations

import importlib

import torch

LABEL = "built-in tiny model (random weights): shows the mechanics only, not the quality of any method"
VLM_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm",
                "qwen3_vl", "internvl", "mistral3", "gemma3")
"""The VLM families ``vlm()`` builds with a processor."""


def _kinds() -> dict:
    from . import llms, vlms

    kinds = {"text": llms, "vlm": vlms}
    try:  # the DiTs need diffusers (the [diffusers] extra)
        kinds["dit"] = importlib.import_module(f"{__name__}.dits")
    except ImportError:
        pass
    return kinds


def __getattr__(name: str):
    """``KINDS`` (kind -> module), ``BUILDERS`` (family -> builder), ``FAMILIES`` (family -> kind), built on first
    use so that ``import nograd.tiny`` stays cheap."""
    if name == "KINDS":
        value = _kinds()
    elif name == "BUILDERS":
        value = {family: build for module in _kinds().values() for family, build in module.BUILDERS.items()}
    elif name == "FAMILIES":
        value = {family: kind for kind, module in _kinds().items() for family in module.BUILDERS}
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def build(family: str, *, seed: int = 0, **overrides):
    """A bare tiny ``family`` model with weights drawn from ``torch.manual_seed(seed)``, in eval mode."""
    builders = __getattr__("BUILDERS")
    if family not in builders:
        raise KeyError(f"no tiny builder for {family!r}; known: {sorted(builders)}")
    return builders[family](seed=seed, **overrides)


def llm(seed: int = 0, layers: int = 4, family: str = "llama"):
    """(model, tokenizer): a tiny ``family`` LLM (hidden 64, 4 heads, 2 KV heads) over the character-level
    tokenizer of ``processors`` (one token per character), with the VLMs' vocabulary so that it pairs with them."""
    from . import llms, processors, vlms

    if family not in llms.BUILDERS:
        raise KeyError(f"no tiny LLM for {family!r}; known: {', '.join(llms.BUILDERS)}")
    model = llms.BUILDERS[family](seed=seed, num_hidden_layers=layers,  # sdpa where the family has it
                                  vocab_size=vlms.TEXT["vocab_size"], max_position_embeddings=512)
    return model, processors.tokenizer()


def vlm(family: str = "llava", seed: int = 0, layers: int = 8):
    """(model, processor): a tiny VLM of ``family`` (one of ``VLM_FAMILIES``; a 2-layer vision tower, 28x28 tiles
    of 7x7 patches, a ``layers``-layer decoder) and its offline processor, whose image-token counts are the model's
    own. Prompts put the image where ``<image>`` stands (Qwen: ``<|vision_start|><|image_pad|><|vision_end|>``), or
    use ``processor.apply_chat_template``."""
    from . import processors

    if family not in VLM_FAMILIES:
        raise KeyError(f"no tiny VLM with a processor for {family!r}; known: {', '.join(VLM_FAMILIES)}")
    return vlm_model(family, seed=seed, layers=layers), processors.PROCESSORS[family]()


def vlm_model(family: str, seed: int = 0, layers: int = 8, attn_implementation: str = "sdpa"):
    """The model of ``vlm(family)`` alone, in any attention implementation."""
    from . import vlm_families, vlms

    if family in vlm_families.FAMILIES:
        return vlm_families.build(family, seed=seed, attn_implementation=attn_implementation, text_layers=layers)
    return vlms.BUILDERS[family](seed=seed, attn_implementation=attn_implementation, text_layers=layers)


def sd3(seed: int = 0):
    """A complete tiny ``StableDiffusion3Pipeline`` on CPU: 2 joint blocks of 4 heads (SD3.5-shaped), a 2-level VAE
    (a 32x32 image is 8x8 = 64 image tokens), CLIP and T5 encoders over letter-level tokenizers. Needs diffusers."""
    from . import dits

    return dits.build_pipeline("sd3", seed=seed)


def flux(seed: int = 0):
    """A complete tiny ``FluxPipeline`` on CPU: 2 dual-stream and 2 single-stream blocks of 2 heads. Needs
    diffusers."""
    from . import dits

    return dits.build_pipeline("flux", seed=seed)


def trio(seed: int = 0, layers: int = 8):
    """FRANK's trio, tiny and homologous: ``(mllm, processor, reasoning, base)``: a LLaVA whose decoder starts as
    the base Llama, a reasoning Llama from another seed, and the base."""
    base, _ = llm(seed=seed, layers=layers)
    mllm, processor = vlm(seed=seed, layers=layers)
    mllm.model.language_model.load_state_dict(base.model.state_dict())
    reasoning, _ = llm(seed=seed + 1, layers=layers)
    return mllm, processor, reasoning, base


def image(width: int = 56, height: int = 56, seed: int = 0):
    """A smooth random RGB PIL image of ``width`` x ``height``."""
    from PIL import Image

    low = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed))
    pixels = torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear", align_corners=False)
    return Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


__all__ = ["LABEL", "VLM_FAMILIES", "build", "flux", "image", "llm", "sd3", "trio", "vlm", "vlm_model"]
