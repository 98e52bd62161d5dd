"""What nograd's hooks read of a forward: its arguments by name, its cache, where its inputs go (an offloaded model's
execution device) and whether it is recomputed in the backward (checkpointing)."""

from __future__ import annotations

import inspect

import torch


def bound_inputs(signature: inspect.Signature, args, kwargs) -> dict:
    """The call's arguments as one dict by parameter name, a ``**kwargs`` parameter's entries flattened in."""
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return bound


def cache_of(inputs: dict):
    """The KV cache a forward got (transformers 5.24 names it ``cache``, earlier versions ``past_key_values``)."""
    return inputs.get("cache", inputs.get("past_key_values"))


def cached_length(inputs: dict) -> int:
    """The positions already in the forward's KV cache (0 without one)."""
    cache = cache_of(inputs)
    return 0 if cache is None else int(cache.get_seq_length())


def embeddings_only(method: str, tokens: str) -> ValueError:
    """The refusal of a prompt given as embeddings alone to a method that finds its ``tokens`` in ``input_ids``
    (``generate(input_ids=..., inputs_embeds=...)`` passes only the embeddings to the model's first forward)."""
    return ValueError(f"{method} finds the {tokens} in input_ids, and this forward has inputs_embeds only (generate() "
                      "passes only the embeddings to the prefill when given both): call it with input_ids alone")


def execution_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s inputs go: its device, or for a model whose weights accelerate offloaded (``cpu_offload``, a
    ``device_map`` with "cpu" / "disk" entries, so its first parameter is on the meta device) the execution device of
    its first hook, else the device of its first resident parameter, else the CPU."""
    device = model.device
    if device.type != "meta":
        return device
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or [hook]:
            found = getattr(one, "execution_device", None)
            if found is not None:
                return torch.device(found)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` recomputes its layers in the backward: transformers' ``is_activation_checkpointing``, named
    ``is_gradient_checkpointing`` before 5.2x (deprecated since, with a warning at every read) and in diffusers."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))
