"""ACT: attention calibration of hidden attention sinks (Yu et al., ICML 2024, arXiv 2406.15765).

Official code ``GATECH-EIC/ACT`` (``models/llama_modelling_aug.py``; spec ``extras-and-patch-points.md`` §1.2), for
each calibrated head of each calibrated layer, on the attention of the prompt:
1. Sink detection, per input: the mean attention each key receives from the queries that see it,
   ``a_j = sum_{i>=j} A_ij / (N - j)`` (on a sliding-window layer, over the queries whose window holds key j); keys
   with ``a_j > threshold`` (0.1, ``THRES``) are sinks, and the first one found (normally the initial token) is
   dropped from the set.
2. Calibration, per row i: the sink weights are scaled by ``beta`` (0.4, ``BETA``) and the other keys share what
   they gave up in proportion to their weights (``nograd.kernels.attention_rescaled_set``, exact, without the
   matrix).
The official code calibrates layers ``range(2, 31)`` of the 32-layer models (scaled here to the depth) and, in each,
a per-layer list of heads found by an offline search (184 heads for classification on Llama-2-7B); ``heads`` takes
such a table, and the default calibrates every head of those layers. Sinks are detected at prefill and kept for
the cached prompt during decoding (generated keys are never sinks); the official code re-detects on each decode
row alone, where the mean is over one query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionCall, Intervention, intervene, keys_from
from ..config import MethodConfig, is_int, is_number, option
from ..registry import register
from .base import Method
from .visual_edit import check_layer_range, check_layers, layer_range


@dataclass(frozen=True)
class ACTConfig(MethodConfig):
    beta: float = option(0.4, "factor on the attention to hidden sinks (official BETA), in [0, 1]; 1 = unchanged")
    threshold: float = option(0.1, "mean received attention above which a key is a sink (official THRES)")
    layers: object = option(None, "decoder layers (start, end); None = the official range(2, 31) of 32 scaled")
    heads: object = option(None, "None (every head of the calibrated layers), a list of heads for every layer, or "
                                 "{layer: [heads]} (the official per-layer tables)")

    def validate(self) -> None:
        if not (is_number(self.beta) and 0 <= self.beta <= 1):
            self.invalid("beta", "a number in [0, 1] (1 = unchanged; above 1 the other keys' weights turn negative "
                                 "wherever the sinks hold more than 1 / beta of a row)")
        if not (is_number(self.threshold) and 0 < self.threshold < 1):
            self.invalid("threshold", "a number in (0, 1)")
        check_layers(self)
        heads = self.heads
        if heads is None:
            return
        table = heads if isinstance(heads, dict) else {None: heads}
        ok = all((layer is None or isinstance(layer, int)) and isinstance(chosen, (list, tuple))
                 and all(is_int(h) and h >= 0 for h in chosen)
                 for layer, chosen in table.items())
        if not ok:
            self.invalid("heads", "None, a list of head indices, or {layer index: [head indices]}", TypeError)
        if not any(table.values()):  # it would calibrate nothing: beta=1 is the neutral setting
            self.invalid("heads", "at least one head: None (every head), a non-empty list, or {layer: [heads]} "
                                  "naming one")


class SinkCalibration(Intervention):
    """One layer: detect the hidden sinks of each calibrated head at prefill, rescale them in every later call."""

    def __init__(self, layer: int, heads: torch.Tensor, config: ACTConfig, stats: dict):
        self.layer = layer
        self.heads = heads
        self.config = config
        self.stats = stats
        self.sinks: torch.Tensor | None = None
        self.found = 0
        """How many (row, head, key) sinks the prompt call found."""
        self.offset = 0
        """The position of the sinks' key 0 (the prompt call's key offset)."""

    def set_rescale(self, call: AttentionCall):
        _, _, m, n = call.shape
        offset = call.key_offset
        if m > 1 or m == n:  # a prompt (a one-token prompt too); decode steps reuse its sinks
            self.sinks = self._detect(call)
            self.offset = offset
        if self.sinks is None or self.sinks.shape[0] != call.shape[0] or not self.found:
            return None  # no prompt yet, another batch, or no sink found: the plain attention, bit for bit
        # the sinks by position (a sliding-window cache has dropped the oldest keys); generated keys are never sinks
        return keys_from(self.sinks, offset - self.offset, n), self.config.beta

    def _detect(self, call: AttentionCall) -> torch.Tensor:
        mean = call.key_mass(reduce="mean")
        found = mean > self.config.threshold
        first = found.int().argmax(dim=-1, keepdim=True)
        found = found & (torch.arange(found.shape[-1], device=found.device) != first)
        found = found & self.heads.to(found.device)[None, :, None]
        self.found = self.stats["sinks"][self.layer] = int(found.sum())
        return found


@register
class ACT(Method):
    name = "act"
    summary = "find hidden attention sinks per input and per head, and give part of their attention to the rest"
    paper = ("Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training "
             "through Attention Calibration")
    arxiv = "2406.15765"
    kinds = ("text", "vlm")
    resources = ("score_edit",)
    reads = ("token_layout",)  # sinks are kept by key position, which token dropping moves
    Config = ACTConfig

    def layers(self) -> range:
        return layer_range(self.config.layers, self.adapter.num_layers, (2 / 32, 31 / 32))

    def head_mask(self, layer: int) -> torch.Tensor:
        heads = self.config.heads
        chosen = torch.zeros(self.adapter.num_heads, dtype=torch.bool)
        if heads is None:
            chosen[:] = True
        else:
            chosen[list(heads.get(layer, []) if isinstance(heads, dict) else heads)] = True
        return chosen

    def keeps_prompt_state(self) -> bool:
        return True  # the sinks found at the prefill

    def supports_assisted_decoding(self) -> bool:
        return self.config.beta == 1  # the sinks are found over every query of a prompt's first forward

    def check_model(self) -> None:
        """A ``{layer: [heads]}`` table names only calibrated layers (the official tables are indexed by the layers
        of ``range(2, 31)``): an entry outside ``layers`` would otherwise be silently ignored."""
        depth, num_heads = self.adapter.num_layers, self.adapter.num_heads
        check_layer_range(self.config, depth)
        heads, calibrated = self.config.heads, self.layers()
        table = heads if isinstance(heads, dict) else {None: heads or []}
        if any(layer is not None and layer not in calibrated for layer in table):
            self.config.invalid("heads", f"layer indices in the calibrated layers {calibrated.start}.."
                                         f"{calibrated.stop - 1} (option layers, of {depth} decoder layers)")
        if any(h >= num_heads for chosen in table.values() for h in chosen):
            self.config.invalid("heads", f"head indices in 0..{num_heads - 1}")

    def attach(self, handle) -> None:
        layers = [layer for layer in self.layers() if bool(self.head_mask(layer).any())]
        handle.stats.update(layers=layers, sinks={})
        if self.config.beta == 1 or not layers:
            handle.stats["layers"] = []
            return
        modules = self.adapter.attention_modules
        intervene(handle, {modules[layer]: SinkCalibration(layer, self.head_mask(layer), self.config, handle.stats)
                           for layer in layers})
