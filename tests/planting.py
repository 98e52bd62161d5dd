"""A test-only method that plants a known attention peak: +6 logit bias on one key of batch row 0 (the task prompt of
a CARVE probe batch) in every attention call of the decoder, set with ``handle.plant(key)``. Importing this module
registers it once as ``"test_plant_key"``."""

from __future__ import annotations

import torch

import nograd
from nograd.attention import Intervention, intervene
from nograd.methods.base import Method


class PlantedKey(Intervention):
    def __init__(self, method):
        self.method = method

    def key_bias(self, call):
        at = self.method.key
        if at is None or call.shape[0] < 2:
            return None
        bias = torch.zeros(call.shape[0], 1, call.shape[3])
        bias[0, 0, at] = 6.0
        return bias


@nograd.register
class PlantKey(Method):
    name, summary, kinds = "test_plant_key", "a test-only attention peak", ("vlm",)

    def attach(self, handle):
        self.key = None
        handle.expose("plant", lambda key: setattr(self, "key", key))
        intervene(handle, {m: PlantedKey(self) for m in self.adapter.attention_modules})
