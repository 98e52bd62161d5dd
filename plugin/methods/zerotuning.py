"""ZeroTuning: scale the attention every head pays to the initial token (arXiv 2505.11739).

Han et al., *ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without Training*
(ICLR 2026); official code ``FeijiangHan/ZeroTuning``, ``core algorithms/modelling_llama.py``,
``ZeroTuning_Attention``: after softmax, multiply the weight of key 0 by ``rate`` in the target heads of the target
layers and renormalise the row (``rate == 1`` returns the weights untouched).

Algorithm (spec ``extras-and-patch-points.md`` §1.1):
1. For each target (layer l, head h) take ``gamma[l, h]``.
2. Scaling the post-softmax weight of the initial token by gamma and renormalising equals adding the logit bias
   ``ln gamma`` to that one key column: softmax(s + ln(gamma) * e_0). It does not depend on the query row, so it
   runs through the shared biased-attention kernel at prefill and at every cached decode step.
3. The initial token is each row's **first real token** (the official code uses column 0, which is a padding key
   in a left-padded batch, where the method silently does nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch

from ..attention import AttentionCall, Intervention, intervene, recomputing
from ..config import MethodConfig, is_int, is_number, option
from ..registry import register
from .base import Method


def _int_tuple(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not (is_int(value) or isinstance(value, (list, tuple, range))):
        raise TypeError  # a dict ({layer: [heads]}, ACT's form) would give its keys
    items = (value,) if is_int(value) else tuple(value)
    if not items or not all(is_int(i) and i >= 0 for i in items):
        raise ValueError
    if len(set(items)) != len(items):
        raise ValueError
    return tuple(int(i) for i in items)


def _selected(indices: tuple[int, ...] | None, count: int) -> torch.Tensor:
    chosen = torch.zeros(count, dtype=torch.bool)
    chosen[slice(None) if indices is None else list(indices)] = True
    return chosen


@dataclass(frozen=True)
class ZeroTuningConfig(MethodConfig):
    """Options of ZeroTuning.

    ``gamma`` defaults to 4, the factor of the official Colab demo (Llama-3.1-8B-Instruct on SST-2, all layers and
    heads, swept over 1..4); the official forward's default ``rate = 1`` is the neutral setting. The paper tunes
    gamma per task (classification prefers gamma > 1, QA gamma < 1) and per head type: pass a per-layer or
    per-(layer, head) table for that.
    """

    gamma: object = option(4.0, "factor on the initial token's attention weight: a number > 0, a per-layer "
                                "sequence (L,), or a per-(layer, head) table (L, H); 1 = unchanged")
    layers: object = option(None, "layer indices to modify (None = all), the official `target_layers`")
    heads: object = option(None, "head indices to modify in every chosen layer (None = all), the official `target_heads`")
    target: object = option("first_token", "'first_token' (each row's first real token) or (start, end): the key "
                                           "range [start, end) counted from the first real token, the official "
                                           "`question_start, question_end` variant")

    def validate(self) -> None:
        gamma = self.gamma
        if isinstance(gamma, torch.Tensor) and gamma.dim() == 0:  # a number given as a tensor
            gamma = gamma.item()
        if isinstance(gamma, Real) and not isinstance(gamma, bool):
            if not (is_number(gamma) and gamma > 0):
                self.invalid("gamma", "a finite number > 0")
            object.__setattr__(self, "gamma", float(gamma))
        else:
            try:
                table = torch.as_tensor(gamma, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                self.invalid("gamma", "a number > 0, a per-layer sequence or a (layers, heads) table", TypeError)
            if table.dim() not in (1, 2) or table.numel() == 0:
                self.invalid("gamma", "a number, a 1-D per-layer sequence or a 2-D (layers, heads) table")
            if not bool(torch.isfinite(table).all() and (table > 0).all()):
                self.invalid("gamma", "finite values > 0")
            object.__setattr__(self, "gamma", table)
        for name in ("layers", "heads"):
            try:
                object.__setattr__(self, name, _int_tuple(getattr(self, name)))
            except (TypeError, ValueError):
                self.invalid(name, "None, an int, or a list of distinct non-negative ints (the same heads in every "
                                   "chosen layer; per-layer heads: a (layers, heads) gamma table)")
        target = self.target
        if not (isinstance(target, str) and target == "first_token"):
            ok = (isinstance(target, (tuple, list)) and len(target) == 2
                  and all(is_int(i) for i in target) and 0 <= target[0] < target[1])
            if not ok:
                self.invalid("target", "'first_token' or a pair (start, end) with 0 <= start < end")
            object.__setattr__(self, "target", tuple(int(i) for i in target))

    def key_range(self) -> tuple[int, int]:
        """[start, end) of the scaled keys, counted from each row's first real token."""
        return (0, 1) if self.target == "first_token" else self.target

    def table(self, num_layers: int, num_heads: int) -> torch.Tensor:
        """The (L, H) gamma of every head, 1 where the method leaves a head alone."""
        gamma = self.gamma
        if isinstance(gamma, float):
            full = torch.full((num_layers, num_heads), gamma, dtype=torch.float64)
        elif gamma.dim() == 1:
            full = gamma[:, None].expand(num_layers, num_heads).clone()
        else:
            full = gamma.clone()
        chosen = _selected(self.layers, num_layers)[:, None] & _selected(self.heads, num_heads)[None, :]
        return torch.where(chosen, full, torch.ones_like(full))


class InitialKeys:
    """Which keys of a call are each row's initial token(s), shared by the layers of one method: the same for every
    layer of a forward with the same keys, so computed once per forward and key window, not once per layer."""

    def __init__(self, key_range: tuple[int, int]):
        self.start, self.end = key_range
        self._last: tuple | None = None
        """((forward, batch, keys, key offset, device), (first, chosen)) of the last call."""

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each row's first biased key position and the (B, 1, N) float mask of its biased keys."""
        b, _, _, n = call.shape
        device = call.query.device
        key = (call.batch.forward, b, n, call.key_offset, device)
        if self._last is None or self._last[0] != key:
            first = call.batch.first_real_position(b, device)
            # by position: a sliding-window cache's keys start at call.key_offset (the oldest ones dropped)
            positions = torch.arange(n, device=device)[None, :] + call.key_offset
            chosen = (positions >= first[:, None] + self.start) & (positions < first[:, None] + self.end)
            self._last = (key, (first + self.start, chosen[:, None, :].float()))
        return self._last[1]


class FirstTokenBias(Intervention):
    """``ln gamma_h`` on each row's initial-token key (or key range), for the heads of one layer."""

    def __init__(self, log_gamma: torch.Tensor, keys: InitialKeys, stats: dict):
        self.log_gamma = log_gamma
        self.keys = keys
        self.stats = stats

    def key_bias(self, call: AttentionCall) -> torch.Tensor:
        first, chosen = self.keys(call)
        self.stats["biased_calls"] += not recomputing()
        self.stats["target_key"] = first  # each row's first biased key position
        return chosen * self.log_gamma.to(call.query.device)[None, :, None]


@register
class ZeroTuning(Method):
    name = "zerotuning"
    summary = "scale each head's attention to the initial token by gamma (a logit bias ln gamma), renormalised"
    paper = "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without Training"
    arxiv = "2505.11739"
    kinds = ("text", "vlm")
    reads = ("token_layout",)  # the initial token's key index, which token dropping moves
    Config = ZeroTuningConfig

    def check_model(self) -> None:
        cfg, num_layers, num_heads = self.config, self.adapter.num_layers, self.adapter.num_heads
        if isinstance(cfg.gamma, torch.Tensor):
            expected = (num_layers,) if cfg.gamma.dim() == 1 else (num_layers, num_heads)
            if tuple(cfg.gamma.shape) != expected:
                cfg.invalid("gamma", f"shape {expected} for this model ({num_layers} layers, {num_heads} heads)")
        for name, limit in (("layers", num_layers), ("heads", num_heads)):
            chosen = getattr(cfg, name)
            if chosen is not None and max(chosen) >= limit:
                cfg.invalid(name, f"indices in 0..{limit - 1} for this model")

    def attach(self, handle) -> None:
        table = self.config.table(self.adapter.num_layers, self.adapter.num_heads)
        touched = table != 1
        handle.stats.update(layers=touched.any(1).nonzero().flatten().tolist(), heads_touched=int(touched.sum()),
                            biased_calls=0, target_key=None)
        modules, keys = self.adapter.attention_modules, InitialKeys(self.config.key_range())
        intervene(handle, {
            modules[layer]: FirstTokenBias(table[layer].log().float(), keys, handle.stats)
            for layer in handle.stats["layers"]
        })
