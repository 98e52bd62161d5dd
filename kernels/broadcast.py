"""Shape helpers shared by the kernels: the per-key tensors (key bias, score-edit coefficients, key sets) that
broadcast to (B, H, N)."""

from __future__ import annotations

import torch


def per_key(x: torch.Tensor) -> torch.Tensor:
    """``x`` given as (N,), (H|1, N) or (B|1, H|1, N) as a 3-D (B|1, H|1, N) view (leading 1s added)."""
    return x.reshape((1,) * (3 - x.dim()) + tuple(x.shape))


def fits_per_key(shape: tuple[int, ...], target: tuple[int, int, int]) -> bool:
    """Whether a per-key tensor of ``shape`` ((N,), (H|1, N) or (B|1, H|1, N)) broadcasts to ``target`` (B, H, N).
    By hand: ``torch.broadcast_shapes`` costs more than a decode step's attention on CPU."""
    padded = (1,) * (3 - len(shape)) + tuple(shape)
    return 1 <= len(shape) <= 3 and all(size in (1, want) for size, want in zip(padded, target))
