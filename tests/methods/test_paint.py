"""PAINT: token selection (unit facts), the vision read-out against eager attentions, equality with an independent
dense re-implementation of the official edit, generate, restore, refusals."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import nograd
from checks import attention_function, attn_names, same_state, snapshot
from nograd.methods.paint import select_tokens, tukey_outliers
from tiny.vlm import make_inputs



def test_tukey_outliers_match_numpy_percentiles():
    scores = torch.cat([torch.linspace(0, 1, 40), torch.tensor([5.0, 9.0, 3.0])])
    q1, q3 = np.percentile(scores.numpy(), [25, 75])
    expected = set(np.nonzero(scores.numpy() > q3 + 1.5 * (q3 - q1))[0].tolist())
    got = tukey_outliers(scores)
    assert set(got.tolist()) == expected == {40, 41, 42} and got.tolist() == [41, 40, 42]


def test_selection_counts_and_disjointness():
    g = torch.Generator().manual_seed(0)
    local_scores, summary_scores = torch.rand(64, generator=g), torch.rand(64, generator=g)
    summary_scores[[3, 9]] = 10.0
    local_scores[[3, 9]] = 5.0  # the two summary tokens are also the two best local ones
    local, summary = select_tokens(local_scores, summary_scores, 0.25)
    assert set(summary.tolist()) == {3, 9}
    assert len(local) == math.floor(64 * 0.25) - 2 and not set(local.tolist()) & {3, 9}
    assert set(local.tolist()) <= set(local_scores.topk(16).indices.tolist())


def eager_tower_attentions(model, pixel_values):
    """Every vision layer's attention, from eager ``output_attentions`` (the tower's implementation put back)."""
    tower = model.model.vision_tower
    before = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(pixel_values, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation(before)


def cls_rows(model, pixel_values):
    """CLS->patch attention, summed over heads, of every vision layer, from eager ``output_attentions``."""
    return [a[:, :, 0, 1:].sum(1) for a in eager_tower_attentions(model, pixel_values)]


def tower_features(model, pixel_values):
    with torch.no_grad():
        return model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]


def scores_seen_by_the_method(model, inputs):
    """The CLS scores PAINT's read-outs store during one forward, and the tower output during it."""
    from nograd.methods import paint

    captured = {}

    def spy(self, call):
        original(self, call)
        captured.update(self.store)

    readout = paint.ClsRows if model.config.model_type == "llava" else paint.ReceivedAttention
    original = readout.observe
    readout.observe = spy
    try:
        with nograd.apply(model, "paint"):
            assert model.config.vision_config._attn_implementation.startswith("nograd_")
            with torch.no_grad():
                model(**inputs)
            features = tower_features(model, inputs["pixel_values"]) if model.config.model_type == "llava" else None
    finally:
        readout.observe = original
    return captured, features


def test_readout_equals_eager_attentions_and_leaves_the_tower_unchanged(build):
    model = build("llava")
    inputs = make_inputs("llava", model)
    plain_features = tower_features(model, inputs["pixel_values"])
    store, features = scores_seen_by_the_method(model, inputs)
    assert torch.equal(features, plain_features)
    rows = cls_rows(model, inputs["pixel_values"])
    torch.testing.assert_close(store["local"], rows[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(store["summary"], rows[len(rows) - 2], atol=1e-6, rtol=0)


def official_paint(margins, prompt_end, layers):
    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
        scores = (query.float() @ key.transpose(-1, -2)) * scaling + attention_mask.float()
        if module.layer_idx in layers:
            n, m = key.shape[2], query.shape[2]
            rows = torch.arange(m) + n - m
            edit = torch.nn.functional.pad(margins, (0, n - margins.shape[1]))[:, None, None, :]
            on = (rows[None, :] >= prompt_end[:, None])[:, None, :, None]
            scores = torch.where(on, scores + edit * scores.abs(), scores)
        out = scores.softmax(-1) @ value
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def test_equals_the_official_edit_with_an_independent_selection(build):
    model = build("llava")
    inputs = make_inputs("llava", model)
    alpha, beta, ratio = 0.9, 0.5, 0.25
    rows = cls_rows(model, inputs["pixel_values"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    margins = torch.zeros(ids.shape)
    image_index = 0
    for row in range(ids.shape[0]):
        positions = ((ids[row] == model.config.image_token_id) & mask[row]).nonzero().flatten()
        for start in range(0, len(positions), 16):
            local_scores, summary_scores = rows[0][image_index], rows[len(rows) - 2][image_index]
            q1, q3 = np.percentile(summary_scores.numpy(), [25, 75])
            summary = set(np.nonzero(summary_scores.numpy() > q3 + 1.5 * (q3 - q1))[0].tolist())
            local = [p for p in local_scores.topk(math.floor(16 * ratio)).indices.tolist() if p not in summary]
            margins[row, positions[start:start + 16][local]] = alpha
            margins[row, positions[start:start + 16][sorted(summary)]] = beta
            image_index += 1
    prompt_end = torch.where(mask, torch.arange(ids.shape[1]), -1).amax(1)
    with attention_function(model, official_paint(margins, prompt_end, {0, 1}), "text_config"), torch.no_grad():
        expected = model(**inputs).logits
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "paint", alpha=alpha, beta=beta, local_ratio=ratio, layers=(0, None)) as handle:
        with torch.no_grad():
            got = model(**inputs).logits
        assert handle.stats["local_tokens"] and len(handle.stats["local_tokens"]) == image_index
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    assert (got - plain)[mask].abs().max() > 1e-4


def test_generate_and_restore(build):
    model = build("llava")
    inputs = make_inputs("llava", model)
    names, saved = attn_names(model), snapshot(model)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(**inputs, **kwargs)
    with nograd.apply(model, "paint", layers=(0, None)):
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert attn_names(model) == names and same_state(model, saved)
    assert all(torch.equal(a, b) for a, b in zip(model.generate(**inputs, **kwargs).scores, plain.scores))


def test_zero_margins_are_bit_identical(build):
    model = build("llava")
    inputs = make_inputs("llava", model)
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "paint", alpha=0, beta=0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


def test_zero_gain_heads_are_untouched_and_others_change(build):
    model = build("llava")
    inputs = make_inputs("llava", model)
    layer = model.model.language_model.layers[1].self_attn
    seen = {}
    hook = layer.o_proj.register_forward_pre_hook(lambda module, args: seen.__setitem__("heads", args[0]))
    try:
        with torch.no_grad():
            model(**inputs)
        plain = seen["heads"][:, -1].reshape(2, 4, -1)
        gains = torch.tensor([[0.0, 1.0, 0.0, 2.0]] * 2)
        with nograd.apply(model, "paint", layers=(1, None), heads=gains), torch.no_grad():
            model(**inputs)
        edited = seen["heads"][:, -1].reshape(2, 4, -1)
    finally:
        hook.remove()
    for head in (0, 2):
        assert torch.equal(edited[:, head], plain[:, head])
    for head in (1, 3):
        assert (edited[:, head] - plain[:, head]).abs().max() > 1e-5


def eager_visual_share(model, inputs):
    """(L, H): the image's share of the prompt's last row per head, from eager ``output_attentions``."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    image = (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()
    return torch.stack([(a[:, :, -1] * image[:, None, :]).sum(-1).mean(0) for a in attentions])


def test_measured_visual_shares_equal_eager_attentions_and_round_trip(build, tmp_path):
    """Layer 1 is the first edited layer, so its input is the plain model's: its measured shares must equal eager
    attention exactly; layers that are not edited are not measured (NaN in the file)."""
    model = build("llava")
    inputs = make_inputs("llava", model)
    want = eager_visual_share(model, inputs)
    path = str(tmp_path / "heads.safetensors")
    with nograd.apply(model, "paint", layers=(1, None), heads="proportional") as handle:
        with torch.no_grad():
            model(**inputs)
        handle.save_head_stats(path)
    from safetensors.torch import load_file

    saved = load_file(path)["visual_share"]
    assert torch.isnan(saved[0]).all()
    torch.testing.assert_close(saved[1], want[1], atol=1e-6, rtol=0)
    gains = (want / want.mean(-1, keepdim=True)).clamp(0, 2)
    with nograd.apply(model, "paint", layers=(1, None), heads="proportional", head_stats=path) as handle:
        with torch.no_grad():
            from_stats = model(**inputs).logits
        assert handle.stats["heads_modulated"] == handle.stats["heads_edited"] == {1: [4, 4]}  # each row's count
    with nograd.apply(model, "paint", layers=(1, None), heads=gains) as handle, torch.no_grad():
        from_table = model(**inputs).logits
        assert handle.stats["heads_modulated"] == handle.stats["heads_edited"] == {1: [4, 4]}  # a table's too
    torch.testing.assert_close(from_stats, from_table, atol=1e-6, rtol=0)
    table = torch.tensor([[1.0, 0.0, 2.0, 1.0]] * gains.shape[0])
    with nograd.apply(model, "paint", layers=(1, None), heads=table) as handle, torch.no_grad():
        model(**inputs)
        assert handle.stats["heads_edited"] == {1: [3, 3]} and handle.stats["heads_modulated"] == {1: [1, 1]}


def test_zero_margins_calibrate_on_the_plain_model(build, tmp_path):
    """Spec §5.4: calibration runs with the coefficients zero, so every layer's shares are the plain model's (with
    the edit on, a layer's input carries the earlier layers' edits); the outputs stay bit-identical."""
    model = build("llava")
    inputs = make_inputs("llava", model)
    want = eager_visual_share(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
    path = str(tmp_path / "heads.safetensors")
    with nograd.apply(model, "paint", alpha=0, beta=0, layers=(0, None), heads="proportional") as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, plain)
        handle.save_head_stats(path)
        assert handle.stats["layers"] == [] and handle.stats["edited_calls"] == 0
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(path)["visual_share"], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("options, words", [
    ({"heads": "loud"}, ["heads", "'uniform'"]),
    ({"heads": [[1.0, 1.0]]}, ["heads", "(2, 4)"]),
    ({"head_ratio": 0}, ["head_ratio"]),
    ({"head_stats": torch.ones(3, 3), "heads": "proportional"}, ["head_stats", "(2, 4)"]),
    ({"head_stats": torch.ones(2, 4)}, ["head_stats", "'proportional'"]),  # ignored under heads='uniform'
    ({"head_stats": torch.ones(2, 4), "heads": [[1.0] * 4] * 2}, ["head_stats", "'topk'"]),
])
def test_bad_head_options(build, options, words):
    model = build("llava")
    names = attn_names(model)
    with pytest.raises((ValueError, TypeError)) as info:
        nograd.apply(model, "paint", **options)
    assert all(word in str(info.value) for word in words) and attn_names(model) == names


def received_attention_reference(model, inputs, blocks):
    """Qwen2-VL: each image's received attention (mean over queries and heads) in ``blocks``, from an eager
    re-computation of every per-image vision attention call."""
    recorded = {block: [] for block in blocks}
    modules = {id(model.model.visual.blocks[b].attn): b for b in blocks}
    # every block through the reference; only the listed ones record

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        weights = ((query.float() @ key.float().transpose(-1, -2)) * scaling).softmax(-1)
        if id(module) in modules:
            recorded[modules[id(module)]].append(weights.mean(dim=(1, 2))[0])
        return (weights @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), None

    with attention_function(model, attention, "vision_config"), torch.no_grad():
        model(**inputs)
    return recorded


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_received_attention_and_token_selection(build, family):
    """Qwen towers: the read-outs equal an eager re-computation of each per-image attention call in the
    full-attention blocks; the token scores put Qwen2.5-VL's window order back (transformers' own window index)."""
    from transformers.vision_utils import get_vision_window_index

    model = build(family)
    inputs = make_inputs(family, model)
    visual = model.model.visual
    full = list(getattr(model.config.vision_config, "fullatt_block_indexes", None) or range(len(visual.blocks)))
    want = received_attention_reference(model, inputs, sorted({full[0], full[-1]}))
    store, _ = scores_seen_by_the_method(model, inputs)
    for key, block in (("local", full[0]), ("summary", full[-1])):
        assert len(store[key]) == len(want[block]) == inputs["image_grid_thw"].shape[0]
        for got, expected in zip(store[key], want[block]):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    merge = model.config.vision_config.spatial_merge_size ** 2

    def token_scores(per_image):
        units = torch.cat(per_image).reshape(-1, merge).sum(-1)
        if family == "qwen2_5_vl":
            order, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=visual.spatial_merge_size,
                                               window_size=visual.window_size, patch_size=visual.patch_size)
            tokens = torch.empty_like(units)
            tokens[order] = units
            units = tokens
        return units.split([len(p) // merge for p in per_image])

    image = inputs["input_ids"] == model.config.image_token_id
    image_positions = [row.nonzero().flatten() for row in image]  # one image per row in these inputs
    expected = [select_tokens(local, summary, 0.5)
                for local, summary in zip(token_scores(want[full[0]]), token_scores(want[full[-1]]))]
    with nograd.apply(model, "paint", layers=(0, None), local_ratio=0.5) as handle:
        with torch.no_grad():
            model(**inputs)
        selection = handle.stats["selection"]
        assert len(selection) == len(expected) == len(image_positions)
        for chosen, (local, summary), where in zip(selection, expected, image_positions):
            assert sorted(chosen["local"].tolist()) == sorted(where[local].tolist())
            assert sorted(chosen["summary"].tolist()) == sorted(where[summary].tolist())
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, use_cache=False)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_spatial_stream_joins_local_and_leaves_summary_out():
    local_scores = torch.tensor([9.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    spatial_scores = torch.tensor([0.0, 9.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0])
    summary_scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 50.0])
    local, summary = select_tokens(local_scores, summary_scores, 0.25, spatial_scores, 0.25)
    assert summary.tolist() == [7] and sorted(local.tolist()) == [0, 1, 3]
    local, _ = select_tokens(local_scores, summary_scores, 0.25)
    assert sorted(local.tolist()) == [0, 1]


def test_spatial_scores_are_the_attention_patches_receive_in_the_first_layer(build):
    model = build("llava")
    inputs = make_inputs("llava", model)
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        first = tower(inputs["pixel_values"], output_attentions=True).attentions[0]
    tower.set_attn_implementation("sdpa")
    received = first.mean(dim=(1, 2))[:, 1:]
    rows = cls_rows(model, inputs["pixel_values"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    chunks = ((ids == model.config.image_token_id) & mask).nonzero()[:, 1].split(16)  # one image per 16 tokens
    expected = []
    for index, where in enumerate(chunks):
        local, summary = select_tokens(rows[0][index], rows[len(rows) - 2][index], 0.25, received[index], 0.25)
        expected.append((sorted(where[local].tolist()), sorted(where[summary].tolist())))
    with nograd.apply(model, "paint", spatial_ratio=0.25) as handle, torch.no_grad():
        model(**inputs)
        got = [(sorted(s["local"].tolist()), sorted(s["summary"].tolist())) for s in handle.stats["selection"]]
    assert got == expected
    assert any(len(local) > math.floor(16 * 0.25) - len(summary) for local, summary in got)


# ---- LLaVA-NeXT / LLaVA-OneVision: tiled towers ------------------------------------------------------------------
ANYRES = ["llava_next", "llava_onevision"]


def crop_grid(size, pinpoints, tile):
    """(rows, cols) of crop tiles of an image of ``size`` (H, W): the pinpoint that keeps the most of the image after
    an aspect-preserving downscale, then wastes the least (LLaVA-NeXT's ``select_best_resolution``), in tiles."""
    height, width = size
    best, best_key = None, None
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(pin_height * pin_width - effective))
        if best_key is None or key > best_key:
            best, best_key = (pin_height, pin_width), key
    return best[0] // tile, best[1] // tile


def unpad(raster, size):
    """Cut the processor's padding off a (rows, cols) raster of an image of ``size`` (H, W), centred."""
    height, width = size
    rows, cols = raster.shape
    if width / height > cols / rows:
        padding = (rows - int(round(height * cols / width, 7))) // 2
        return raster[padding:rows - padding]
    padding = (cols - int(round(width * rows / height, 7))) // 2
    return raster[:, padding:cols - padding]


def anyres_images(model, inputs):
    """Per image, in batch order: (tower tiles, size, (rows, cols) of crops; (0, 0) for an image left unsplit)."""
    config = model.config
    counts = inputs.get("batch_num_images")
    split = [True] * len(inputs["image_sizes"]) if counts is None else [int(n) == 1 for n in counts for _ in range(n)]
    images = []
    for pixels, size, tiles in zip(inputs["pixel_values"], inputs["image_sizes"].tolist(), split):
        rows, cols = crop_grid(size, config.image_grid_pinpoints, config.vision_config.image_size) if tiles else (0, 0)
        images.append((pixels[:1 + rows * cols], size, (rows, cols)))
    return images


def packed_scores(tile_scores, size, grid, side, aspect):
    """One image's LLM tokens as transformers packs them (the base tile's patches; then the crops stitched into one
    raster, unpadded, OneVision: bilinearly shrunk to at most ``anyres_max_<n>`` tiles' area, a newline after each
    raster row; an unsplit image: the base and one newline): (the patch scores of its non-newline tokens in token
    order, their offsets among the image's tokens, its token count)."""
    base = tile_scores[0]
    rows, cols = grid
    if rows == 0:
        return base, torch.arange(side * side), side * side + 1
    raster = tile_scores[1:].reshape(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
    raster = unpad(raster, size)
    if aspect is not None:
        height, width = raster.shape
        ratio = math.sqrt(height * width / (int(aspect.removeprefix("anyres_max_")) * side * side))
        if ratio > 1.1:
            raster = torch.nn.functional.interpolate(raster[None, None], [int(height // ratio), int(width // ratio)],
                                                     mode="bilinear")[0, 0]
    height, width = raster.shape
    crop_offsets = side * side + torch.arange(height)[:, None] * (width + 1) + torch.arange(width)[None, :]
    return (torch.cat([base, raster.flatten()]), torch.cat([torch.arange(side * side), crop_offsets.flatten()]),
            side * side + height * (width + 1))


def tower_scores(model, pixels):
    """Per tile (tiles, patches): local, summary and spatial scores from the tower's eager attentions: the CLS row
    summed over heads (CLIP), or the attention each patch receives, mean over queries and heads (SigLIP, no CLS)."""
    attentions = eager_tower_attentions(model, pixels)
    feature = len(attentions) + model.config.vision_feature_layer  # hidden_states[-k] is the output of layer L-k
    cls = model.config.vision_config.model_type == "clip_vision_model"
    if cls:
        local, summary = attentions[0][:, :, 0, 1:].sum(1), attentions[feature][:, :, 0, 1:].sum(1)
    else:
        local, summary = attentions[0].mean(dim=(1, 2)), attentions[feature].mean(dim=(1, 2))
    return local, summary, attentions[0].mean(dim=(1, 2))[:, int(cls):]


def reference_selection(local_scores, summary_scores, ratio, spatial_scores=None, spatial_ratio=0.0):
    """Tukey outliers by numpy percentiles; the top floor(N * ratio) local (joined with the spatial top), less them."""
    q1, q3 = np.percentile(summary_scores.numpy(), [25, 75])
    summary = set(np.nonzero(summary_scores.numpy() > q3 + 1.5 * (q3 - q1))[0].tolist())
    local = local_scores.topk(math.floor(len(local_scores) * ratio)).indices.tolist()
    if spatial_ratio:
        local += [p for p in spatial_scores.topk(math.floor(len(local_scores) * spatial_ratio)).indices.tolist()
                  if p not in local]
    return sorted(p for p in local if p not in summary), sorted(summary)


def anyres_reference(model, inputs, ratio, spatial_ratio=0.0):
    """Per image: (batch row, local positions, summary positions), all from an independent read-out and packing."""
    images = anyres_images(model, inputs)
    local, summary, spatial = tower_scores(model, torch.cat([pixels for pixels, _, _ in images]))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    aspect = getattr(model.config, "vision_aspect_ratio", None)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_positions = [((row == model.config.image_token_id) & real).nonzero().flatten() for row, real in zip(ids, mask)]
    counts = inputs.get("batch_num_images", torch.ones(len(ids), dtype=torch.long)).tolist()
    expected, tile, image = [], 0, 0
    for row, positions in enumerate(image_positions):
        start = 0
        for _ in range(counts[row]):
            pixels, size, grid = images[image]
            n = len(pixels)
            scores = [packed_scores(s[tile:tile + n], size, grid, side, aspect) for s in (local, summary, spatial)]
            (local_tokens, offsets, length), (summary_tokens, _, _), (spatial_tokens, _, _) = scores
            where = positions[start:start + length][offsets]
            chosen_local, chosen_summary = reference_selection(local_tokens, summary_tokens, ratio, spatial_tokens,
                                                               spatial_ratio)
            expected.append((row, where[chosen_local].tolist(), where[chosen_summary].tolist()))
            tile, image, start = tile + n, image + 1, start + length
        assert start == len(positions)  # the reference packing fills each row's image tokens exactly
    assert tile == sum(len(pixels) for pixels, _, _ in images) and image == len(images)
    return expected


def selection_of(handle):
    return [(s["batch_row"], sorted(s["local"].tolist()), sorted(s["summary"].tolist()))
            for s in handle.stats["selection"]]


@pytest.mark.parametrize("spatial_ratio", [0.0, 0.25])
@pytest.mark.parametrize("family", ANYRES)
def test_anyres_selection_and_edit_equal_an_independent_reference(build, family, spatial_ratio):
    """Scores from eager tower attentions on every tile, packed by hand (unpad, OneVision's bilinear shrink,
    newlines dropped), selected per image; the logits equal the dense reference edit on those positions."""
    model = build(family)
    inputs = make_inputs(family, model)
    alpha, beta, ratio = 0.9, 0.5, 0.25
    expected = anyres_reference(model, inputs, ratio, spatial_ratio)
    assert any(summary for _, _, summary in expected) and all(local for _, local, _ in expected)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    margins = torch.zeros(ids.shape)
    for row, local, summary in expected:
        margins[row, local], margins[row, summary] = alpha, beta
    prompt_end = torch.where(mask, torch.arange(ids.shape[1]), -1).amax(1)
    with attention_function(model, official_paint(margins, prompt_end, {0, 1}), "text_config"), torch.no_grad():
        want = model(**inputs).logits
    with torch.no_grad():
        plain = model(**inputs).logits
    with nograd.apply(model, "paint", alpha=alpha, beta=beta, local_ratio=ratio, spatial_ratio=spatial_ratio,
                      layers=(0, None)) as handle:
        with torch.no_grad():
            got = model(**inputs).logits
        assert selection_of(handle) == [(row, sorted(local), sorted(summary)) for row, local, summary in expected]
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert (got - plain)[mask].abs().max() > 1e-4


def test_the_anyres_reference_packing_counts_the_models_tokens(build):
    """The facts the references above rely on, against the models' own image token counts: the tiny inputs split
    NeXT's images (one unpadded to 2 of 4 raster rows), shrink OneVision's first crop raster (``anyres_max_1``: 4x3
    tokens, not the 8x6 unpadded patches) and leave its multi-image row unsplit (a base tile and a newline each)."""
    side = 4
    for family, unsplit in (("llava_next", []), ("llava_onevision", [1, 2])):
        model = build(family)
        inputs = make_inputs(family, model)
        images = anyres_images(model, inputs)
        with torch.no_grad():
            counts = [len(f) for f in model.model.get_image_features(**{k: v for k, v in inputs.items()
                                                                        if k not in ("input_ids", "attention_mask")}
                                                                     ).pooler_output]
        aspect = getattr(model.config, "vision_aspect_ratio", None)
        lengths = [packed_scores(torch.zeros(len(pixels), side * side), size, grid, side, aspect)[2]
                   for pixels, size, grid in images]
        assert lengths == counts
        assert [i for i, (_, _, grid) in enumerate(images) if grid == (0, 0)] == unsplit
    assert counts[0] == side * side + 4 * (3 + 1)  # OneVision's first image: unpadded 8x6, shrunk to 4x3


@pytest.mark.parametrize("family", ANYRES)
def test_anyres_generate_equals_the_forward_path(build, family):
    """generate() encodes the images before the prefill and pops image_sizes: the selection it uses (from the
    observed get_image_features call) is the forward path's, and its cached greedy steps equal an uncached loop of
    full forwards (every image input given)."""
    model = build(family)
    inputs = make_inputs(family, model)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(**inputs, **kwargs)
    image_inputs = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    with nograd.apply(model, "paint", alpha=0.9, beta=0.5, local_ratio=0.5, layers=(0, None)) as handle:
        with torch.no_grad():
            model(**inputs)
        forward = selection_of(handle)
        handle.stats["selection"] = []
        out = model.generate(**inputs, **kwargs)
        assert selection_of(handle) == forward and forward
        seq, mask = inputs["input_ids"], inputs["attention_mask"]
        for step in range(3):
            with torch.no_grad():
                logits = model(input_ids=seq, attention_mask=mask, use_cache=False, **image_inputs).logits[:, -1]
            torch.testing.assert_close(out.scores[step], logits, atol=1e-5, rtol=0)
            token = logits.argmax(-1, keepdim=True)
            assert torch.equal(token[:, 0], out.sequences[:, seq.shape[1]])
            seq, mask = torch.cat([seq, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        assert selection_of(handle) == forward
    assert (out.scores[0] - plain.scores[0]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ANYRES)
def test_anyres_zero_margins_are_bit_identical_and_remove_restores(build, family):
    model = build(family)
    inputs = make_inputs(family, model)
    names, saved = attn_names(model), snapshot(model)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model(**inputs).logits
    plain_out = model.generate(**inputs, **kwargs)
    with nograd.apply(model, "paint", alpha=0, beta=0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    with nograd.apply(model, "paint", layers=(0, None)), torch.no_grad():
        assert "get_image_features" in vars(model.model)
        assert not torch.equal(model(**inputs).logits, plain)
    assert "get_image_features" not in vars(model.model)
    assert attn_names(model) == names and same_state(model, saved)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    out = model.generate(**inputs, **kwargs)
    assert torch.equal(out.sequences, plain_out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, plain_out.scores))


def test_onevision_video_frames_leave_the_image_selection_alone(build):
    """OneVision's video frames run through the same tower after the images: the selection of a prompt with a video
    after its images is the one without it (the image positions are the same), in forward and generate."""
    from tiny.vlm import VIDEO

    model = build("llava_onevision")
    inputs = make_inputs("llava_onevision", model)
    videos = torch.randn(2, 2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        count = model.model.get_video_features(videos).pooler_output.shape[1]
    if "image_newline" not in inspect.getsource(type(model.model).get_video_features):
        count += 1  # transformers < 5.24 appends the newline in the forward, not in get_video_features
    with_video = dict(inputs, pixel_values_videos=videos,
                      input_ids=torch.cat([inputs["input_ids"], torch.full((2, count), VIDEO)], 1),
                      attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, count, dtype=torch.long)], 1))
    with nograd.apply(model, "paint", local_ratio=0.5, layers=(0, None)) as handle, torch.no_grad():
        model(**inputs)
        alone = selection_of(handle)
    runs = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda module, args: runs.append(args[0].shape[0]))
    try:
        with nograd.apply(model, "paint", local_ratio=0.5, layers=(0, None)) as handle:
            with torch.no_grad():
                model(**with_video)
            assert selection_of(handle) == alone and runs == [7, 4]  # 5 + 1 + 1 image tiles, then 2 x 2 frames
            handle.stats["selection"] = []
            model.generate(**with_video, max_new_tokens=2, do_sample=False)
            assert selection_of(handle) == alone and runs == [7, 4, 7, 4]
    finally:
        hook.remove()
