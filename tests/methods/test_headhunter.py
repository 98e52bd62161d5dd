"""HeadHunter: the greedy selection (mock rewards), resumable budgets, head-set files, and the search on a tiny SD3."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nograd
import nograd.headhunter as hh
from nograd.patches import adapter_for
from tiny.dit import build_pipeline

POOL = [(layer, head) for layer in range(3) for head in range(4)]
WEIGHTS = {p: float((7 * p[0] + 5 * p[1]) % 12) for p in POOL}  # a permutation of 0..11: no ties


def additive(head_sets):
    """Mock reward: the sum of planted per-head weights of the set."""
    additive.calls += len(head_sets)
    return [sum(WEIGHTS[p] for p in heads) for heads in head_sets]


additive.calls = 0


@pytest.mark.parametrize("k, rounds, batch", [(1, 4, 5), (3, 2, 12), (2, 3, 1)])
def test_greedy_returns_the_top_heads_in_order(k, rounds, batch):
    result = hh.greedy_select(POOL, additive, k=k, rounds=rounds, candidate_batch=batch)
    best = sorted(POOL, key=lambda p: -WEIGHTS[p])
    assert result.heads == best[: k * rounds] and len(set(result.heads)) == k * rounds and result.complete
    for r, (chosen, table) in enumerate(zip(result.rounds, result.scores)):
        assert len(table) == len(POOL) - r * k  # every remaining head scored, chosen ones excluded
        ranked = sorted(table, key=lambda key: -table[key])
        assert [f"{l},{h}" for l, h in chosen] == ranked[:k]


def test_ties_break_by_layer_then_head():
    result = hh.greedy_select([(1, 0), (0, 2), (0, 1)], lambda sets: [1.0] * len(sets), k=2, rounds=1)
    assert result.heads == [(0, 1), (0, 2)]


def test_budget_stops_and_a_resume_finishes_without_repeating_work(tmp_path):
    path = tmp_path / "search.json"
    full = hh.greedy_select(POOL, additive, k=2, rounds=2, candidate_batch=4)
    additive.calls = 0
    part = hh.greedy_select(POOL, additive, k=2, rounds=2, candidate_batch=4, budget=8,
                            on_progress=lambda s: s.save(path))
    assert not part.complete and additive.calls == 8 and len(part.pending) == 8
    saved = hh.HeadSet.load(path)
    assert not saved.complete and saved.pending == part.pending
    done = hh.greedy_select(POOL, additive, k=2, rounds=2, candidate_batch=4, state=saved)
    assert additive.calls == 12 + 10  # the 8 scored ones are not evaluated again
    assert done.heads == full.heads and done.scores == full.scores and done.complete


def test_a_budget_below_one_batch_still_makes_progress():
    """A call whose budget pays for fewer candidates than a batch scores those it pays for (was: none, forever)."""
    full = hh.greedy_select(POOL, additive, k=2, rounds=2, candidate_batch=4)
    state, calls = None, 0
    while state is None or not state.complete:
        before = len(state.pending) + sum(map(len, state.scores)) if state is not None else 0
        state = hh.greedy_select(POOL, additive, k=2, rounds=2, candidate_batch=4, budget=3, state=state)
        calls += 1
        assert state.complete or len(state.pending) + sum(map(len, state.scores)) > before
    assert state.heads == full.heads and state.scores == full.scores and calls > 2


def test_head_set_file_round_trip_and_model_check(tmp_path):
    path = tmp_path / "set.json"
    heads = hh.HeadSet([(1, 2), (0, 3)], "SD3Transformer2DModel", 2, 4, 8, rounds=[[(1, 2), (0, 3)]],
                       scores=[{"1,2": 2.0, "0,3": 1.0}], note="test")
    heads.save(path)
    assert json.loads(path.read_text())["format"] == hh.FORMAT
    loaded = hh.load_heads(str(path))
    assert loaded == heads and loaded.top(1).heads == [(1, 2)]
    flux = adapter_for(nograd.resolve(build_pipeline("flux"))[0])
    with pytest.raises(ValueError, match=r"made for SD3Transformer2DModel with 2 layers x 4 heads .* model class"):
        loaded.check(flux)
    with pytest.raises(ValueError, match=r"no paper example 'sd3-medium/nope'; known: sd3-medium/shearing"):
        hh.load_heads("paper:sd3-medium/nope")
    example = hh.load_heads("paper:sd3-medium/shearing")
    assert example.heads == [(11, 15)] and "unverified" in example.note and example.num_layers == 24


def test_search_finds_the_planted_head_and_writes_a_loadable_preset(tmp_path):
    """Toy reward: closeness to the image that perturbing the planted head alone produces (same prompt, seed, w, u,
    CFG off): that head scores ~0, every other one clearly less."""
    pipe = build_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, height=32, width=32)
    planted, prompt = (1, 2), "a red cat"
    with nograd.apply(pipe, "softpag", heads=[planted], u=1.0, scale=3.0):
        target = pipe(prompt, generator=torch.Generator().manual_seed(0), guidance_scale=0.0, output_type="pt",
                      **call).images

    def toy_reward(images, prompts):
        return -(images - target).abs().flatten(1).mean(1)

    path = tmp_path / "found.json"
    kwargs = dict(reward=toy_reward, prompts=[prompt], k=1, rounds=2, scale=3.0, candidate_batch=3, save=path,
                  pool={0: [0, 3], 1: "all"}, progress=False, **call)
    with pytest.raises(ValueError, match=r"budget=0 is not allowed; expected None or an integer >= 1"):
        nograd.headhunter.search(pipe, budget=0, **kwargs)
    partial = nograd.headhunter.search(pipe, budget=3, **kwargs)
    assert not partial.complete and partial.heads == [] and len(partial.pending) == 3
    found = nograd.headhunter.search(pipe, budget=3 + 5, **kwargs)  # resumes: 3 more (round 1) + 5 (round 2)
    assert found.complete and found.heads[0] == planted and len(found.heads) == 2
    assert found.config["images_generated_last_call"] == 8
    first = found.scores[0]
    assert len(first) == 6 and first["1,2"] > -1e-5 and max(v for key, v in first.items() if key != "1,2") < -1e-4
    assert nograd.attached(pipe) == []
    with nograd.apply(pipe, "headhunter", heads=str(path), top=1, u=1.0, scale=3.0) as handle:
        assert handle.stats["heads"] == [planted]
        again = pipe(prompt, generator=torch.Generator().manual_seed(0), guidance_scale=0.0, output_type="pt",
                     **call).images
    torch.testing.assert_close(again, target, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"holds a search with other settings \(k\)"):
        nograd.headhunter.search(pipe, **{**kwargs, "k": 2})


def test_search_inputs_are_checked_before_any_work_and_leave_no_handle(tmp_path):
    """Refused before the first image, with the pipeline left free: an empty pool, u = 0 or scale = 0 (they left the
    search's handle attached: every later apply failed), a str as prompts (searched per character), a non-'pt'
    output_type (the reward got other arrays), non-integer seeds, a save folder that does not exist, cfg_scale on
    FLUX (ignored). A reward of the wrong shape or with NaN stops the search (it was broadcast, or ranked first)."""
    pipe = build_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    common = dict(reward=lambda images, prompts: torch.zeros(len(images)), prompts=["a cat"], k=1, rounds=1,
                  pool={0: [0, 1]}, progress=False, num_inference_steps=1, height=32, width=32)
    bad = [(dict(pool=[]), ValueError, "pool selects no head"), (dict(u=0.0), ValueError, "u=0.0, scale=None"),
           (dict(scale=0), ValueError, "scale=0 are not allowed"), (dict(prompts="a cat"), TypeError, "list of str"),
           (dict(output_type="np"), ValueError, "output_type='np'"), (dict(seeds=[1.5]), ValueError, "seeds"),
           (dict(save=tmp_path / "none" / "x.json"), FileNotFoundError, "no folder")]
    for options, error, match in bad:
        with pytest.raises(error, match=match):
            nograd.headhunter.search(pipe, **{**common, **options})
        assert nograd.attached(pipe) == []
    with pytest.raises(ValueError, match="cfg_scale=5 is not allowed on FluxPipeline"):
        nograd.headhunter.search(build_pipeline("flux"), **{**common, "cfg_scale": 5})
    for reward in (lambda images, prompts: images.mean(), lambda images, prompts: torch.full((len(images),), math.nan)):
        with pytest.raises(ValueError, match="one finite score per image"):
            nograd.headhunter.search(pipe, **{**common, "reward": reward})
        assert nograd.attached(pipe) == []


def test_a_resume_needs_the_same_pool_and_reward_and_an_unfinished_set_is_not_applied_silently(tmp_path):
    pipe = build_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)

    def brightness(images, prompts):
        return images.flatten(1).mean(1)

    path = tmp_path / "s.json"
    common = dict(prompts=["a cat"], k=1, rounds=2, progress=False, save=path, num_inference_steps=1, height=32,
                  width=32)
    partial = nograd.headhunter.search(pipe, reward=brightness, pool={0: [0, 1, 2]}, budget=2, **common)
    assert not partial.complete and partial.heads == []
    with pytest.raises(ValueError, match=r"unfinished search with no round done yet"):
        nograd.apply(pipe, "headhunter", heads=str(path))
    with pytest.raises(ValueError, match=r"other settings \(pool\)"):  # only its size was compared
        nograd.headhunter.search(pipe, reward=brightness, pool={1: [0, 1, 2]}, **common)

    def darkness(images, prompts):
        return -images.flatten(1).mean(1)

    with pytest.raises(ValueError, match=r"other settings \(reward\)"):
        nograd.headhunter.search(pipe, reward=darkness, pool={0: [0, 1, 2]}, **common)
    one_round = nograd.headhunter.search(pipe, reward=brightness, pool={0: [0, 1, 2]}, budget=1 + 1, **common)
    assert len(one_round.rounds) == 1 and not one_round.complete
    with pytest.warns(UserWarning, match=r"unfinished search \(1 of 2 rounds\)"):
        with nograd.apply(pipe, "headhunter", heads=str(path)) as handle:
            assert handle.stats["heads"] == one_round.heads
    assert nograd.attached(pipe) == []


def test_estimate():
    assert hh.estimate(576, 5, 3, 5, 20) == {"images": (576 + 573 + 570 + 567 + 564) * 5,
                                             "transformer_rows": 14250 * 20 * 2}


@pytest.mark.parametrize("cfg_scale", [None, 1.5])
def test_search_runs_a_fresh_pipeline_at_its_cfg_scale(cfg_scale):
    """A pipeline that never ran has no guidance state yet; the search still passes ``cfg_scale`` (default 0: CFG off,
    the official setting), not the pipeline's own default of 7."""
    pipe = build_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def reward(images, prompts):
        seen.append(pipe.guidance_scale)
        return [0.0] * len(images)

    options = {} if cfg_scale is None else {"cfg_scale": cfg_scale}
    nograd.headhunter.search(pipe, reward=reward, prompts=["a cat"], k=1, rounds=1, pool={0: [0, 1]}, progress=False,
                             num_inference_steps=1, height=32, width=32, **options)
    assert seen and set(seen) == {0.0 if cfg_scale is None else cfg_scale}
