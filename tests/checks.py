"""Helpers shared by the tests: bit-exact state snapshots, attention implementation names, guarded kernel inputs,
PAI's image-free refine written out."""

from __future__ import annotations

import contextlib
import math

import torch

import nograd
from tiny import text as tiny_text
from tiny.vlm import IMAGE, VIDEO

TEXT_FAMILIES = sorted(tiny_text.BUILDERS)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict, to compare bit-for-bit later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def host_reads(fn) -> int:
    """How many times ``fn()`` reads a tensor value back to Python (``aten::_local_scalar_dense``: ``.item()``,
    ``bool(t)``, ``int(t)``); on CUDA each one waits for the device (a sync)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name == "aten::_local_scalar_dense" for event in prof.events())


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


def assert_refine_is_written_out(model, plain_twin, inputs, visual_ids, gamma=1.1, steps=3, **options):
    """PAI's image-free refine (``cfg_gamma``), written out: greedy steps without a cache, z_c from ``model`` with
    the visual inputs, z_u from ``plain_twin`` on each row's tokens without its ``visual_ids`` tokens, z = gamma
    (z_c - z_u) + z_u cut below 0.1 of the max; ``generate()`` under PAI with ``cfg_gamma`` gives the same scores
    and tokens at every step. As in the official code (whose ``use_cfg`` flag is cleared by the first refine), the
    attention edit (PAI with ``options``) leaves the prompt alone and starts at the first generated token: z_c of
    step 0 is the plain model's, later steps edit the rows from the first generated token on."""
    with nograd.apply(model, "pai", cfg_gamma=gamma, **options):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    seq, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = torch.isin(seq, torch.tensor(visual_ids)) & mask.bool()
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    handle = None
    try:
        for step in range(steps):
            if step == 1:  # a new prompt for the tracker: it ends at the first generated token, where rows start
                handle = nograd.apply(model, "pai", **options)
            types = {"mm_token_type_ids": (seq == IMAGE).int() + 2 * (seq == VIDEO).int()} \
                if "mm_token_type_ids" in inputs else {}
            with torch.no_grad():  # use_cache=False: a re-run of the prompt, as generate(use_cache=False)
                z_c = model(input_ids=seq, attention_mask=mask, use_cache=False, **pixels, **types).logits[:, -1]
            keep = mask.bool() & ~torch.nn.functional.pad(visual, (0, seq.shape[1] - visual.shape[1]))
            rows = [row[k] for row, k in zip(seq, keep)]
            width = max(len(r) for r in rows)
            text = torch.zeros(len(rows), width, dtype=seq.dtype)
            text_mask = torch.zeros_like(text)
            for i, r in enumerate(rows):
                text[i, width - len(r):], text_mask[i, width - len(r):] = r, 1
            with torch.no_grad():
                z_u = plain_twin(input_ids=text, attention_mask=text_mask).logits[:, -1]
            z_c, z_u = z_c.float().log_softmax(-1), z_u.float().log_softmax(-1)
            z = (gamma * (z_c - z_u) + z_u).masked_fill(z_c < math.log(0.1) + z_c.amax(-1, keepdim=True), -math.inf)
            finite = torch.isfinite(z)
            assert torch.equal(finite, torch.isfinite(out.scores[step]))
            torch.testing.assert_close(out.scores[step][finite], z[finite], atol=1e-4, rtol=0)
            token = z.argmax(-1, keepdim=True)
            assert torch.equal(token[:, 0], out.sequences[:, seq.shape[1]])
            seq, mask = torch.cat([seq, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    finally:
        if handle is not None:
            handle.remove()
