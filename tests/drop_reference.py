"""The physical-removal reference of PyramidDrop and FastV, shared by ``tests/methods/test_pyramiddrop.py`` and
``tests/methods/test_pyramiddrop_families.py``: the plain decoder layers run one by one, without a cache, on rows
rebuilt by hand from the text tokens and the kept visual tokens, with hand-made causal + padding masks. Qwen3-VL's
deepstack features are added as its decoder adds them: at the image positions, to the outputs of its first layers
(before every boundary; the other families pass none, so nothing changes for them). Gemma3: every layer gets the
mask and RoPE of its ``layer_types`` entry over the rebuilt rows: causal + padding, OR the image tokens of one image
(its ``token_type_ids`` run) seeing each other, and on sliding layers AND ``q - k < sliding_window`` counted over the
rebuilt (shorter) rows."""

from __future__ import annotations

import torch

import nograd
from nograd.patches import adapter_for
from tiny.vlm import IMAGE, VIDEO

VISUAL = (IMAGE, VIDEO)
"""The visual tokens: image and video placeholders (the families without a video token never hold ``VIDEO``)."""


def decoder(model):
    """The model's decoder (``model.language_model``, Idefics3's ``model.text_model``)."""
    return adapter_for(model).text_model


def generate(model, inputs, steps=4, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


# ---- the reference: physical removal, the plain layers run one by one, no cache ---------------------------------
def language_model_inputs(model, inputs, ids):
    """What the plain model gives its decoder for ``ids`` (prompt + generated tokens): embeddings, positions, mask,
    and Qwen3-VL's deepstack inputs (``visual_pos_masks``, ``deepstack_visual_embeds``; None for other families)."""
    seen = {}
    lm = decoder(model)

    def grab(module, args, kwargs):
        seen.update(kwargs)

    mask = torch.cat([inputs["attention_mask"],
                      torch.ones(ids.shape[0], ids.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)], 1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        extra["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    if "token_type_ids" in inputs:  # Gemma3
        extra["token_type_ids"] = (ids == IMAGE).long()
    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
    finally:
        hook.remove()
    positions = seen.get("position_ids")
    if positions is None:
        positions = (mask.cumsum(1) - 1).clamp(min=0)
    deepstack = seen.get("deepstack_visual_embeds")
    return seen["inputs_embeds"], positions, mask, None if deepstack is None else (seen["visual_pos_masks"], deepstack)


def reference_logits(model, inputs, ids, kept, boundaries, positions_mode, visual_ids=VISUAL):
    """Last-token logits of ``ids`` with, from each boundary on, only the text tokens and the kept visual tokens:
    the rows are rebuilt by hand (left-padded), and every layer gets a hand-made causal + padding mask."""
    lm = decoder(model)
    embeds, positions, mask, deepstack = language_model_inputs(model, inputs, ids)
    rope = positions[1:] if positions.dim() == 3 and positions.shape[0] == 4 else positions
    b, n = ids.shape
    rope = rope.expand(*rope.shape[:-2], b, n)
    prompt_len = inputs["input_ids"].shape[1]
    visual = torch.zeros(b, n, dtype=torch.bool)
    visual[:, :prompt_len] = torch.isin(inputs["input_ids"], torch.tensor(visual_ids)) & inputs["attention_mask"].bool()
    layer_types = getattr(lm.config, "layer_types", None) if "token_type_ids" in inputs else None  # Gemma3
    kinds = sorted(set(layer_types)) if layer_types else [None]

    def rotary(x, pos, kind):
        return lm.rotary_emb(x, pos) if kind is None else lm.rotary_emb(x, pos, kind)

    full = {kind: rotary(embeds, rope, kind) for kind in kinds}
    blocks = torch.full((b, n), -1)  # Gemma3: each image's run of image tokens, numbered in its row; -1 elsewhere
    if layer_types:
        for r in range(b):
            block, previous = -1, False
            for j in range(prompt_len):
                if visual[r, j] and not previous:
                    block += 1
                if visual[r, j]:
                    blocks[r, j] = block
                previous = bool(visual[r, j])
    held = torch.arange(n).expand(b, n)  # the original position each slot holds; -1: an extra pad slot
    h, rotaries = embeds, full
    for i, layer in enumerate(lm.layers):
        if i in boundaries:
            s = boundaries.index(i)
            dropped = visual.clone()
            for r in range(b):
                dropped[r, kept[s][r]] = False
            rows = [[j for j, o in enumerate(held[r].tolist()) if o < 0 or not dropped[r, o]] for r in range(b)]
            width = max(map(len, rows))
            index = torch.tensor([[0] * (width - len(row)) + row for row in rows])
            filled = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in rows])
            held = torch.where(filled, held.gather(1, index), -1)
            h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
            origin = held.clamp(min=0)
            if positions_mode == "original":
                rotaries = {kind: tuple(t.gather(1, origin[..., None].expand(-1, -1, t.shape[-1])) for t in cs)
                            for kind, cs in full.items()}
            else:
                before = dropped.long().cumsum(1)
                rotaries = {kind: rotary(h, rope.gather(1, origin) - before.gather(1, origin), kind) for kind in kinds}
        valid = (held >= 0) & mask.gather(1, held.clamp(min=0)).bool()
        length = h.shape[1]
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None]
        kind = layer_types[i] if layer_types else None
        if layer_types:
            slot_block = torch.where(held >= 0, blocks.gather(1, held.clamp(min=0)), -1)
            allowed = allowed | ((slot_block[:, :, None] == slot_block[:, None, :]) & (slot_block[:, :, None] >= 0))
            if kind == "sliding_attention":
                slots = torch.arange(length)
                allowed = allowed & (slots[:, None] - slots[None, :] < lm.config.sliding_window)[None]
        allowed = allowed & valid[:, None, :]
        cos, sin = rotaries[kind]
        bias = torch.zeros(b, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        with torch.no_grad():
            h = layer(h, attention_mask=bias, position_embeddings=(cos, sin), position_ids=None)
        if deepstack is not None and i < len(deepstack[1]):  # Qwen3-VL: the full-length sequence, as the decoder
            assert i < boundaries[0], "a deepstack layer after a boundary"
            h = h.clone()
            h[deepstack[0]] += deepstack[1][i]
    with torch.no_grad():
        return model.lm_head(lm.norm(h[:, -1]))


def assert_generate_equals_physical_removal(model, inputs, method, options, boundaries, positions, steps=4,
                                            visual_ids=VISUAL):
    """Cached ``generate()`` under ``method`` equals the physical-removal reference at every step (1e-5), and an
    uncached run gives the same tokens. ``visual_ids``: the tokens the method may drop."""
    with nograd.apply(model, method, positions=positions, **options) as handle:
        tokens, scores = generate(model, inputs, steps=steps)
        kept = handle.stats["kept"]
    ids = inputs["input_ids"]
    for step in range(tokens.shape[1]):
        expected = reference_logits(model, inputs, ids, kept, boundaries, positions, visual_ids)
        torch.testing.assert_close(scores[:, step], expected, atol=1e-5, rtol=0)
        ids = torch.cat([ids, tokens[:, step:step + 1]], dim=1)
    with nograd.apply(model, method, positions=positions, **options):
        uncached, _ = generate(model, inputs, steps=steps, use_cache=False)
    assert torch.equal(uncached, tokens)


def visual_counts(inputs, visual_ids=VISUAL):
    return (torch.isin(inputs["input_ids"], torch.tensor(visual_ids)) & inputs["attention_mask"].bool()).sum(1).tolist()
