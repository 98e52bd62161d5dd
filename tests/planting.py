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


def probe_grids(carve, picture, question):
    """CARVE's probe batch for ``picture`` (``question``, then the general prompt): its inputs and the image grid of
    each row."""
    inputs = carve.build_inputs([picture] * 2, [question, carve.config.general_prompt])
    image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return inputs, carve.adapter.image_grids(inputs["input_ids"], **image_inputs)


def planted_peak(carve, picture, question, key):
    """CARVE's saliency of ``picture`` with an attention peak planted on sequence position ``key`` of the task
    prompt, and the (x, y) pixel of its maximum."""
    plant = nograd.apply(carve.model, "test_plant_key")
    try:
        plant.plant(key)
        saliency = carve.saliency(picture, question)
    finally:
        plant.remove()
    y, x = divmod(int(saliency.argmax()), saliency.shape[1])
    return saliency, (x, y)
