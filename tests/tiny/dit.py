"""Tiny MM-DiTs and diffusers pipelines: they live in ``nograd.tiny.dits`` (one source for the tests, the demo and the README)."""

from nograd.tiny.dits import *  # noqa: F401,F403
