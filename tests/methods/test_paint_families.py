"""PAINT on Gemma3, Qwen3-VL, InternVL-hf and Mistral3 (``tiny/vlm_families.py``): the read-outs equal an eager
re-computation of the tower's attention, the token scores equal an independent fold of those patch scores into the
LLM's image tokens, the selection equals one made from them, the edit reaches the logits, ``generate`` with the KV
cache equals it without, and ``remove()`` restores the model.

- Gemma3: SigLIP (no CLS), received attention per image; the projector average-pools 2 x 2 patch blocks into one
  token (a token's score: the sum over its block).
- Qwen3-VL: received attention per image (one tower call each), the merger's runs of 4 patches per token.
- InternVL-hf: a CLS tower run once over all tiles: the CLS row per tile, ``pixel_shuffle`` folds 2 x 2 patch blocks
  into one token; an image's tiles (crops, then the thumbnail) follow one another.
- Mistral3: a Pixtral tower runs all images as one sequence with a block-diagonal mask: received attention over
  that sequence, split per image by ``image_sizes``, the merger's 2 x 2 blocks (``unfold``) per image.
"""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import attention_function, attn_names, same_state, snapshot
from nograd.methods import paint
from nograd.methods.paint import select_tokens
from nograd.patches import adapter_for
from tiny import vlm_families as tiny_families

FAMILIES = ["gemma3", "qwen3_vl", "internvl", "mistral3"]
SEED = {"gemma3": 4, "qwen3_vl": 6, "internvl": 7, "mistral3": 23}
"""Input seeds whose images have a summary token (a Tukey outlier among a few tokens is rare in tiny random towers)."""


def vision_attention(model, family, layer):
    if family == "gemma3":
        return model.model.vision_tower.encoder.layers[layer].self_attn
    if family == "qwen3_vl":
        return model.model.visual.blocks[layer].attn
    if family == "mistral3":
        return model.model.vision_tower.transformer.layers[layer].attention
    return model.model.vision_tower.encoder.layer[layer].attention


def eager_patch_scores(model, family, inputs, layers, spatial=False):
    """layer -> (units, patches): the CLS row summed over heads (InternVL, per tile), or the attention each patch
    receives, mean over queries and heads (per image), from an eager re-computation of every vision attention call;
    with ``spatial`` the received attention of InternVL's patches (CLS left out) as well, under ``"spatial"``."""
    recorded = {}
    modules = {id(vision_attention(model, family, layer)): layer for layer in layers}

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        weights = ((query.float() @ key.float().transpose(-1, -2)) * scaling)
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = weights.softmax(-1)
        layer = modules.get(id(module))
        if layer is not None:
            rows = weights[:, :, 0, 1:].sum(1) if family == "internvl" else weights.mean(dim=(1, 2))
            recorded.setdefault(layer, []).extend(rows)
            if family == "mistral3":  # one sequence of all images: each image's own queries
                bounds = torch.tensor([0] + [h * w // 49 for h, w in inputs["image_sizes"].tolist()]).cumsum(0)
                recorded.setdefault(("own", layer), []).extend(
                    weights[0, :, start:end, start:end].mean(dim=(0, 1)) for start, end in zip(bounds, bounds[1:]))
            if spatial and layer == layers[0]:
                recorded.setdefault("spatial", []).extend(weights.mean(dim=(1, 2))[:, 1:])
        return (weights @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), None

    with attention_function(model, attention, "vision_config"), torch.no_grad():
        model(**inputs)
    return recorded


def folded(units: list[torch.Tensor], family: str, image_sizes=None) -> torch.Tensor:
    """(patches,) rows per unit -> one score per image token, in image-token order: Qwen3-VL's runs of 4
    consecutive patches; Gemma3's and InternVL's row-major 2 x 2 blocks of each unit's 4 x 4 patch grid; Mistral3's
    row-major 2 x 2 blocks of each image's (H/7) x (W/7) grid, the images one after the other in the row."""
    if family == "mistral3":
        patches = torch.cat(units)
        grids = [(h // 7, w // 7) for h, w in image_sizes.tolist()]
        return torch.cat([image.reshape(h // 2, 2, w // 2, 2).sum(dim=(1, 3)).flatten()
                          for (h, w), image in zip(grids, patches.split([h * w for h, w in grids]))])
    if family == "qwen3_vl":
        return torch.cat(units).reshape(-1, 4).sum(dim=-1)
    units = torch.stack(units)
    side = int(units.shape[1] ** 0.5)
    return units.reshape(-1, side // 2, 2, side // 2, 2).sum(dim=(2, 4)).flatten()


def images(model, inputs):
    """Each image's image-token positions, in batch order: runs split at non-image tokens; Mistral3's rows of image
    tokens are broken by ``[IMG_BREAK]``: (H/14) x (W/14) tokens per image, in order."""
    found = []
    for row in inputs["input_ids"] == model.config.image_token_id:
        where = row.nonzero().flatten()
        found += [run for run in torch.tensor_split(where, ((where.diff() != 1).nonzero().flatten() + 1).tolist())]
    if "image_sizes" in inputs:
        counts = [h // 14 * (w // 14) for h, w in inputs["image_sizes"].tolist()]
        rows = [row.nonzero().flatten() for row in inputs["input_ids"] == model.config.image_token_id]
        found, counts = [], iter(counts)
        for where in rows:
            while where.numel():
                count = next(counts)
                found.append(where[:count])
                where = where[count:]
    return found


def readouts_seen(model, family, inputs, **options):
    """What PAINT's read-outs store during one forward."""
    captured = {}
    readout = paint.ClsRows if family == "internvl" else paint.ReceivedAttention
    original = readout.observe

    def spy(self, call):
        original(self, call)
        captured.update({key: list(value) for key, value in self.store.items() if key != "image_inputs"})

    readout.observe = spy
    try:
        with nograd.apply(model, "paint", **options), torch.no_grad():
            model(**inputs)
    finally:
        readout.observe = original
    return captured


@pytest.mark.parametrize("family", FAMILIES)
def test_readouts_fold_and_selection_equal_an_independent_reference(family):
    model = tiny_families.build(family)
    inputs = tiny_families.make_inputs(family, model, seed=SEED[family])
    want = eager_patch_scores(model, family, inputs, [0, 1])
    # images (Gemma3, Qwen3-VL), tiles (InternVL), the tower's one sequence of all images (Mistral3)
    units = {"gemma3": 3, "qwen3_vl": 2, "internvl": 5, "mistral3": 1}[family]
    assert len(want[0]) == len(want[1]) == units
    store = readouts_seen(model, family, inputs)
    for key, layer in (("local", 0), ("summary", 1)):
        assert len(store[key]) == units
        # Mistral3's one sequence of all images: a patch's mean received attention is over the queries that see it,
        # its own image's (the block-diagonal mask hides the others)
        expected_units = [torch.cat(want[("own", layer)])] if family == "mistral3" else want[layer]
        for got, expected in zip(store[key], expected_units):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    adapter = adapter_for(model)
    assert adapter.vision_feature_layer == 1 and adapter.vision_full_attention_layers == [0, 1]
    sizes = inputs.get("image_sizes")
    torch.testing.assert_close(adapter.patch_scores_to_tokens(want[1], {"image_sizes": sizes}),
                               folded(want[1], family, sizes), atol=1e-6, rtol=0)

    where = images(model, inputs)
    counts = [len(p) for p in where]
    if family == "mistral3":  # the selection is per image, from its own queries' mean
        want = {layer: want[("own", layer)] for layer in (0, 1)}
    local_scores, summary_scores = (folded(want[layer], family, sizes).split(counts) for layer in (0, 1))
    names, saved = attn_names(model), snapshot(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "paint", layers=(0, None), local_ratio=0.5) as handle:
        with torch.no_grad():
            got = model(**inputs).logits
        selection = handle.stats["selection"]
        assert len(selection) == len(where)
        for chosen, positions, local_score, summary_score in zip(selection, where, local_scores, summary_scores):
            local, summary = select_tokens(local_score, summary_score, 0.5)
            assert sorted(chosen["local"].tolist()) == sorted(positions[local].tolist())
            assert sorted(chosen["summary"].tolist()) == sorted(positions[summary].tolist())
        assert all(len(s["local"]) >= 1 for s in selection) and any(len(s["summary"]) for s in selection)
        kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    real = inputs["attention_mask"].bool()
    assert (got - plain)[real].abs().max() > 1e-4
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert attn_names(model) == names and same_state(model, saved) and nograd.attached(model) == []
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


def test_internvl_spatial_stream_is_the_received_attention_folded_per_tile():
    """The spatial stream on a CLS tower: each tile's patches' received attention (CLS left out), folded by
    ``pixel_shuffle``, joined to the local tokens of its image."""
    model = tiny_families.build("internvl")
    inputs = tiny_families.make_inputs("internvl", model)
    want = eager_patch_scores(model, "internvl", inputs, [0, 1], spatial=True)
    where = images(model, inputs)
    sizes = [len(p) for p in where]
    scores = {key: folded(want[layer], "internvl").split(sizes)
              for key, layer in (("local", 0), ("summary", 1), ("spatial", "spatial"))}
    with nograd.apply(model, "paint", spatial_ratio=0.5) as handle, torch.no_grad():
        model(**inputs)
        selection = handle.stats["selection"]
    for index, (chosen, positions) in enumerate(zip(selection, where, strict=True)):
        local, summary = select_tokens(scores["local"][index], scores["summary"][index], 0.25,
                                       scores["spatial"][index], 0.5)
        assert sorted(chosen["local"].tolist()) == sorted(positions[local].tolist())
        assert sorted(chosen["summary"].tolist()) == sorted(positions[summary].tolist())
    assert len(selection[0]["local"]) + len(selection[0]["summary"]) > 12 // 4  # the 3-tile image: more than local


def test_zero_margins_are_bit_identical_on_gemma3():
    """alpha = beta = 0: no read-out, no edit; the logits are the model's own bit for bit."""
    model = tiny_families.build("gemma3")
    inputs = tiny_families.make_inputs("gemma3", model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "paint", alpha=0.0, beta=0.0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


@pytest.mark.parametrize("family", ["qwen3_vl", "mistral3"])
def test_a_flash_vision_tower_that_packs_the_images_is_refused(family):
    """Flash attention runs all images of Qwen3-VL's or Pixtral's tower as one packed call (``cu_seqlens``):
    refused before anything is attached."""
    from nograd.errors import UnsupportedModelError

    model = tiny_families.build(family)
    vision = model.config.vision_config
    before = vision._attn_implementation
    vision._attn_implementation = "flash_attention_2"  # (the config only: nothing runs)
    try:
        with pytest.raises(UnsupportedModelError, match="flash"):
            nograd.apply(model, "paint")
        assert nograd.attached(model) == []
    finally:
        vision._attn_implementation = before


def test_qwen3_vl_image_free_refine_runs_with_the_kv_cache():
    """``cfg_gamma`` on Qwen3-VL: the first step is the written-out refine (z_c from the unedited prompt, as the
    official code edits from the first generated token on; z_u from the plain model on the prompt without its image
    tokens and their ``<|vision_start|>`` / ``<|vision_end|>``), and generate with the KV cache equals it without
    (the image-free copy must not use the image prompt's M-RoPE offsets, which the model keeps)."""
    import math

    model = tiny_families.build("qwen3_vl")
    inputs = tiny_families.make_inputs("qwen3_vl", model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    markers = torch.tensor(adapter_for(model).visual_marker_ids)
    keep = mask.bool() & (inputs["mm_token_type_ids"] == 0) & ~torch.isin(ids, markers)
    rows = [row[k] for row, k in zip(ids, keep)]
    text = torch.zeros(len(rows), max(len(r) for r in rows), dtype=ids.dtype)
    text_mask = torch.zeros_like(text)
    for index, row in enumerate(rows):
        text[index, text.shape[1] - len(row):], text_mask[index, text.shape[1] - len(row):] = row, 1
    with torch.no_grad():
        z_u = model(input_ids=text, attention_mask=text_mask, mm_token_type_ids=torch.zeros_like(text)).logits[:, -1]
    with torch.no_grad():
        z_c = model(**inputs).logits[:, -1]
    z_c, z_u = z_c.float().log_softmax(-1), z_u.float().log_softmax(-1)
    z = (1.1 * (z_c - z_u) + z_u).masked_fill(z_c < math.log(0.1) + z_c.amax(-1, keepdim=True), -math.inf)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with nograd.apply(model, "paint", layers=(0, None), cfg_gamma=1.1):
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    finite = torch.isfinite(z)
    assert torch.equal(torch.isfinite(cached.scores[0]), finite)
    torch.testing.assert_close(cached.scores[0][finite], z[finite], atol=1e-4, rtol=0)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-5, rtol=0)
    assert model.model.rope_deltas is not None
