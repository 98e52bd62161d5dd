"""PyramidDrop: staged visual-token dropping in the LLM of a VLM (Xing et al., arXiv 2410.17247; CVPR 2025 as ViCo).

Official code ``Cooperx521/PyramidDrop`` (spec ``pyramiddrop.md`` §1, §3): the decoder is split into S stages at
``layer_list``; at each boundary the visual tokens are ranked by the attention of the last instruction token, with
the next layer's norm, Q/K and RoPE (``pdrop_rank_drop``: ``rank_layer = layer_idx + 1``), and the top
``floor(N * r_s)`` of the *original* N are kept. Official defaults (every ``scripts/v1_5|v1_6/pdrop_eval/*.sh``):
``layer_list=[8, 16, 24]``, ``image_token_ratio_list=[0.5, 0.25, 0.125]`` on 32 layers, i.e. S = 4 stages, lambda
= 0.5, here scaled to the model's depth. The official code renumbers positions after a drop (``positions=
"compact"``); the default keeps each token's own position (``"original"``, spec A1: the only mode defined for
Qwen2-VL's M-RoPE). ``tokens=`` solves the keep ratios for a mean visual-token budget per layer, with boundaries
[2, 10, 20] of 32 and halving after the first drop (spec §1.5, A6). The engine is ``token_drop.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..config import MethodConfig, is_int, is_number, option
from ..registry import register
from .drop_schedule import DropSchedule
from .token_drop import POSITIONS, TokenDropMethod

BACKENDS = ("auto", "triton", "torch")


def check_int_list(config: MethodConfig, name: str) -> None:
    value = getattr(config, name)
    if value is not None and not (isinstance(value, (list, tuple)) and value
                                  and all(is_int(v) for v in value)):
        config.invalid(name, "None or a non-empty list of layer indices")


def check_fractions(config: MethodConfig, name: str) -> None:
    value = getattr(config, name)
    if value is not None and not (isinstance(value, (list, tuple)) and value
                                  and all(is_number(v) and 0 < v <= 1 for v in value)):
        config.invalid(name, "None or a non-empty list of fractions in (0, 1]")


def check_min_keep(config: MethodConfig) -> None:
    if not (is_int(config.min_keep) and config.min_keep >= 0):
        config.invalid("min_keep", "an int >= 0 (spec A5: the official floor can reach 0 tokens)")


@dataclass(frozen=True)
class PyramidDropConfig(MethodConfig):
    boundaries: object = option(None, "0-based first layer of each later stage; None = the layers split evenly into "
                                      "`stages` (official [8, 16, 24] of 32)")
    keep: object = option(None, "fraction of the original visual tokens kept from each boundary on; None = "
                                "ratio**s (official [0.5, 0.25, 0.125])")
    stages: int = option(4, "S, the number of stages when boundaries is None (official 4)")
    ratio: float = option(0.5, "lambda, the keep ratio per stage when keep is None (official 0.5)")
    tokens: object = option(None, "a budget instead of keep: the mean visual tokens per layer, solved per image "
                                  "count (boundaries default to [2, 10, 20] of 32)")
    positions: str = option("original", "RoPE positions of the kept tokens: their own ('original') or renumbered "
                                        "('compact', the official code; 1-D RoPE only)", choices=POSITIONS)
    min_keep: int = option(1, "at least this many visual tokens stay per stage (spec A5)")
    include_video: bool = option(True, "drop video tokens too, ranked with the image tokens of their row "
                                       "(spec §5.3; Qwen2/2.5/3-VL, LLaVA-OneVision)", choices=(True, False))
    backend: str = option("auto", "kernel of the ranking row (nograd.kernels.attention_rows)", choices=BACKENDS)

    def validate(self) -> None:
        check_int_list(self, "boundaries")
        check_fractions(self, "keep")
        check_min_keep(self)
        if not (is_int(self.stages) and self.stages >= 1):
            self.invalid("stages", "an int >= 1")
        if not (is_number(self.ratio) and 0 < self.ratio <= 1):
            self.invalid("ratio", "a number in (0, 1]")
        if self.tokens is not None:
            if self.keep is not None:
                self.invalid("tokens", "None when keep is given (a budget solves keep)")
            if not (is_number(self.tokens) and self.tokens > 0):
                self.invalid("tokens", "None or a number > 0 of visual tokens")
        if self.keep is not None and self.boundaries is not None and len(self.keep) != len(self.boundaries):
            self.invalid("keep", f"one fraction per boundary ({len(self.boundaries)})")


@register
class PyramidDrop(TokenDropMethod):
    name = "pyramiddrop"
    summary = "drop the least-attended visual tokens in stages inside the LLM (faster prefill and decoding)"
    paper = "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
    arxiv = "2410.17247"
    Config = PyramidDropConfig

    def schedule(self) -> DropSchedule:
        c, depth = self.config, self.adapter.num_layers
        try:
            if c.tokens is not None:  # the boundaries only (a whole-image budget); keep is solved per row
                return DropSchedule.for_budget(depth, 1, 1, boundaries=c.boundaries, min_keep=c.min_keep)
            if c.boundaries is None:
                plan = DropSchedule.even(depth, c.stages, c.ratio, c.min_keep)
                return plan if c.keep is None else DropSchedule(depth, plan.boundaries, tuple(c.keep), c.min_keep)
            keep = c.keep if c.keep is not None else [c.ratio ** (s + 1) for s in range(len(c.boundaries))]
            return DropSchedule(depth, tuple(c.boundaries), tuple(keep), c.min_keep)
        except ValueError as error:
            name = "boundaries" if "boundar" in str(error) else "keep" if c.keep is not None else "stages"
            c.invalid(name, f"a schedule valid for {depth} decoder layers ({error})")

    def boundary_option(self) -> str:
        c = self.config
        return "stages" if c.boundaries is None and c.tokens is None else "boundaries"

    def check_model(self) -> None:
        """Also: a ``tokens`` budget that a one-image row cannot reach, where the model fixes the tokens of an image
        (LLaVA-1.5, Gemma3), is refused here, not at the first forward."""
        super().check_model()
        per_image = getattr(self.adapter, "tokens_per_image", None)
        if self.config.tokens is not None and per_image:
            self.budget_schedule(per_image, self.schedule().boundaries, "one image")

    def row_schedule(self, n_visual: int) -> DropSchedule:
        if self.config.tokens is None:
            return self.plan
        return self.budget_schedule(n_visual, self.plan.boundaries, "a row")

    def budget_schedule(self, n_visual: int, boundaries: tuple, what: str) -> DropSchedule:
        """The ``tokens`` budget's schedule for ``n_visual`` visual tokens; ``ValueError`` naming the option where
        no schedule reaches it (``what``: whose tokens, for the message)."""
        try:
            return _budget(self.adapter.num_layers, n_visual, float(self.config.tokens), tuple(boundaries),
                           self.config.min_keep)
        except ValueError as error:  # the budget these tokens cannot reach, named as the user's option
            raise ValueError(f"{self.name}: option {str(error).removeprefix('DropSchedule: ')} ({what} of "
                             f"{n_visual} visual tokens)") from None


@lru_cache(maxsize=256)
def _budget(depth: int, n_visual: int, tokens: float, boundaries: tuple, min_keep: int) -> DropSchedule:
    """The budget schedule of a row with ``n_visual`` tokens (no drop when the budget is the whole image)."""
    if n_visual == 0 or tokens >= n_visual:
        return DropSchedule(depth, boundaries, (1.0,) * len(boundaries), min_keep)
    return DropSchedule.for_budget(depth, n_visual, tokens, boundaries=list(boundaries), min_keep=min_keep)
