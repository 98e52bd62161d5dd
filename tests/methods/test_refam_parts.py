"""RefAM's pure parts: the block probabilities (fast == eager, joint/text identity, magnets only lower the other
tokens), the sink rule, token classification, geometry, the training-free mask, and the RefCOCO-style loader."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import nograd.data
from nograd.methods import refam_mask as rm
from nograd.methods.refam import block_probabilities
from nograd.methods.refam_tokens import (STOP_WORDS, TextToken, classify, detect_sinks, kept_mask, noun_phrase,
                                         spatial_cues)


def joint_qk(text_first=True, n=24, t=10, heads=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, heads, n + t, d, generator=g), torch.randn(2, heads, n + t, d, generator=g) * 2
    text, image = (slice(0, t), slice(t, t + n)) if text_first else (slice(n, n + t), slice(0, n))
    return q, k, text, image


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("normalisation", ["text_softmax", "joint"])
def test_block_probabilities_fast_equal_eager(text_first, normalisation):
    q, k, text, image = joint_qk(text_first)
    valid = slice(1, 7)
    bias = torch.zeros(2, 1, q.shape[2])
    bias[1, 0, text.start + 8] = -torch.inf  # a masked key (padding) counts nowhere
    got = block_probabilities(q, k, text, image, valid, scale=0.3, key_bias=bias, normalisation=normalisation,
                              lse_chunk=5)
    want = block_probabilities(q, k, text, image, valid, scale=0.3, key_bias=bias, normalisation=normalisation,
                               capture="eager")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert got[0].shape == (2, 3, 24, 6) and got[1].shape == (2, 3, 6, 6)


def test_joint_renormalised_over_v_is_text_softmax_per_head():
    q, k, text, image = joint_qk()
    joint, _ = block_probabilities(q, k, text, image, slice(0, 6), scale=0.3, normalisation="joint")
    soft, _ = block_probabilities(q, k, text, image, slice(0, 6), scale=0.3)
    torch.testing.assert_close(joint / joint.sum(-1, keepdim=True), soft, atol=1e-6, rtol=0)
    assert bool((joint.sum(-1) < 1).all())
    torch.testing.assert_close(soft.sum(-1), torch.ones(soft.shape[:-1]), atol=1e-6, rtol=0)


def test_magnets_never_raise_a_token_and_sharpen_a_background_biased_map():
    n, d = 40, 4
    obj = torch.zeros(n, dtype=torch.bool)
    obj[:10] = True
    q = torch.zeros(1, 1, n, d)
    q[0, 0, :, 0] = torch.where(obj, 4.0, 1.0)  # the content logit: 4 on the object, 1 elsewhere
    q[0, 0, :, 1] = torch.where(obj, 0.0, 2.0)  # magnets respond on the background
    content = torch.tensor([[1.0, 0, 0, 0]])
    magnets = torch.tensor([[0, 1.0, 0, 0]]).repeat(5, 1)
    maps = []
    for count in (0, 1, 3, 5):
        keys = torch.cat([content, torch.zeros(1, d), magnets[:count]])[None, None]
        kk = torch.cat([keys, torch.zeros(1, 1, n, d)], dim=2)
        qq = torch.cat([torch.zeros(1, 1, keys.shape[2], d), q], dim=2)
        p, _ = block_probabilities(qq, kk, slice(0, keys.shape[2]), slice(keys.shape[2], keys.shape[2] + n),
                                   slice(0, keys.shape[2]), scale=1.0)
        maps.append(p[0, 0, :, :2])
    contrast = [float(m[obj, 0].mean() / m[~obj, 0].mean()) for m in maps]
    assert all(bool((later <= earlier + 1e-7).all()) for earlier, later in zip(maps, maps[1:]))
    assert contrast == sorted(contrast) and contrast[-1] > contrast[0]


def test_sink_rule_flags_only_the_uniform_high_column():
    g = torch.Generator().manual_seed(0)
    n, v = 64, 12
    logits = torch.randn(1, n, v, generator=g)
    logits[0, :, 3] += 4.0  # uniform and high: a sink
    logits[0, :8, 7] += 6.0  # high but localised: an object, not a sink
    image = logits.softmax(-1)
    text = torch.randn(1, v, v, generator=g).softmax(-1)
    sinks, received = detect_sinks(image, text)
    assert sinks[0].nonzero().flatten().tolist() == [3]
    assert float(received[0, 3]) > 3 * float(received[0].median())
    assert not detect_sinks(image, text, gamma=100.0)[0].any()


def test_stop_words_and_sub_tokens():
    assert len(STOP_WORDS) == 179 and "left" not in STOP_WORDS and "the" in STOP_WORDS
    text = "The cat, left"
    pieces = ["▁The", "▁c", "at", ",", "▁left", "</s>"]
    offsets = [(0, 3), (4, 5), (5, 7), (7, 8), (9, 13), (0, 0)]
    tokens = classify(pieces, offsets, [False] * 5 + [True], text, magnet=False)
    assert [t.role for t in tokens] == ["stop", "content", "content", "content", "content", "special"]
    assert [t.word for t in tokens[:5]] == ["the", "cat", "cat", "cat", "left"]
    assert [t.word_index for t in tokens] == [0, 1, 1, 1, 2, -1]
    assert kept_mask(tokens).tolist() == [False, True, True, True, True, False]
    assert kept_mask(tokens, noun_phrase_only=True).tolist() == [False, True, True, True, True, False]
    assert spatial_cues("the cup on the far Left, upper shelf") == ["left", "top"]


@pytest.mark.parametrize("expression, phrase", [
    ("the red king on the left", ["red", "king"]), ("white ceiling lamp", ["white", "ceiling", "lamp"]),
    ("large painting above the sofa", ["large", "painting"]), ("a tall building behind the bus", ["tall", "building"]),
    ("gold earring", ["gold", "earring"]), ("wooden dining table", ["wooden", "dining", "table"]),
    ("the thing", ["thing"]), ("man standing near the car", ["man"]), ("woman holding a cup", ["woman"]),
    ("a horse jumping over obstacles", ["horse"]), ("cat lying on the couch", ["cat"]),
    ("giraffe on the right", ["giraffe"]), ("running man", ["running", "man"]), ("the one", ["one"]),
])
def test_noun_phrase_heuristic(expression, phrase):
    """Spec §1.9 NP: content words before the first preposition, relative pronoun or "-ing" verb; "-ing" nouns
    (king, ceiling, painting) are part of the phrase."""
    tokens = [TextToken(i, w, w, i, "stop" if w in STOP_WORDS else "content") for i, w in enumerate(expression.split())]
    assert [tokens[i].word for i in sorted(noun_phrase(tokens))] == phrase


@pytest.mark.parametrize("rows, cols, height, width", [(3, 5, 30, 50), (4, 2, 40, 18), (6, 6, 36, 36)])
def test_one_hot_token_lands_in_its_pixel_cell(rows, cols, height, width):
    for r in range(rows):
        for c in range(cols):
            grid = torch.zeros(rows, cols)
            grid[r, c] = 1.0
            x, y = rm.argmax_point(rm.to_pixels(grid, height, width))
            assert int(y * rows / height) == r and int(x * cols / width) == c


def test_spatial_bias_scales_the_map_above_its_floor():
    """A background of 0.7 everywhere and the object (1.0) left of centre, cue "left": the ramp on the map itself
    would put the point at the image's left edge (0.7 x ramp ~1 beats 1.0 x ramp 0.6); above the floor it stays on
    the object."""
    from types import SimpleNamespace

    from nograd.methods.refam import RefAM, RefAMConfig

    heat = torch.full((8, 8), 0.7)
    heat[3:5, 2:4] = 1.0
    image = Image.new("RGB", (64, 64))
    heatmap, (x, y) = RefAM._finish(SimpleNamespace(config=RefAMConfig()), image, "the cup on the left",
                                    heat.flatten(), (8, 8))
    assert heatmap.shape == (64, 64) and 16 <= x < 32 and 24 <= y < 40


def test_spatial_ramps():
    ramp = rm.spatial_ramp(["left"], 4, 10)
    assert rm.argmax_point(ramp)[0] == 0 and bool((ramp[:, :-1] > ramp[:, 1:]).all())
    assert rm.argmax_point(rm.spatial_ramp(["bottom", "right"], 6, 6)) == (5, 5)
    middle = rm.spatial_ramp(["middle"], 3, 11)
    assert rm.argmax_point(middle)[0] == 5


def test_training_free_mask_recovers_a_blob_and_holds_the_point():
    yy, xx = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    blob = ((yy - 20) ** 2 / 100 + (xx - 50) ** 2 / 225) <= 1
    other = ((yy - 45) ** 2 + (xx - 15) ** 2) <= 36  # a second, weaker blob: another component
    heat = blob.float() * 0.9 + other.float() * 0.6 + 0.05 * torch.rand(60, 80, generator=torch.Generator().manual_seed(0))
    heat[16:19, 55:58] = 0.0  # a hole
    heat[20, 50] = 1.0
    point = rm.argmax_point(heat)
    mask = rm.heatmap_mask(rm.normalise(heat), point)
    assert mask[point[1], point[0]] and not mask[other].any()
    assert float((mask & blob).sum() / (mask | blob).sum()) > 0.9
    assert bool(mask[16:19, 55:58].all())  # holes filled
    assert 0 < rm.otsu_threshold(heat) < 1


def test_overlay_is_an_image_of_the_input_size():
    image = Image.new("RGB", (20, 12), (10, 20, 30))
    heat = torch.rand(12, 20)
    out = rm.overlay(image, heat, heat > 0.5, (3, 4))
    assert out.size == (20, 12) and out.mode == "RGB"


def test_refcoco_loader(tmp_path):
    Image.new("RGB", (10, 8)).save(tmp_path / "a.png")
    (tmp_path / "masks").mkdir()
    mask = Image.new("L", (10, 8), 0)
    mask.paste(255, (2, 1, 5, 4))
    mask.save(tmp_path / "masks" / "m.png")
    refs = {"refs": [
        {"file_name": "a.png", "sentences": ["left box", {"sent": "the box"}], "bbox": [1, 2, 3, 4], "split": "val"},
        {"file_name": "a.png", "sentences": ["poly"], "segmentation": [[0, 0, 4, 0, 4, 2, 0, 2], [8, 6, 10, 6, 10, 8]],
         "split": "val"},
        {"file_name": "a.png", "sentences": ["file"], "mask": "masks/m.png", "split": "test"},
    ]}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    data = nograd.data.refcoco(tmp_path)
    assert [s.expression for s in data] == ["left box", "the box", "poly", "file"]
    assert int(data[0].mask.sum()) == 12 and bool(data[0].mask[2:6, 1:4].all())
    poly = data[2].mask
    assert bool(poly[0:2, 0:4].all()) and int(poly[:3].sum()) == 8 and poly.shape == (8, 10)
    assert poly[6:, 8:].tolist() == [[True, True], [False, True]]  # centres inside or on the hypotenuse
    assert int(data[3].mask.sum()) == 9 and data[3].image.size == (10, 8)
    assert len(nograd.data.refcoco(tmp_path, split="val")) == 3 and len(nograd.data.refcoco(tmp_path, limit=1)) == 1
    with pytest.raises(FileNotFoundError, match="no refs.json"):
        nograd.data.refcoco(tmp_path / "masks")
    (tmp_path / "bad.json").write_text(json.dumps([{"file_name": "a.png", "sentences": ["x"]}]))
    with pytest.raises(ValueError, match="no segmentation, mask or bbox"):
        nograd.data.refcoco(tmp_path, annotations="bad.json")


def test_components_equal_a_breadth_first_search():
    from collections import deque

    for seed in range(3):
        fg = torch.rand(20, 30, generator=torch.Generator().manual_seed(seed)) > 0.45
        want = torch.full((20, 30), 600, dtype=torch.long)
        for y, x in fg.nonzero().tolist():
            if want[y, x] != 600:
                continue
            want[y, x], queue = y * 30 + x, deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for ny in range(max(cy - 1, 0), min(cy + 2, 20)):
                    for nx in range(max(cx - 1, 0), min(cx + 2, 30)):
                        if fg[ny, nx] and want[ny, nx] == 600:
                            want[ny, nx] = y * 30 + x
                            queue.append((ny, nx))
        assert torch.equal(rm.components(fg), want)
    assert rm.components(torch.zeros(3, 4, dtype=torch.bool)).eq(12).all()
