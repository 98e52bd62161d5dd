"""Tiny Qwen3-VL, InternVL-hf, Mistral3 and Gemma3: they live in ``nograd.tiny.vlm_families``."""

from nograd.tiny.vlm_families import *  # noqa: F401,F403
