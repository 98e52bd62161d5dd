"""Tiny VLMs (filled in by the VLM adapter work)."""

BUILDERS = {}
