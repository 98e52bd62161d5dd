"""Tiny VLMs and hand-built inputs for them: they live in ``nograd.tiny.vlms`` (one source for the tests, the demo and the README)."""

from nograd.tiny.vlms import *  # noqa: F401,F403
