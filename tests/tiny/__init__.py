"""One factory for every tiny model the tests use: built from configs, random seeded weights, no network.

The builders live in ``nograd.tiny`` (one source for the tests, the demo and the README); ``tiny.text``,
``tiny.vlm``, ``tiny.dit`` and ``tiny.processor`` re-export its ``llms``, ``vlms``, ``dits`` and ``processors``.
``build(family, **overrides)`` returns a model in eval mode; ``FAMILIES`` maps each family name to its kind
(text, vlm, dit).
"""

from __future__ import annotations

from nograd.tiny import BUILDERS, FAMILIES, KINDS, build  # noqa: F401

from . import text, vlm  # noqa: F401
