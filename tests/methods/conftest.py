"""Fixtures shared by the method tests."""

from __future__ import annotations

import pytest

from nograd import tiny


@pytest.fixture(scope="module")
def carve_models():
    """``get(family, attn="sdpa")``: the CARVE tests' tiny VLM of ``family`` (seed 2, a 6-layer decoder, so the
    paper's layer window has room), built once per test module."""
    cache = {}

    def get(family, attn="sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = tiny.vlm_model(family, seed=2, layers=6, attn_implementation=attn)
        return cache[family, attn]

    return get
