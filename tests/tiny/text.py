"""Tiny decoder-only LLMs: they live in ``nograd.tiny.llms`` (one source for the tests, the demo and the README)."""

from nograd.tiny.llms import *  # noqa: F401,F403
