"""Helpers shared by the tests: bit-exact state snapshots, attention implementation names, guarded kernel inputs."""

from __future__ import annotations

import contextlib

import torch

from tiny import text as tiny_text

TEXT_FAMILIES = sorted(tiny_text.BUILDERS)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def guarded(shape, dtype=torch.float32, seed=0):
    """A random tensor of ``shape`` that is a strided slice of a larger NaN-filled buffer."""
    g = torch.Generator().manual_seed(seed)
    padded = [s + 3 for s in shape[:-1]] + [shape[-1] + 5]
    buffer = torch.full(padded, float("nan"), dtype=torch.float32)
    inner = buffer[tuple(slice(1, 1 + s) for s in shape)]
    inner.copy_(torch.randn(shape, generator=g))
    return buffer.to(DEVICE, dtype)[tuple(slice(1, 1 + s) for s in shape)]


def inputs(shape, dtype=torch.float32, seed=0):
    b, h, h_kv, m, n, d = shape
    return guarded((b, h, m, d), dtype, seed), guarded((b, h_kv, n, d), dtype, seed + 1), \
        guarded((b, h_kv, n, d), dtype, seed + 2)


@contextlib.contextmanager
def attention_function(model, function, sub_config: str | None = None, name: str = "nograd_test_reference"):
    """Inside the block ``model`` runs ``function`` (registered with eager's mask) as the attention of its top
    config, or of the sub-config ``sub_config`` ("text_config", "vision_config"); the implementation name and the
    registrations are restored afterwards."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, eager_mask)
    config = model.config if sub_config is None else getattr(model.config, sub_config)
    before = config._attn_implementation
    model.set_attn_implementation(name if sub_config is None else {sub_config: name})
    try:
        yield
    finally:
        model.set_attn_implementation(before if sub_config is None else {sub_config: before})
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def assert_tiles_follow_the_rope_grid(model, inputs):
    """Qwen-VL: each tile's tokens, in raster order, get the model's 3-D RoPE heights row by row and widths column by
    column (``get_rope_index``)."""
    from nograd.patches import adapter_for

    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    for grid in adapter_for(model).image_grids(**inputs):
        (tile,) = grid.tiles
        heights = position_ids[1, grid.batch_row, tile.positions].view(tile.rows, tile.cols)
        widths = position_ids[2, grid.batch_row, tile.positions].view(tile.rows, tile.cols)
        assert torch.equal(heights - heights.min(), torch.arange(tile.rows)[:, None].expand(-1, tile.cols))
        assert torch.equal(widths - widths.min(), torch.arange(tile.cols)[None, :].expand(tile.rows, -1))


def assert_attn_request_switches_the_decoder_only(model):
    """A VLM adapter's ``attn_implementation_request`` switches the decoder (``text_config``) and leaves the vision
    tower alone; switching back restores every implementation name."""
    from nograd.patches import adapter_for

    adapter = adapter_for(model)
    before = attn_names(model)
    model.set_attn_implementation(adapter.attn_implementation_request("eager"))
    after = attn_names(model)
    assert after["text_config"] == adapter.attn_implementation == "eager" != before["text_config"]
    assert after["vision_config"] == before["vision_config"]
    model.set_attn_implementation(adapter.attn_implementation_request(before["text_config"]))
    assert attn_names(model) == before
