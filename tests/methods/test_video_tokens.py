"""Video tokens are visual tokens: Qwen2-VL / 2.5-VL and LLaVA-OneVision write video frames with a token of their own
(``config.video_token_id``), apart from the image token. PyramidDrop and FastV rank and drop them with the image
tokens of their row (spec ``pyramiddrop.md`` §5.3, ``include_video=True``; ``False`` leaves them alone), PAI and
ClearSight edit them as visual keys and PAI's image-free refine leaves them out of its text-only pass; PAINT, which
selects image tokens from the vision tower, edits image tokens only and says so once. Every check is against a
reference: the physical-removal decoder of ``drop_reference.py``, the plain model, or the refine written out."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import nograd
from checks import assert_refine_is_written_out, same_state, snapshot
from drop_reference import assert_generate_equals_physical_removal, generate, visual_counts
from nograd.methods.drop_schedule import DropSchedule
from nograd.patches import adapter_for
from tiny import vlm as tiny_vlm
from tiny.vlm import IMAGE, VIDEO

LAYERS = 8
SCHEDULE = dict(boundaries=[2, 4, 6], keep=[0.5, 0.25, 0.125])
PLAN = DropSchedule(LAYERS, (2, 4, 6), (0.5, 0.25, 0.125))
OPTIONS = {"pyramiddrop": SCHEDULE, "fastv": dict(layer=2, keep=0.5)}
FAMILIES = tiny_vlm.VIDEO_FAMILIES


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_vlm.BUILDERS[family](seed=1, attn_implementation="sdpa", text_layers=LAYERS)
        return cache[family]

    return get


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", [*FAMILIES, "llava", "idefics3"])
def test_visual_token_mask_is_image_and_video_tokens(build, family):
    model = build(family)
    adapter = adapter_for(model)
    ids = torch.tensor([[1, IMAGE, VIDEO, 7, IMAGE, VIDEO]])
    has_video = family in FAMILIES
    assert adapter.video_token_id == (VIDEO if has_video else None)
    assert torch.equal(adapter.visual_token_mask(ids), torch.isin(ids, torch.tensor([IMAGE, VIDEO] if has_video
                                                                                        else [IMAGE])))
    assert torch.equal(adapter.visual_token_mask(ids, video=False), ids == IMAGE)


@pytest.mark.parametrize("images", [True, False], ids=["images+video", "video"])
@pytest.mark.parametrize("method", ["pyramiddrop", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_video_tokens_drop_as_physical_removal(models, family, method, images):
    """A left-padded batch of 2 whose rows hold images then a video (or a video alone): ``generate()`` with the KV
    cache equals the decoder run on the text and the kept visual tokens only, and the kept tokens are image or video
    tokens, as many as the schedule gives the row's image + video count."""
    model = models(family)
    inputs = tiny_vlm.make_video_inputs(family, model, images=images)
    options = OPTIONS[method]
    assert_generate_equals_physical_removal(model, inputs, method, options, options.get("boundaries", [2]),
                                            "original")
    counts = visual_counts(inputs)
    assert all(n > 0 for n in visual_counts(inputs, (VIDEO,)))
    with nograd.apply(model, method, **options) as handle, torch.no_grad():
        model(**inputs)
    plan = PLAN if method == "pyramiddrop" else DropSchedule(LAYERS, (2,), (0.5,))
    assert handle.stats["visual_tokens"] == [plan.kept_counts(n) for n in counts]
    ids = inputs["input_ids"]
    for kept in handle.stats["kept"]:
        for row, positions in enumerate(kept):
            assert bool(torch.isin(ids[row, positions], torch.tensor([IMAGE, VIDEO])).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_include_video_false_drops_image_tokens_only(models, family):
    """``include_video=False``: a video-only prompt runs as the plain model, bit for bit (no drop); with images the
    video tokens all stay and the images drop as the physical-removal reference with image tokens only."""
    model = models(family)
    video = tiny_vlm.make_video_inputs(family, model, images=False)
    plain_tokens, plain_scores = generate(model, video)
    with nograd.apply(model, "pyramiddrop", include_video=False, **SCHEDULE) as handle:
        tokens, scores = generate(model, video)
        assert handle.stats["visual_tokens"] == []
    assert torch.equal(tokens, plain_tokens) and torch.equal(scores, plain_scores)
    both = tiny_vlm.make_video_inputs(family, model)
    assert_generate_equals_physical_removal(model, both, "pyramiddrop", dict(SCHEDULE, include_video=False),
                                            SCHEDULE["boundaries"], "original", visual_ids=(IMAGE,))
    with nograd.apply(model, "pyramiddrop", include_video=False, **SCHEDULE) as handle, torch.no_grad():
        model(**both)
    assert handle.stats["visual_tokens"] == [PLAN.kept_counts(n) for n in visual_counts(both, (IMAGE,))]


def test_include_video_must_be_a_bool(models):
    model = models("qwen2_vl")
    saved = snapshot(model)
    with pytest.raises(ValueError, match="option include_video='yes' is not allowed; expected one of True, False"):
        nograd.apply(model, "fastv", include_video="yes")
    assert not nograd.attached(model) and same_state(model, saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_pai_refine_leaves_the_video_out_of_the_text_only_pass(build, family):
    """PAI's image-free refine on a video prompt, written out (greedy steps without cache): z_c from the edited
    model with the video, z_u from the plain model on the same tokens without the video tokens (and Qwen's
    ``<|vision_start|>`` / ``<|vision_end|>`` around them)."""
    model, plain_twin = build(family), build(family)
    inputs = tiny_vlm.make_video_inputs(family, model, images=False)
    assert_refine_is_written_out(model, plain_twin, inputs, (VIDEO, *adapter_for(model).visual_marker_ids),
                                 alpha=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_paint_edits_image_tokens_only_and_says_so(build, family):
    """A video-only prompt under PAINT runs as the plain model, bit for bit, with one warning per handle."""
    model = build(family)
    inputs = tiny_vlm.make_video_inputs(family, model, images=False)
    plain = logits(model, inputs)
    with nograd.apply(model, "paint", layers=(0, None)) as handle:
        with pytest.warns(UserWarning, match="paint edits image tokens only"):
            assert torch.equal(logits(model, inputs), plain)
        assert handle.stats["edited_calls"] == 0
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**inputs)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_paint_selection_ignores_the_video_frames(build, family):
    """Qwen's tower encodes the video frames too, after the images: PAINT's selection of a prompt with a video after
    its images is the one without it (counted from each row's first image token), in forward and generate."""
    model = build(family)
    alone, both = tiny_vlm.make_inputs(family, model), tiny_vlm.make_video_inputs(family, model)
    assert torch.equal(alone["pixel_values"], both["pixel_values"])

    def selection(handle, inputs):
        first = (inputs["input_ids"] == IMAGE).int().argmax(1)
        return [(s["batch_row"], sorted((s["local"] - first[s["batch_row"]]).tolist()),
                 sorted((s["summary"] - first[s["batch_row"]]).tolist())) for s in handle.stats["selection"]]

    with nograd.apply(model, "paint", local_ratio=0.5, layers=(0, None)) as handle, torch.no_grad():
        model(**alone)
        expected = selection(handle, alone)
    assert expected
    with nograd.apply(model, "paint", local_ratio=0.5, layers=(0, None)) as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the video tokens are left alone, as the warning says
        with torch.no_grad():
            model(**both)
        assert selection(handle, both) == expected
        handle.stats["selection"] = []
        model.generate(**both, max_new_tokens=2, do_sample=False)
        assert selection(handle, both) == expected


@pytest.mark.parametrize("images", [True, False])
def test_paint_refine_leaves_the_video_out_too(build, images):
    """PAINT edits image tokens only, but its ``cfg_gamma`` pass gets no pixels of any kind: it leaves the video
    placeholders out with the images (margins off, so only the refine acts; written out per row), and refines a
    prompt whose only visual tokens are video (it gave the raw logits there, and refined the same row in a batch
    with an image row)."""
    model = build("qwen2_vl")
    inputs = tiny_vlm.make_video_inputs("qwen2_vl", model, images=images)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    z_c = logits(model, inputs)[:, -1].float().log_softmax(-1)
    expected = []
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()]
        text = real[~torch.isin(real, torch.tensor([IMAGE, VIDEO, tiny_vlm.VISION_START, tiny_vlm.VISION_END]))][None]
        z_u = logits(model, dict(input_ids=text, attention_mask=torch.ones_like(text),
                                 mm_token_type_ids=torch.zeros_like(text)))[0, -1].float().log_softmax(-1)
        z = 1.1 * (z_c[row] - z_u) + z_u
        expected.append(z.masked_fill(z_c[row] < math.log(0.1) + z_c[row].max(), -math.inf))
    expected = torch.stack(expected)
    with nograd.apply(model, "paint", alpha=0.0, beta=0.0, cfg_gamma=1.1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the video tokens are not edited, as the warning says
        got = logits(model, inputs)[:, -1]
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], expected[finite], atol=1e-4, rtol=0)


def test_paint_stats_are_empty_after_a_prompt_without_images(build):
    model = build("qwen2_vl")
    with nograd.apply(model, "paint") as handle, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**tiny_vlm.make_inputs("qwen2_vl", model))
        assert handle.stats["selection"] and handle.stats["local_tokens"]
        model(**tiny_vlm.make_video_inputs("qwen2_vl", model, images=False))
        assert handle.stats["selection"] == [] and handle.stats["local_tokens"] == []
        assert handle.stats["summary_tokens"] == [] and handle.stats["heads_modulated"] == {}


class ForceToken:
    """A logits processor that makes the first generated token ``token`` (a model may emit a placeholder id)."""

    def __init__(self, token: int, at: int):
        self.token, self.at = token, at

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0
        return scores


@pytest.mark.parametrize("token", [IMAGE, VIDEO])
@pytest.mark.parametrize("method, options", [("pyramiddrop", dict(boundaries=[2, 4, 6], keep=[1.0, 1.0, 1.0])),
                                             ("fastv", dict(keep=1.0))])
def test_a_generated_placeholder_id_is_text(models, method, options, token):
    """A generated token equal to the image or video id brings no image (no pixels reach a decode step): keeping
    every token, generate() gives the plain model's tokens and scores."""
    from transformers import LogitsProcessorList

    model = models("qwen2_vl")
    inputs = tiny_vlm.make_inputs("qwen2_vl", model)
    force = LogitsProcessorList([ForceToken(token, inputs["input_ids"].shape[1])])
    plain = generate(model, inputs, logits_processor=force)
    with nograd.apply(model, method, **options):
        got = generate(model, inputs, logits_processor=force)
    assert bool((got[0][:, 0] == token).all())
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
