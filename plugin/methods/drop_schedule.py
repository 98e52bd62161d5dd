"""The stage schedule and cost counters of PyramidDrop (Xing et al., arXiv 2410.17247) and FastV (arXiv 2403.06764).

Spec ``pyramiddrop.md`` §1.1: the decoder is split into stages at 0-based ``boundaries`` (the first layer of each
later stage); from boundary s on, a row keeps ``floor(N * r_s)`` of its *original* N visual tokens (official
``int(cur_image_token * ratio_list[stage + 1])``), at least ``min_keep`` of them (spec A5). Official defaults on
32 layers: ``layer_list=[8, 16, 24]``, ``image_token_ratio_list=[0.5, 0.25, 0.125]``. FastV is the one-stage case
(layer 2, keep 0.5). A budget (spec §1.5, A6) fixes the mean visual tokens per layer instead, with boundaries
[2, 10, 20] of 32 and the ratio halving after the first drop. The counters are spec §1.5 (the paper's image-token-only
FLOPs, MACs counted once) and §5.6 (whole-sequence prefill and decode MACs, ranking overhead, KV-cache bytes).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from fractions import Fraction

from ..config import is_int, is_number

BUDGET_BOUNDARIES = (2, 10, 20)
"""Boundaries of a token budget on the 32 layers of LLaVA-1.5-7B (a public third-party script, spec §1.5)."""


def _invalid(name: str, value, allowed: str):
    raise ValueError(f"DropSchedule: {name}={value!r} is not allowed; expected {allowed}")


KEEP_DIGITS = 12
"""Significant digits of a keep fraction in ``kept_count``: float drift beyond them is not part of the ratio."""


def kept_count(n_visual: int, keep: float, min_keep: int) -> int:
    """``floor(N * keep)`` clamped to ``[min_keep, N]``. The product is exact on ``keep`` as written (its shortest
    decimal, rounded to ``KEEP_DIGITS`` significant digits), so 100 x 0.29 keeps 29 where float arithmetic (and the
    official ``int``) gives 28, and ``0.3 ** 3`` (0.026999999999999996) keeps 27 of 1000 like the official explicit
    ratio list ``[0.3, 0.09, 0.027]`` (spec §1.1: ``floor(N * lambda^s)``)."""
    return min(n_visual, max(min_keep, math.floor(n_visual * Fraction(f"{keep:.{KEEP_DIGITS}g}"))))


@dataclass(frozen=True)
class DropSchedule:
    """Which decoder layers see how many of a row's visual tokens."""

    num_layers: int
    boundaries: tuple[int, ...]
    """0-based index of the first layer of each stage after the first; strictly increasing, each in [1, num_layers)."""
    keep: tuple[float, ...]
    """Fraction of the original visual tokens kept from each boundary on; non-increasing, each in (0, 1]."""
    min_keep: int = 1
    """Spec A5: a stage keeps at least this many visual tokens when the row has any (never more than it has)."""

    def __post_init__(self):
        if not (is_int(self.num_layers) and self.num_layers >= 1):
            _invalid("num_layers", self.num_layers, "an int >= 1")
        for name in ("boundaries", "keep"):
            if not isinstance(getattr(self, name), (list, tuple)):
                _invalid(name, getattr(self, name), "a tuple")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bounds, depth = self.boundaries, self.num_layers
        if not (all(is_int(b) and 1 <= b < depth for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:]))):
            _invalid("boundaries", bounds, f"strictly increasing layer indices in [1, {depth})")
        if len(self.keep) != len(bounds):
            _invalid("keep", self.keep, f"{len(bounds)} fractions, one per stage after the first")
        if not all(is_number(r) and 0 < r <= 1 for r in self.keep):
            _invalid("keep", self.keep, "fractions in (0, 1]")
        if any(a < b for a, b in zip(self.keep, self.keep[1:])):
            _invalid("keep", self.keep, "non-increasing fractions (of the original tokens)")
        if not (is_int(self.min_keep) and self.min_keep >= 0):
            _invalid("min_keep", self.min_keep, "an int >= 0")

    @classmethod
    def even(cls, num_layers: int, stages: int = 4, ratio: float = 0.5, min_keep: int = 1) -> "DropSchedule":
        """The paper's rule: S stages of ``L // S`` layers (the last one takes the rest), keep ``ratio ** s``.
        On 32 layers this gives the official [8, 16, 24] and the ablation's [10, 20] (S = 3) and [6, 12, 18, 24]
        (S = 5), whose FLOPs the paper reports (spec §1.5)."""
        if not (is_int(stages) and 1 <= stages <= num_layers):
            raise ValueError(f"DropSchedule: stages={stages!r} is not allowed; expected an int in [1, {num_layers}]")
        width = num_layers // stages
        return cls(num_layers, tuple(width * s for s in range(1, stages)),
                   tuple(ratio ** s for s in range(1, stages)), min_keep)

    @classmethod
    def one_stage(cls, num_layers: int, layer: int, keep: float, min_keep: int = 1) -> "DropSchedule":
        """FastV: layers ``[layer, L)`` keep ``keep`` of the visual tokens."""
        return cls(num_layers, (layer,), (keep,), min_keep)

    @classmethod
    def for_budget(cls, num_layers: int, n_visual: int, tokens: float, boundaries=None,
                   min_keep: int = 1) -> "DropSchedule":
        """Keep ``[rho, rho/2, rho/4, ...]`` with rho such that the mean visual tokens per layer is ``tokens`` on the
        continuous counts (spec §1.5: 36 + 288 rho for [2, 10, 20] and N = 576); ``mean_tokens(n_visual)`` is the
        achieved mean of the floored counts, at most one token below. ``boundaries`` default to [2, 10, 20] of 32
        scaled to the depth (those that fit in a shallower model). A budget of the whole image keeps everything."""
        if boundaries is None:
            boundaries = []
            for b in BUDGET_BOUNDARIES:
                b = max(round(num_layers * b / 32), boundaries[-1] + 1 if boundaries else 1)
                if b < num_layers:
                    boundaries.append(b)
        whole = cls(num_layers, tuple(boundaries), (1.0,) * len(boundaries), min_keep)
        if not (is_int(n_visual) and n_visual >= 0):
            _invalid("n_visual", n_visual, "an int >= 0")
        if not (is_number(tokens) and 0 < tokens <= n_visual):
            _invalid("tokens", tokens, f"a mean number of visual tokens per layer in (0, {n_visual}]")
        if tokens == n_visual:
            return whole
        bounds = whole.boundaries
        lengths = [b - a for a, b in zip(bounds, bounds[1:] + (num_layers,))]
        weight = sum(length / 2 ** s for s, length in enumerate(lengths))
        first = bounds[0] if bounds else num_layers
        rho = (tokens * num_layers / n_visual - first) / weight if weight else 0.0
        if not 0 < rho <= 1:
            lowest, highest = n_visual * first / num_layers, n_visual * (first + weight) / num_layers
            _invalid("tokens", tokens, f"a mean in ({lowest:g}, {highest:g}] or {n_visual} with boundaries "
                                       f"{bounds} (keep halves after the first drop)")
        return cls(num_layers, bounds, tuple(rho / 2 ** s for s in range(len(bounds))), min_keep)

    def kept_counts(self, n_visual: int) -> list[int]:
        """Visual tokens per stage, stage 0 first: ``[N, K_1, ..., K_{S-1}]``; all zeros when N == 0."""
        if n_visual == 0:
            return [0] * (len(self.keep) + 1)
        return [n_visual] + [kept_count(n_visual, r, self.min_keep) for r in self.keep]

    def stage_of_layer(self, layer: int) -> int:
        if not (is_int(layer) and 0 <= layer < self.num_layers):
            raise ValueError(f"DropSchedule: layer={layer!r} is not a decoder layer in [0, {self.num_layers})")
        return bisect_right(self.boundaries, layer)

    def tokens_per_layer(self, n_visual: int) -> list[int]:
        counts = self.kept_counts(n_visual)
        return [counts[self.stage_of_layer(i)] for i in range(self.num_layers)]

    def mean_tokens(self, n_visual: int) -> float:
        return sum(self.tokens_per_layer(n_visual)) / self.num_layers


def paper_flops(tokens_per_layer, hidden_size: int, intermediate_size: int) -> float:
    """Spec §1.5, the paper's convention: per layer ``4 n d^2 + 2 n^2 d + 3 n d m`` with n the layer's image tokens
    (text ignored, SwiGLU's three matrices, a multiply-accumulate counted once)."""
    d, m = hidden_size, intermediate_size
    return float(sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in tokens_per_layer))


def prefill_macs(seq_len_per_layer, hidden_size: int, kv_dim: int, intermediate_size: int) -> float:
    """Spec §5.6: per layer ``n d (2d + 2 d_kv) + 2 n^2 d + 3 n d m`` with n the layer's whole sequence (text and
    visual); the causal half is not discounted."""
    d, m = hidden_size, intermediate_size
    return float(sum(n * d * (2 * d + 2 * kv_dim) + 2 * n * n * d + 3 * n * d * m for n in seq_len_per_layer))


def scoring_macs(seq_len: int, hidden_size: int, kv_dim: int, num_heads: int, head_dim: int) -> float:
    """Spec §5.6, one boundary's ranking: ``k_proj`` over n tokens, ``q_proj`` over one, one score row per head."""
    return float(seq_len * hidden_size * kv_dim + hidden_size * hidden_size + seq_len * num_heads * head_dim)


def decode_macs(kv_len_per_layer, hidden_size: int, kv_dim: int, intermediate_size: int) -> float:
    """Spec §5.6, one generated token: per layer ``d (2d + 2 d_kv) + 2 kv_len d + 3 d m``."""
    d, m = hidden_size, intermediate_size
    return float(sum(d * (2 * d + 2 * kv_dim) + 2 * n * d + 3 * d * m for n in kv_len_per_layer))


def kv_bytes_saved(dropped_per_layer, kv_dim: int, bytes_per_value: int) -> int:
    """Spec §5.6: keys and values not cached, ``sum_l dropped_l * 2 * d_kv * bytes``."""
    return int(sum(dropped_per_layer)) * 2 * kv_dim * bytes_per_value
