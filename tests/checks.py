"""Assertion helpers shared by the tests: bit-exact state snapshots and attention implementation names."""

from __future__ import annotations

import torch

from tiny import text as tiny_text

TEXT_FAMILIES = sorted(tiny_text.BUILDERS)


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict, to compare bit-for-bit later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def attn_names(model) -> dict[str, str | None]:
    """The attention implementation of the model's config and of every sub-config, by dotted key."""
    found, stack = {}, [("", model.config)]
    while stack:
        key, config = stack.pop()
        found[key] = config._attn_implementation
        for sub in getattr(config, "sub_configs", {}):
            if getattr(config, sub, None) is not None:
                stack.append((f"{key}.{sub}".strip("."), getattr(config, sub)))
    return found
