"""A homologous trio for FRANK and the merge: base = a tiny Qwen2; the MLLM = a tiny Qwen2.5-VL whose language model
is the base plus 0.01 noise; the reasoning LLM = the base plus 0.02 noise (spec ``frank.md`` §5.7)."""

from __future__ import annotations

from nograd.tiny.vlm_families import homologous

from . import build


def make_trio(layers: int, **text_overrides):
    """(mllm, reasoning, base) with ``layers`` decoder layers; ``text_overrides`` go to the base's text config."""
    base = build("qwen2", vocab_size=160, num_hidden_layers=layers, max_position_embeddings=512, rms_norm_eps=1e-5,
                 **text_overrides)
    return homologous(build("qwen2_5_vl", text_layers=layers), base)
