"""The FLOPs that perturbed-attention guidance's extra rows cost (``h.stats["extra_flops"]``), measured.

A parameter count times the tokens overstates them on MM-DiTs: SD3's and FLUX's joint blocks pass the image tokens
through one set of weights and the text tokens through another, the modulation linears see one embedding per row, and
attention grows with the square of the sequence. So the first perturbed call of each input shape is measured: a
hook on every ``nn.Linear`` (and the patch ``nn.Conv2d``) records the rows beyond the call's plain batch and the
tokens per row it gives, which make ``2 in out tokens`` per linear and ``4 S_q S_k inner`` per attention module
(its ``to_q`` / ``add_q_proj`` and ``to_k`` / ``add_k_proj`` give ``S_q`` and ``S_k``); later calls of that shape
reuse the per-row figure. Attention that the method skips (u = 1 heads) is counted here as the plain model computes
it, and in ``attention_flops_saved``.
"""

from __future__ import annotations

import functools
import math
from typing import Hashable

from torch import nn


class ExtraRowFlops:
    """Per-row FLOPs of the extra rows by input shape, and the measurement of a new one."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.plain = 0
        """Rows of the running call that are not extra: the call's batch, 0 inside a perturbed-only call."""
        self._per_row: dict[Hashable, int] = {}
        self._measuring: tuple | None = None
        """(shape key, extra rows, hooks, {linear: (extra rows, tokens per row), "flops": the linears' so far}) of the
        call being measured."""

    def count(self, key: Hashable, rows: int, stats: dict) -> None:
        """Add ``rows`` extra rows of input shape ``key`` to ``stats["extra_flops"]``; a new shape is measured in
        the running call and added by ``finish``."""
        self.abandon()  # a measurement an interrupt left unfinished
        if key in self._per_row:
            stats["extra_flops"] += rows * self._per_row[key]
            return
        seen: dict = {"flops": 0}
        hooks = [m.register_forward_hook(functools.partial(self._see, seen)) for m in self.model.modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d))]
        self._measuring = (key, rows, hooks, seen)

    def _see(self, seen: dict, module: nn.Module, args, output) -> None:
        linear = isinstance(module, nn.Linear)
        batch = output.shape[0] if output.dim() > (1 if linear else 3) else 1
        outputs = module.out_features if linear else module.out_channels
        tokens = output.numel() // (batch * outputs)  # tokens per row, or output pixels per row (a patch conv)
        inputs = module.in_features if linear else module.in_channels // module.groups * math.prod(module.kernel_size)
        extra = batch - self.plain
        seen[module] = (extra, tokens)
        seen["flops"] += 2 * inputs * outputs * tokens * extra

    def finish(self, stats: dict) -> None:
        """After the call: the measured FLOPs into ``stats`` and the per-row figure kept for the shape."""
        if self._measuring is None:
            return
        key, rows, _, seen = self._measuring
        self.abandon()
        flops = seen["flops"]
        for module in self.model.modules():
            q, k = getattr(module, "to_q", None), getattr(module, "to_k", None)
            if q in seen and k in seen:
                extra = seen[q][0]
                s_q = seen[q][1] + seen.get(getattr(module, "add_q_proj", None), (0, 0))[1]
                s_k = seen[k][1] + seen.get(getattr(module, "add_k_proj", None), (0, 0))[1]
                flops += 4 * s_q * s_k * q.out_features * extra
        self._per_row[key] = flops // max(rows, 1)
        stats["extra_flops"] += flops

    def abandon(self) -> None:
        if self._measuring is not None:
            for hook in self._measuring[2]:
                hook.remove()
            self._measuring = None
