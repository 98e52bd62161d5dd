"""One factory for every tiny model the tests use: built from configs, random seeded weights, no network.

``build(family, **overrides)`` returns a model in eval mode; ``FAMILIES`` maps each family name to its kind
(text, vlm, dit). Each kind's builders live in their own module; this one only dispatches.
"""

from __future__ import annotations

import importlib

from . import text, vlm

KINDS = {"text": text, "vlm": vlm}
try:  # the DiTs need diffusers (the test extra has it; a bare GPU image may not, and its kernel tests need none)
    KINDS["dit"] = importlib.import_module(f"{__name__}.dit")
except ImportError:
    pass

BUILDERS = {name: build for module in KINDS.values() for name, build in module.BUILDERS.items()}
FAMILIES = {name: kind for kind, module in KINDS.items() for name in module.BUILDERS}


def build(family: str, *, seed: int = 0, **overrides):
    """A tiny ``family`` model with weights drawn from ``torch.manual_seed(seed)``, in eval mode."""
    if family not in BUILDERS:
        raise KeyError(f"no tiny builder for {family!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[family](seed=seed, **overrides)
