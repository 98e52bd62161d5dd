"""PyramidDrop and FastV on Idefics3 / SmolVLM, InternVL-hf, Mistral3, Qwen3-VL and Gemma3 (tiny random models, 8
decoder layers):
keeping everything is bit-identical, ``generate()`` (KV cache, a left-padded batch of 2) equals the reference that
physically removes the dropped tokens (``drop_reference.py``, shared with ``test_pyramiddrop.py``), only image tokens
are dropped (never Idefics3's ``<fake_token_around_image>`` / ``<row_r_col_c>`` / ``<global-img>`` tags, InternVL's
``<img>`` ``</img>`` or Mistral3's ``[IMG_BREAK]`` ``[IMG_END]``) and as many as the schedule says, the KV-cache
saving in the stats is the one measured on the caches, and ``remove()`` restores the model bit for bit.

Qwen3-VL runs with every boundary after its deepstack layers: ``qwen3_vl`` has one (deepstack after vision block 0:
features added to decoder layer 0's output), ``qwen3_vl_deep`` two (vision blocks 0 and 1: layers 0 and 1), so its
boundary 2 is the earliest allowed; the reference adds the deepstack features as the decoder does. Compact positions
(M-RoPE) and a boundary at or before the last deepstack layer are refused, naming the option, the model untouched.
Gemma3 alternates sliding-window (``SLIDING_WINDOW`` 6, layers 0, 2, 4, 6) and full-attention layers, so every stage
has both; its image tokens see each other bidirectionally within an image (``token_type_ids``), and its prompts (12
and 18 real tokens, 4 image tokens per image) are longer than the window. The reference gives each layer its type's
mask and RoPE over the physically reduced rows; the default cache's sliding layers hold the last ``SLIDING_WINDOW - 1``
keys, which the lengths and the measured KV saving account for."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import same_state, snapshot
from drop_reference import assert_generate_equals_physical_removal, decoder, generate, visual_counts
from nograd.methods.drop_schedule import DropSchedule
from nograd.patches import adapter_for
from tiny import vlm as tiny_vlm
from tiny import vlm_families as tiny_families
from tiny.vlm import IMAGE

LAYERS = 8
SCHEDULE = dict(boundaries=[2, 4, 6], keep=[0.5, 0.25, 0.125])
PLAN = DropSchedule(LAYERS, (2, 4, 6), (0.5, 0.25, 0.125))
FAMILIES = ["idefics3", "smolvlm", "internvl", "mistral3", "qwen3_vl", "qwen3_vl_deep", "gemma3"]
"""smolvlm: the "idefics3" adapter family, its own classes; qwen3_vl_deep: Qwen3-VL with two deepstack layers."""
QWEN3 = ("qwen3_vl", "qwen3_vl_deep")
OPTIONS = {"pyramiddrop": SCHEDULE, "fastv": dict(layer=2, keep=0.5)}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            if family == "qwen3_vl_deep":
                model = build_qwen3_vl_deep(seed=1)
                cache[family] = model, tiny_families.make_inputs("qwen3_vl", model)
            elif family == "gemma3":
                model = build_gemma3(seed=1)
                cache[family] = model, tiny_families.make_inputs(family, model)
            elif family in tiny_vlm.BUILDERS:
                model = tiny_vlm.BUILDERS[family](seed=1, attn_implementation="sdpa", text_layers=LAYERS)
                cache[family] = model, tiny_vlm.make_inputs(family, model)
            else:
                model = tiny_families.build(family, seed=1, text_layers=LAYERS, attn_implementation="sdpa")
                cache[family] = model, tiny_families.make_inputs(family, model)
        return cache[family]

    return get


def build_qwen3_vl_deep(seed: int = 1):
    """The tiny Qwen3-VL with deepstack after both vision blocks: features added to decoder layers 0 and 1."""
    from nograd.tiny.vlm_families import _config  # the star re-export in tiny/ leaves the private builder out

    model_cls, config = _config("qwen3_vl", LAYERS)
    config.vision_config.deepstack_visual_indexes = [0, 1]
    torch.manual_seed(seed)
    return model_cls._from_config(config, attn_implementation="sdpa").eval()


def build_gemma3(seed: int = 1):
    """The tiny Gemma3 with a different RoPE base on its sliding layers (as Gemma3's local 10k / global 1M), so a
    layer given the other type's cos/sin shows."""
    from nograd.tiny.vlm_families import _config

    model_cls, config = _config("gemma3", LAYERS)
    config.text_config.rope_parameters["sliding_attention"]["rope_theta"] = 100.0
    torch.manual_seed(seed)
    return model_cls._from_config(config, attn_implementation="sdpa").eval()


def row_alone(family: str, inputs: dict, row: int) -> dict:
    """Batch row ``row`` by itself, without its pads, with its own image inputs."""
    real = inputs["attention_mask"][row].bool()
    alone = {"input_ids": inputs["input_ids"][row:row + 1, real],
             "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long)}
    if family in ("idefics3", "smolvlm"):  # (rows, tiles, ...): one entry per row
        return {**alone, "pixel_values": inputs["pixel_values"][row:row + 1],
                "pixel_attention_mask": inputs["pixel_attention_mask"][row:row + 1]}
    if family in QWEN3:  # patches of each row's image grid, in row order
        grids = inputs["image_grid_thw"]
        patches = [int(g.prod()) for g in grids[:row + 1]]
        return {**alone, "pixel_values": inputs["pixel_values"][sum(patches[:-1]):sum(patches)],
                "image_grid_thw": grids[row:row + 1],
                "mm_token_type_ids": inputs["mm_token_type_ids"][row:row + 1, real]}
    if family == "gemma3":  # one entry per image: row r has 1 + r % 2
        images = [1 + r % 2 for r in range(row + 1)]
        return {**alone, "pixel_values": inputs["pixel_values"][sum(images[:-1]):sum(images)],
                "token_type_ids": inputs["token_type_ids"][row:row + 1, real]}
    if family == "internvl":  # one entry per tile
        tiles = [sum(tiny_families.INTERNVL_TILES[r % 2]) for r in range(row + 1)]
        return {**alone, "pixel_values": inputs["pixel_values"][sum(tiles[:-1]):sum(tiles)]}
    images = [len(tiny_families.MISTRAL3_SIZES[r % 2]) for r in range(row + 1)]  # mistral3: one entry per image
    start, end = sum(images[:-1]), sum(images)
    return {**alone, "pixel_values": inputs["pixel_values"][start:end], "image_sizes": inputs["image_sizes"][start:end]}


def cache_bytes(model, inputs) -> tuple[int, list[int]]:
    """The prefill's KV-cache bytes and each layer's cached length."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = getattr(out, "past_key_values", None) or out.cache
    layers = cache.layers
    size = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    return size, [layer.keys.shape[-2] for layer in layers]


# ---- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_is_bit_identical(models, family):
    model, inputs = models(family)
    with torch.no_grad():
        plain = model(**inputs).logits
    tokens, scores = generate(model, inputs)
    for method, options in [("pyramiddrop", dict(boundaries=[2, 4, 6], keep=[1.0, 1.0, 1.0])),
                            ("fastv", dict(layer=2, keep=1.0))]:
        with nograd.apply(model, method, **options) as handle:
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, plain)
            got_tokens, got_scores = generate(model, inputs)
            stages = len(options.get("boundaries", [2])) + 1
            assert handle.stats["visual_tokens"] == [[n] * stages for n in visual_counts(inputs)]
        assert torch.equal(got_tokens, tokens) and torch.equal(got_scores, scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_image_tokens_drop_as_the_schedule_says(models, family):
    """The visual tokens are the adapter's image tokens only; every stage keeps floor(N * r_s) of each row's N of
    them, in order, and every other real token (the tags around the images included)."""
    model, inputs = models(family)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    assert torch.equal(adapter_for(model).image_token_mask(ids), ids == IMAGE)
    tags = set(ids[mask & (ids != IMAGE)].tolist()) - set(range(4, 100)) - {tiny_vlm.BOS}
    assert tags  # the family's image tags are in the prompt: they must survive every stage
    with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle, torch.no_grad():
        logits = model(**inputs).logits
    counts = visual_counts(inputs)
    assert handle.stats["visual_tokens"] == [PLAN.kept_counts(n) for n in counts]
    for kept in handle.stats["kept"]:
        for row, positions in enumerate(kept):
            assert bool((positions.diff() > 0).all()) and bool((ids[row, positions] == IMAGE).all())
    dropped = [n - PLAN.kept_counts(n)[-1] for n in counts]
    longest = max(int(real) - d for real, d in zip(mask.sum(1), dropped))
    assert handle.stats["stage_lengths"][-1] == longest == logits.shape[1]
    with nograd.apply(model, "fastv", layer=3, keep=0.5) as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats["visual_tokens"] == [[n, n // 2] for n in counts]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", ["pyramiddrop", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_physical_removal(models, family, method, positions):
    model, inputs = models(family)
    options = OPTIONS[method]
    if family in QWEN3 and positions == "compact":  # M-RoPE: compact renumbering is refused
        with pytest.raises(ValueError, match="option positions='compact'"):
            nograd.apply(model, method, positions=positions, **options)
        assert not nograd.attached(model)
        return
    assert_generate_equals_physical_removal(model, inputs, method, options, options.get("boundaries", [2]), positions)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_bytes_saved_is_the_measured_cache_saving(models, family):
    """The batch's plain cache bytes - its cache bytes with PyramidDrop is ``kv_bytes_saved``; the batch's layers
    cache their stage's length; each row alone (no pads) saves its own share (the batch's rows, padded to the longest
    in each stage, save no more than the row that drops fewest) and generates as in the batch."""
    model, inputs = models(family)
    plain_batch, _ = cache_bytes(model, inputs)
    with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle:
        dropped_batch, lengths = cache_bytes(model, inputs)
        stats = dict(handle.stats)
        batch_tokens, _ = generate(model, inputs)
    assert stats["kv_bytes_saved"] == plain_batch - dropped_batch
    stage = stats["stage_lengths"]
    held = [stage[PLAN.stage_of_layer(i)] for i in range(LAYERS)]
    if family == "gemma3":  # the default cache's sliding layers hold the last SLIDING_WINDOW - 1 keys
        types = model.config.text_config.layer_types
        held = [min(n, tiny_families.SLIDING_WINDOW - 1) if t == "sliding_attention" else n
                for n, t in zip(held, types)]
    assert lengths == held and stats["kv_bytes_saved"] > 0
    for row in range(2):
        alone = row_alone(family, inputs, row)
        plain, _ = cache_bytes(model, alone)
        with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle:
            dropped, _ = cache_bytes(model, alone)
            assert handle.stats["visual_tokens"] == stats["visual_tokens"][row:row + 1]
            assert handle.stats["kv_bytes_saved"] == plain - dropped
            tokens, _ = generate(model, alone)
        assert torch.equal(tokens[0], batch_tokens[row])


@pytest.mark.parametrize("method", ["pyramiddrop", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_logits_bit_for_bit(models, family, method):
    model, inputs = models(family)
    saved = snapshot(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    handle = nograd.apply(model, method, **OPTIONS[method])
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] < plain.shape[1]
    generate(model, inputs, steps=2)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    layers = decoder(model).layers
    assert same_state(model, saved) and not nograd.attached(model)
    assert not any(layer._forward_pre_hooks for layer in layers) and not model.model._forward_pre_hooks


def test_mistral3_with_a_sliding_window_is_refused(models):
    """A Mistral decoder with ``sliding_window`` set masks by window in every layer: refused, the model untouched."""
    model, _ = models("mistral3")
    saved, text = snapshot(model), model.config.text_config
    text.sliding_window = 8
    try:
        for method in ("pyramiddrop", "fastv"):
            with pytest.raises(ValueError, match="sliding-window"):
                nograd.apply(model, method)
    finally:
        text.sliding_window = None
    assert same_state(model, saved) and not nograd.attached(model)
    assert not any(layer._forward_pre_hooks for layer in decoder(model).layers)


@pytest.mark.parametrize("family", QWEN3)
def test_qwen3_vl_boundary_at_or_before_a_deepstack_layer_is_refused(models, family):
    """Qwen3-VL adds deepstack features after decoder layers 0..D-1 (D = len(deepstack_visual_indexes)): a boundary
    < D is refused, naming the option that placed it; boundary D runs. The model is left untouched."""
    model, inputs = models(family)
    vision = model.config.vision_config
    deep = len(vision.deepstack_visual_indexes)
    assert len(model.model.visual.deepstack_merger_list) == deep == (2 if family == "qwen3_vl_deep" else 1)
    saved, indexes = snapshot(model), list(vision.deepstack_visual_indexes)
    if family == "qwen3_vl":  # one deepstack layer: no boundary (>= 1) can precede it; pretend three
        vision.deepstack_visual_indexes = [0, 0, 0]
    try:
        deep = len(vision.deepstack_visual_indexes)
        refused = [("pyramiddrop", dict(boundaries=[deep - 1, 6], keep=[0.5, 0.25]), "boundaries"),
                   ("pyramiddrop", dict(stages=8), "stages"),  # the even split: boundaries 1..7
                   ("pyramiddrop", dict(tokens=2.0), "boundaries"),  # a budget's default boundaries: 1, 2, 5
                   ("fastv", dict(layer=deep - 1), "layer")]
        for method, options, name in refused:
            with pytest.raises(ValueError, match=rf"option {name}=.*deepstack"):
                nograd.apply(model, method, **options)
        with pytest.raises(ValueError, match="decoder alone"):  # no vision_config: the deepstack depth is unknown
            nograd.apply(decoder(model), "fastv", layer=7)
    finally:
        vision.deepstack_visual_indexes = indexes
    assert same_state(model, saved) and not nograd.attached(model)
    assert not any(layer._forward_pre_hooks for layer in decoder(model).layers) and not model.model._forward_pre_hooks
    deep = len(indexes)
    with nograd.apply(model, "fastv", layer=deep, keep=0.5) as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats["boundaries"] == [deep]
    assert handle.stats["visual_tokens"] == [[n, n // 2] for n in visual_counts(inputs)]


@pytest.mark.parametrize("family", QWEN3)
def test_qwen3_vl_deepstack_reaches_the_decoder_at_prefill_only(models, family):
    """What the boundaries-after-deepstack argument rests on: under ``generate()`` with the cache, only the prefill
    (full length) carries deepstack features; the decode steps carry none. Without the cache every step re-runs the
    whole prompt with them (again full length before the first boundary)."""
    model, inputs = models(family)
    decoder_model, seen = decoder(model), []

    def record(module, args, kwargs):
        embeds = kwargs.get("deepstack_visual_embeds")
        seen.append((kwargs["inputs_embeds"].shape[1], None if embeds is None else len(embeds),
                     None if kwargs.get("visual_pos_masks") is None else kwargs["visual_pos_masks"].shape[1]))

    deep = len(model.config.vision_config.deepstack_visual_indexes)
    length = inputs["input_ids"].shape[1]
    hook = decoder_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with nograd.apply(model, "pyramiddrop", **SCHEDULE):
            generate(model, inputs, steps=3)
            assert seen == [(length, deep, length), (1, None, None), (1, None, None)]
            seen.clear()
            generate(model, inputs, steps=3, use_cache=False)
            assert seen == [(length + k, deep, length + k) for k in range(3)]
    finally:
        hook.remove()


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method, options", [("pyramiddrop", dict(boundaries=[2, 3, 6], keep=[0.5, 0.25, 0.125])),
                                             ("pyramiddrop", dict(boundaries=[1, 5], keep=[0.75, 0.25])),
                                             ("fastv", dict(layer=7, keep=0.25))])
def test_gemma3_stages_with_one_layer_type_equal_physical_removal(models, method, options, positions):
    """Gemma3 (layers 0, 2, 4, 6 sliding): stages holding one layer type only (layer 2 alone), boundaries on full
    layers (3, 5, 7) and a stage whose PyramidDrop ranking needs the RoPE of a type the previous stage lacks; cached
    ``generate()`` equals physical removal, the uncached one the same tokens."""
    model, inputs = models("gemma3")
    boundaries = options.get("boundaries", [options.get("layer")])
    assert_generate_equals_physical_removal(model, inputs, method, options, boundaries, positions, steps=5)


def test_a_shorter_text_only_row_does_not_hold_the_stages_at_the_prompt_length():
    """A left-padded batch of a text-only row and an image row: each stage is as long as its longest row now is (the
    text row's pads go; they held every stage at the prompt's length, saving nothing), the cache saving is the
    measured one, and each row generates as alone."""
    model, proc = nograd.tiny.vlm("llava", layers=LAYERS)

    def chat(content):
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    texts = [chat([{"type": "text", "text": "Hi!"}]),
             chat([{"type": "image"}, {"type": "text", "text": "What is in the picture?"}])]
    inputs = dict(proc(images=[nograd.tiny.image(28, 28)], text=texts, padding=True, return_tensors="pt"))
    real = inputs["attention_mask"].sum(1).tolist()
    assert real[0] < real[1]
    plain, _ = cache_bytes(model, inputs)
    with nograd.apply(model, "pyramiddrop", **SCHEDULE) as handle:
        dropped, lengths = cache_bytes(model, inputs)
        stats = dict(handle.stats)
        batch_tokens, _ = generate(model, inputs)
    visual = stats["visual_tokens"][1]
    expected = [real[1]] + [max(real[0], real[1] - visual[0] + kept) for kept in visual[1:]]
    assert stats["stage_lengths"] == expected and expected[-1] < real[1]
    assert lengths == [expected[PLAN.stage_of_layer(i)] for i in range(LAYERS)]
    assert stats["kv_bytes_saved"] == plain - dropped > 0
    for row in range(2):
        alone = {"input_ids": inputs["input_ids"][row:row + 1, -real[row]:],
                 "attention_mask": torch.ones(1, real[row], dtype=torch.long)}
        if row == 1:
            alone["pixel_values"] = inputs["pixel_values"]
        with nograd.apply(model, "pyramiddrop", **SCHEDULE):
            tokens, _ = generate(model, alone)
        assert torch.equal(tokens[0], batch_tokens[row])
