"""CARVE: the captured rows equal eager attention (prefill and decode steps) with the model's outputs unchanged, a
planted attention pattern lands in its pixel box on non-square images, identical prompts leave the image as it is,
the general pass is cached, the pipeline form equals ``handle.generate``, restore is bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import nograd
from planting import planted_peak, probe_grids  # (importing planting registers "test_plant_key")
from checks import attn_names, same_state, snapshot
from nograd.methods.carve_geometry import image_views, to_pixels
from tiny.processor import PROCESSORS, image
from tiny.vlm import BUILDERS, IMAGE, make_inputs

QUESTION = "What is on the left?"


def eager_rows(model, inputs, layers, positions):
    """Head-mean last-row eager attention at the image keys, per layer: (B, L, N_v)."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    return torch.stack([attentions[layer][:, :, -1].mean(dim=1).gather(1, positions) for layer in layers], dim=1)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rows_equal_eager_attention_and_outputs_are_unchanged(carve_models, family):
    model, eager = carve_models(family), carve_models(family, "eager")
    processor = PROCESSORS[family]()
    picture = image(70, 42)
    handle = nograd.apply(model, "carve", processor=processor, answer_suffix=None, general_prompt="Describe it.")
    method_layers = handle.stats["layers"]
    inputs = handle.build_inputs([picture, picture], [QUESTION, "Describe it."])
    with torch.no_grad():
        plain = eager.generate(**inputs, max_new_tokens=3, do_sample=False)
    out = handle.generate(picture, QUESTION)
    task, general = out.maps["task"], out.maps["general"]
    positions = out.maps["positions"]
    for step in range(3):
        grown = dict(inputs, input_ids=plain[:, :inputs["input_ids"].shape[1] + step],
                     attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1))
        if "mm_token_type_ids" in inputs:
            grown["mm_token_type_ids"] = (grown["input_ids"] == IMAGE).int()
        expected = eager_rows(eager, grown, method_layers, positions)
        torch.testing.assert_close(task[step], expected[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(general[step], expected[1], atol=1e-6, rtol=0)
    first_tokens = processor.batch_decode(plain[:1, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert bool((task.sum(-1) <= 1 + 1e-6).all()) and out.original_text.startswith(first_tokens.strip())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, carve_models(family)(**inputs).logits)
    handle.remove()


@pytest.mark.parametrize("family, size, token, box", [
    # LLaVA-1.5: the 4x4 raster covers the central 42x42 square of a 70x42 image (the processor's centre crop)
    ("llava", (70, 42), (1, 2), (14 + 2 * 42 / 4, 1 * 42 / 4, 14 + 3 * 42 / 4, 2 * 42 / 4)),
    # Qwen2-VL: 70x42 -> 6x10 patches of 7 -> a 3x5 merged raster over the whole image
    ("qwen2_vl", (70, 42), (2, 1), (14, 28, 28, 42)),
    ("qwen2_5_vl", (70, 42), (2, 1), (14, 28, 28, 42)),  # the same merged raster; its ViT's window order is undone
])
def test_a_planted_peak_lands_in_its_pixel_box(carve_models, family, size, token, box):
    model = carve_models(family)
    processor = PROCESSORS[family]()
    picture = image(*size)
    with nograd.apply(model, "carve", processor=processor, steps="first", probe_max_new_tokens=1,
                      answer_suffix=None) as carve:
        _, grids = probe_grids(carve, picture, QUESTION)
        positions, views = image_views(carve.adapter, grids[0], picture.size)
        (view,) = views
        r, c = token
        saliency, (x, y) = planted_peak(carve, picture, QUESTION, int(positions[view.index[r * view.cols + c]]))
    x0, y0, x1, y1 = box
    assert saliency.shape == (size[1], size[0]) and x0 <= x < x1 and y0 <= y < y1
    if family == "llava":  # outside the centre crop: the map's minimum, never kept
        assert bool((saliency[:, :14] == saliency.min()).all())


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_views_put_a_token_in_its_box(carve_models, family):
    """The high-resolution raster (newlines left out) covers the whole image: a one-hot map lands in its cell."""
    model = carve_models(family)
    inputs = make_inputs(family, model, batch=1)
    image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    (grid,) = nograd.patches.adapter_for(model).image_grids(inputs["input_ids"], **image_inputs)
    adapter = nograd.patches.adapter_for(model)
    size = (120, 60)
    positions, (view,) = image_views(adapter, grid, size)
    crop = [t for t in grid.tiles if t.kind == "crop"][0]
    assert torch.equal(positions, crop.positions) and (view.rows, view.cols) == (crop.rows, crop.cols)
    r, c = view.rows - 1, 0
    token_map = torch.zeros(len(positions))
    token_map[view.index[r * view.cols + c]] = 1.0
    pixels = to_pixels(token_map, [view], size)
    y, x = divmod(int(pixels.argmax()), size[0])
    assert r * 60 / view.rows <= y < (r + 1) * 60 / view.rows and c * 120 / view.cols <= x < (c + 1) * 120 / view.cols


def test_identical_prompts_give_a_flat_map_and_the_original_image(carve_models):
    model = carve_models("llava")
    picture = image(70, 42, seed=3)
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"](), general_prompt=QUESTION) as handle:
        out = handle.generate(picture, QUESTION)
        assert handle.stats["flat"] and handle.stats["regions"] == 0
        handle.refine(picture, "Is it red?")  # the stats follow refine() too
        assert not handle.stats["flat"] and handle.stats["regions"] > 0
        handle.refine(picture, QUESTION)
        assert handle.stats["flat"] and handle.stats["regions"] == 0
    assert out.flat and out.refined_image.tobytes() == picture.tobytes() and bool(out.mask.all())


def test_the_general_cache_misses_when_the_image_processor_changes(carve_models):
    """The cached general pass belongs to the image as the processor made its tokens: a changed image-processor
    setting (here the normalisation, which changes every pixel value) runs it again."""
    model = carve_models("llava")
    picture, processor = image(70, 42, seed=4), PROCESSORS["llava"]()
    with nograd.apply(model, "carve", processor=processor, probe_max_new_tokens=2) as handle:
        handle.saliency(picture, QUESTION)
        processor.image_processor.do_normalize = not processor.image_processor.do_normalize
        handle.saliency(picture, QUESTION)
        assert handle.stats["general_cache_hits"] == 0
        handle.saliency(picture, QUESTION)
        assert handle.stats["general_cache_hits"] == 1


def test_regions_follow_the_options_and_the_general_pass_is_cached(carve_models):
    model = carve_models("llava")
    picture = image(70, 42, seed=4)
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"](), top_p=0.3, min_regions=1,
                      keep_rule="paper") as handle:
        first = handle.generate(picture, QUESTION)
        passes = handle.stats["passes"]
        second = handle.generate(picture, "Is it red?")
    assert first.mask.shape == (42, 70) and first.regions == 1 and not first.flat
    assert handle.stats["general_cache_hits"] == 1 and handle.stats["passes"] == 2 * passes
    assert first.mask.sum() <= 0.3 * 70 * 42 + 1 and second.saliency.shape == (42, 70)
    refined = first.refined_image
    assert refined.size[0] == 70 and refined.size[1] >= 42 or refined.size[1] == 42 and refined.size[0] >= 70


def test_the_general_pass_cache_is_bounded_and_follows_the_methods_beside(carve_models, monkeypatch):
    """The cache grew by one general pass per image, for the handle's life (each holding its batch's storage); and a
    method applied after a pass was cached did not change it (saliency 0.62 off a fresh handle's)."""
    from nograd.methods import carve as carve_module

    monkeypatch.setattr(carve_module, "GENERAL_CACHE_SIZE", 2)
    model = carve_models("llava")
    pictures = [image(70, 42, seed=seed) for seed in (11, 12, 13)]
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"]()) as handle:
        for picture in pictures:
            handle.saliency(picture, QUESTION)
        handle.saliency(pictures[2], QUESTION)  # the newest is kept
        assert handle.stats["general_cache_hits"] == 1
        handle.saliency(pictures[0], QUESTION)  # the oldest went
        assert handle.stats["general_cache_hits"] == 1
        with nograd.apply(model, "zerotuning", gamma=8.0):
            stacked = handle.saliency(pictures[2], QUESTION)
            assert handle.stats["general_cache_hits"] == 1  # a stale pass is not reused
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"]()) as fresh:
        with nograd.apply(model, "zerotuning", gamma=8.0):
            assert torch.equal(fresh.saliency(pictures[2], QUESTION), stacked)


def test_pipeline_gives_the_same_answer_as_generate(carve_models):
    model = carve_models("llava")
    processor = PROCESSORS["llava"]()
    picture = image(70, 42, seed=5)
    with nograd.apply(model, "carve", processor=processor) as handle:
        expected = handle.generate(picture, QUESTION).text
    pipe = tf.pipeline("image-text-to-text", model=model, processor=processor)
    chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": QUESTION}]}]
    with nograd.apply(pipe, "carve") as handle:
        got = pipe(images=picture, text=QUESTION, return_full_text=False)
        with_token = pipe(images=picture, text=processor.image_token + QUESTION, return_full_text=False)
        chatted = pipe(text=chat, return_full_text=False)
        short = pipe(images=picture, text=QUESTION, return_full_text=False, max_new_tokens=2)  # the call's options
        short_direct = handle.generate(picture, QUESTION, max_new_tokens=2).text
        with pytest.raises(NotImplementedError, match="one image and one question"):
            pipe(images=[picture, picture], text=QUESTION)
    assert handle.stats["general_cache_hits"] == 4  # every call after the first on this image
    assert got[0]["generated_text"].strip() == expected == with_token[0]["generated_text"].strip()
    with nograd.apply(model, "carve", processor=processor) as handle:  # generate() strips the image token alike
        assert handle.generate(picture, processor.image_token + QUESTION).text == expected
        with pytest.raises(NotImplementedError, match="one image and one question per call"):
            handle.generate([picture, picture], QUESTION)
        with pytest.raises(NotImplementedError, match="one image and one question per call"):
            handle.saliency(picture, [QUESTION, QUESTION])
        with pytest.raises(TypeError, match="carve takes a PIL image; got Tensor"):
            handle.refine(torch.zeros(3, 42, 70), QUESTION)
        for question in (None, 5, b"What?"):  # no batch of questions: a type error (it was called a batch)
            with pytest.raises(TypeError, match="carve takes the question as a str"):
                handle.saliency(picture, question)
    assert chatted[0]["generated_text"] == got[0]["generated_text"]
    assert short[0]["generated_text"].strip() == short_direct and len(short_direct) < len(expected)
    assert expected.startswith(short_direct)
    assert "_forward" not in vars(pipe) and "preprocess" not in vars(pipe)


def test_an_offloaded_model_answers_as_the_resident_one(carve_models):
    """accelerate.cpu_offload leaves every parameter on the meta device (model.device "meta"): the prompts go to the
    hooks' execution device (they were sent to "meta", and the probe pass raised)."""
    import accelerate

    model = copy.deepcopy(carve_models("llava"))
    processor, picture = PROCESSORS["llava"](), image(70, 42, seed=5)
    with nograd.apply(model, "carve", processor=processor) as handle:
        expected = handle.generate(picture, QUESTION)
    accelerate.cpu_offload(model, execution_device="cpu")
    assert model.device.type == "meta"
    with nograd.apply(model, "carve", processor=processor) as handle:
        got = handle.generate(picture, QUESTION)
    assert got.text == expected.text and got.bbox == expected.bbox


def test_a_model_without_generate_is_refused_and_a_probe_error_is_its_own(carve_models):
    """A bare LlavaModel was accepted, then every call raised "stack expects a non-empty TensorList": stopping the
    probe over an empty record hid the generation's own error (any error inside it: a bad input, Ctrl-C)."""
    model = carve_models("llava")
    processor, picture = PROCESSORS["llava"](), image(70, 42, seed=5)
    with pytest.raises(nograd.UnsupportedModelError, match="carve answers with model.generate.*not LlavaModel"):
        nograd.apply(model.model, "carve", processor=processor)
    assert nograd.attached(model.model) == []
    with nograd.apply(model, "carve", processor=processor) as handle:
        expected = handle.generate(picture, QUESTION).text
        generate = model.generate  # the method's own wrapper, put back as it was

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        model.generate = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                handle.generate(picture, "Another question?")
        finally:
            model.generate = generate
        assert handle.generate(picture, QUESTION).text == expected
    assert "generate" not in vars(model)


def test_every_final_answer_is_returned(carve_models):
    """``num_return_sequences`` answers of the final pass are all in ``out.texts`` (only the first came back)."""
    model = carve_models("llava")
    picture = image(70, 42, seed=5)
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"]()) as handle:
        single = handle.generate(picture, QUESTION, num_beams=2)
        both = handle.generate(picture, QUESTION, num_beams=2, num_return_sequences=2)
    assert single.texts == [single.text] and len(both.texts) == 2 and both.text == both.texts[0] == single.text


def test_reads_the_attention_of_the_methods_it_shares_a_model_with(carve_models):
    """CARVE reads image keys by position and moves none: it shares a model with ZeroTuning and the visual edits,
    and its maps are those of the steered model (gamma=1 leaves them exactly); token dropping stays refused."""
    model = carve_models("llava")
    saved, names = snapshot(model), attn_names(model)
    picture = image(70, 42, seed=6)
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"]()) as handle:
        alone = handle.generate(picture, QUESTION)
        with nograd.apply(model, "zerotuning", gamma=1.0):
            neutral = handle.generate(picture, QUESTION)
        with nograd.apply(model, "zerotuning", gamma=8.0):
            steered = handle.generate(picture, QUESTION)
        with nograd.apply(model, "pai", alpha=0.5) as pai:
            edited = handle.generate(picture, QUESTION)
            assert pai.stats["edited_calls"] > 0
        with pytest.raises(nograd.IncompatibleMethodsError, match="the attached 'carve' reads token_layout"):
            nograd.apply(model, "fastv")
    # (a repeated question reads the cached general pass: equal up to rounding)
    torch.testing.assert_close(neutral.saliency, alone.saliency, atol=1e-5, rtol=1e-6)
    assert neutral.text == alone.text and (steered.saliency - alone.saliency).abs().max() > 1e-3
    assert edited.saliency.shape == alone.saliency.shape
    assert same_state(model, saved) and attn_names(model) == names and nograd.attached(model) == []


def test_remove_restores_the_model_and_bad_options_raise(carve_models):
    model = carve_models("qwen2_vl")
    saved, names = snapshot(model), attn_names(model)
    inputs = make_inputs("qwen2_vl", model)
    with torch.no_grad():
        plain = model(**inputs).logits
    handle = nograd.apply(model, "carve", processor=PROCESSORS["qwen2_vl"]())
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
    assert same_state(model, saved) and attn_names(model) == names
    for options, name in [(dict(top_p=0), "top_p"), (dict(layers=[99]), "layers"), (dict(steps="middle"), "steps"),
                          (dict(preset="best"), "preset"), (dict(preset=["paper"]), "preset"), (dict(min_regions=0), "min_regions")]:
        with pytest.raises(ValueError, match=name):
            nograd.apply(model, "carve", processor=PROCESSORS["qwen2_vl"](), **options)
    with pytest.raises(ValueError, match="processor"):
        nograd.apply(model, "carve")
    assert not nograd.attached(model)


@pytest.mark.parametrize("depth, layers", [(28, range(20, 26)), (32, range(20, 26)), (6, [4, 5]), (4, [3]),
                                           (2, [1]), (1, [0])])
def test_the_paper_layer_window_scales_to_the_depth(depth, layers):
    """Official range(20, 26) of 28 layers; shallower models read the same relative window, inside the model."""
    model = BUILDERS["llava"](seed=0, text_layers=depth)
    with nograd.apply(model, "carve", processor=PROCESSORS["llava"]()) as handle:
        assert handle.stats["layers"] == list(layers)
