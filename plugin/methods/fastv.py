"""FastV: drop half the visual tokens after layer 2 (Chen et al., ECCV 2024, arXiv 2403.06764).

Official code ``pkunlp-icler/FastV`` (the ``FASTV_INPLACE`` path of its ``modeling_llama.py``; spec
``pyramiddrop.md`` §4): before layer ``K`` (``AGG_LAYER``, 2), the image tokens are ranked by the attention the last
token gives them in layer ``K - 1`` (its ``output_attentions``, averaged over heads), and only the top ones go on to
layers ``K..L-1``; the paper drops R = 50 %. It is PyramidDrop's one-stage case, scored with the layer before the
boundary instead of the one after, on the same engine (``token_drop.py``): physical removal, so FLOPs and the KV
cache shrink (the official default path only masks). Kept count: ``floor(N * keep)`` (the official code takes an
absolute ``ATTENTION_RANK``, or ``round`` in later ports).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, is_int, is_number, option
from ..registry import register
from .drop_schedule import DropSchedule
from .pyramiddrop import BACKENDS, check_min_keep
from .token_drop import POSITIONS, TokenDropMethod


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    layer: int = option(2, "K: the first decoder layer that sees fewer visual tokens (official AGG_LAYER 2)")
    keep: float = option(0.5, "fraction of the visual tokens kept, 1 - R (official R = 50%)")
    positions: str = option("original", "RoPE positions of the kept tokens: their own ('original') or renumbered "
                                        "('compact'; 1-D RoPE only)", choices=POSITIONS)
    min_keep: int = option(1, "at least this many visual tokens stay")
    include_video: bool = option(True, "drop video tokens too, ranked with the image tokens of their row "
                                       "(spec §5.3; Qwen2/2.5/3-VL, LLaVA-OneVision)", choices=(True, False))
    backend: str = option("auto", "kernel of the ranking row (nograd.kernels.attention_rows)", choices=BACKENDS)

    def validate(self) -> None:
        if not (is_int(self.layer) and self.layer >= 1):
            self.invalid("layer", "an int >= 1 (layer K - 1 scores the tokens)")
        if not (is_number(self.keep) and 0 < self.keep <= 1):
            self.invalid("keep", "a fraction in (0, 1]")
        check_min_keep(self)


@register
class FastV(TokenDropMethod):
    name = "fastv"
    summary = "drop the least-attended visual tokens once, after layer K (PyramidDrop's one-stage case)"
    paper = ("An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large "
             "Vision-Language Models")
    arxiv = "2403.06764"
    Config = FastVConfig
    scores_with_previous_layer = True

    def boundary_option(self) -> str:
        return "layer"

    def schedule(self) -> DropSchedule:
        depth = self.adapter.num_layers
        if self.config.layer >= depth:
            self.config.invalid("layer", f"a decoder layer in 1..{depth - 1}")
        return DropSchedule.one_stage(depth, self.config.layer, self.config.keep, min_keep=self.config.min_keep)
