"""One factory for every tiny model the tests use: built from configs, random seeded weights, no network.

``build(family, **overrides)`` returns a model in eval mode; ``FAMILIES`` maps each family name to its kind
(text, vlm, dit). Each kind's builders live in their own module; this one only dispatches.
"""

from __future__ import annotations

from . import dit, text, vlm

BUILDERS = {**text.BUILDERS, **vlm.BUILDERS, **dit.BUILDERS}
FAMILIES = {name: kind for kind, module in (("text", text), ("vlm", vlm), ("dit", dit)) for name in module.BUILDERS}


def build(family: str, *, seed: int = 0, **overrides):
    """A tiny ``family`` model with weights drawn from ``torch.manual_seed(seed)``, in eval mode."""
    if family not in BUILDERS:
        raise KeyError(f"no tiny builder for {family!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[family](seed=seed, **overrides)
