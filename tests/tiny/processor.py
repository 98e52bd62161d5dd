"""Offline processors for the tiny VLMs: they live in ``nograd.tiny.processors`` (one source for the tests, the demo and the README)."""

from nograd.tiny.processors import *  # noqa: F401,F403
