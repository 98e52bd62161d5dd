"""The PyramidDrop / FastV stage schedule and cost counters: the paper's FLOPs table on LLaVA-1.5-7B / LLaVA-NeXT-7B
shapes, the official kept counts, floor and min_keep, the token-budget solve, validation, and the whole-sequence
counters written out by hand."""

from __future__ import annotations

import pytest
import transformers as tf

from nograd.methods.drop_schedule import (DropSchedule, decode_macs, kv_bytes_saved, paper_flops, prefill_macs,
                                          scoring_macs)


@pytest.fixture(scope="module")
def llama_7b():
    """The language model of LLaVA-1.5-7B / LLaVA-NeXT-7B (Vicuna-7B), shapes only."""
    return tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32)


def flops(config, plan: DropSchedule, n_visual: int) -> float:
    return paper_flops(plan.tokens_per_layer(n_visual), config.hidden_size, config.intermediate_size)


@pytest.mark.parametrize("stages, boundaries, expected", [(1, (), 3.817e12), (4, (8, 16, 24), 1.777e12),
                                                          (3, (10, 20), 2.134e12), (5, (6, 12, 18, 24), 1.391e12)])
def test_paper_flops_table_of_llava_1_5_7b(llama_7b, stages, boundaries, expected):
    """Spec §1.5: the v2 appendix's stage ablation (3.82 / 1.78 / 2.13 / 1.38 T), reproduced to 1e-3."""
    plan = DropSchedule.even(llama_7b.num_hidden_layers, stages)
    assert plan.boundaries == boundaries
    assert flops(llama_7b, plan, 576) == pytest.approx(expected, rel=1e-3)


def test_paper_flops_of_llava_next_is_the_abstracts_55_percent(llama_7b):
    plan = DropSchedule.even(llama_7b.num_hidden_layers)
    before = flops(llama_7b, DropSchedule.even(32, stages=1), 2880)
    after = flops(llama_7b, plan, 2880)
    assert before == pytest.approx(20.83e12, rel=1e-3) and after == pytest.approx(9.47e12, rel=1e-3)
    assert after / before == pytest.approx(0.454, abs=1e-3)


def test_paper_flops_is_the_per_layer_formula():
    d, m = 8, 20
    assert paper_flops([3, 3, 1, 0], d, m) == 2 * (4 * 3 * 64 + 2 * 9 * 8 + 3 * 3 * 8 * 20) + (4 * 64 + 2 * 8 + 3 * 160)


def test_even_default_is_the_official_schedule():
    plan = DropSchedule.even(32)
    assert plan.boundaries == (8, 16, 24) and plan.keep == (0.5, 0.25, 0.125) and plan.min_keep == 1
    assert plan.kept_counts(576) == [576, 288, 144, 72]
    assert plan.kept_counts(2880) == [2880, 1440, 720, 360]
    assert plan.mean_tokens(576) == 270
    assert plan.tokens_per_layer(576) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert [plan.stage_of_layer(i) for i in (0, 7, 8, 15, 16, 23, 24, 31)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("depth, boundaries", [(24, (6, 12, 18)), (28, (7, 14, 21)), (40, (10, 20, 30)),
                                               (30, (7, 14, 21)), (8, (2, 4, 6)), (4, (1, 2, 3))])
def test_even_scales_to_other_depths(depth, boundaries):
    assert DropSchedule.even(depth).boundaries == boundaries


def test_even_with_one_stage_drops_nothing():
    plan = DropSchedule.even(32, stages=1)
    assert plan.boundaries == () and plan.kept_counts(576) == [576] and plan.mean_tokens(576) == 576


def test_fastv_is_the_one_stage_case():
    plan = DropSchedule.one_stage(32, 2, 0.5)
    assert plan == DropSchedule(32, (2,), (0.5,))
    assert plan.kept_counts(576) == [576, 288]
    assert plan.tokens_per_layer(576) == [576, 576] + [288] * 30


@pytest.mark.parametrize("n, counts", [(64, [64, 32, 16, 8]), (24, [24, 12, 6, 3]), (16, [16, 8, 4, 2]),
                                       (7, [7, 3, 1, 1]), (1, [1, 1, 1, 1]), (0, [0, 0, 0, 0])])
def test_kept_counts_floor_the_original_count(n, counts):
    """Spec §1.1 / §5.7: floor(N * r_s) of the original N; A5: at least min_keep=1 when N * r < 1; N = 0: none."""
    assert DropSchedule(8, (2, 4, 6), (0.5, 0.25, 0.125)).kept_counts(n) == counts


def test_kept_counts_min_keep():
    assert DropSchedule(8, (2, 4, 6), (0.5, 0.25, 0.125), min_keep=0).kept_counts(7) == [7, 3, 1, 0]
    assert DropSchedule(8, (2, 4, 6), (0.5, 0.25, 0.125), min_keep=5).kept_counts(64) == [64, 32, 16, 8]
    assert DropSchedule(8, (2, 4, 6), (0.5, 0.25, 0.125), min_keep=5).kept_counts(16) == [16, 8, 5, 5]
    assert DropSchedule(8, (2,), (0.5,), min_keep=5).kept_counts(3) == [3, 3]  # never more than the row has


def test_kept_counts_floor_the_fraction_as_written():
    """100 * 0.29 is 28.999999999999996 in floats; the count is the floor of the decimal product, 29."""
    assert DropSchedule(8, (2, 4), (0.58, 0.29)).kept_counts(100) == [100, 58, 29]
    assert DropSchedule(8, (2,), (0.3,)).kept_counts(10) == [10, 3]


@pytest.mark.parametrize("ratio, n, counts", [(0.3, 1000, [1000, 300, 90, 27]), (0.7, 1000, [1000, 700, 490, 343]),
                                              (0.5, 1000, [1000, 500, 250, 125]), (0.5, 7, [7, 3, 1, 1])])
def test_even_counts_floor_the_power_of_the_ratio(ratio, n, counts):
    """Spec §1.1 floor(N * lambda^s), like the official explicit list [0.3, 0.09, 0.027]: 0.3 ** 3 is
    0.026999999999999996 in floats and 0.7 ** 3 is 0.3429999999999999, yet 1000 of them keep 27 and 343."""
    assert DropSchedule.even(32, 4, ratio).kept_counts(n) == counts
    assert DropSchedule(32, (8, 16, 24), (ratio, ratio ** 2, ratio ** 3)).kept_counts(n) == counts


@pytest.mark.parametrize("tokens, rho", [(192, 0.5417), (128, 0.3194), (64, 0.0972)])
def test_budget_solves_the_mean_tokens_per_layer(tokens, rho):
    """Spec §1.5: [2, 10, 20] with halving after the first drop averages 36 + 288 rho on 576 tokens."""
    plan = DropSchedule.for_budget(32, 576, tokens)
    assert plan.boundaries == (2, 10, 20)
    assert plan.keep == pytest.approx((rho, rho / 2, rho / 4), abs=1e-4)
    assert tokens - 1 < plan.mean_tokens(576) <= tokens


def test_budget_with_boundaries_and_other_depths():
    plan = DropSchedule.for_budget(32, 576, 192, boundaries=[8, 16, 24])
    assert plan.boundaries == (8, 16, 24) and 191 < plan.mean_tokens(576) <= 192
    with pytest.raises(ValueError, match=r"tokens=128 .* \(144, 396\]"):  # layers 0-7 alone average 144
        DropSchedule.for_budget(32, 576, 128, boundaries=[8, 16, 24])
    assert DropSchedule.for_budget(16, 576, 128).boundaries == (1, 5, 10)
    assert DropSchedule.for_budget(64, 576, 128).boundaries == (4, 20, 40)
    assert DropSchedule.for_budget(8, 64, 16).boundaries == (1, 2, 5)  # round(0.5) = 0, moved to layer 1
    assert DropSchedule.for_budget(3, 64, 40).boundaries == (1, 2)  # the third does not fit


def test_budget_of_the_whole_image_keeps_everything():
    plan = DropSchedule.for_budget(32, 576, 576)
    assert plan.boundaries == (2, 10, 20) and plan.keep == (1.0, 1.0, 1.0) and plan.mean_tokens(576) == 576


@pytest.mark.parametrize("n, tokens", [(576, 0), (576, -3), (576, 577), (0, 1), (576, 36), (576, 330)])
def test_budget_out_of_reach_raises(n, tokens):
    """The first 2 of 32 layers see all 576 tokens (36 on average); rho <= 1 reaches at most 324."""
    with pytest.raises(ValueError, match="tokens="):
        DropSchedule.for_budget(32, n, tokens)


@pytest.mark.parametrize("args, field", [
    ((32, (16, 8, 24), (0.5, 0.25, 0.125)), "boundaries"),
    ((32, (8, 8, 24), (0.5, 0.25, 0.125)), "boundaries"),
    ((32, (0, 16, 24), (0.5, 0.25, 0.125)), "boundaries"),
    ((32, (8, 16, 32), (0.5, 0.25, 0.125)), "boundaries"),
    ((32, (8, 16.0, 24), (0.5, 0.25, 0.125)), "boundaries"),
    ((32, (8, 16, 24), (1.5, 0.25, 0.125)), "keep"),
    ((32, (8, 16, 24), (0.5, 0.0, 0.0)), "keep"),
    ((32, (8, 16, 24), (0.5, -0.25, -0.5)), "keep"),
    ((32, (8, 16, 24), (0.5, 0.25)), "keep"),
    ((32, (8, 16, 24), (0.125, 0.25, 0.5)), "keep"),
    ((0, (), ()), "num_layers"),
    ((32, (8,), (0.5,), -1), "min_keep"),
])
def test_validation_names_the_field(args, field):
    with pytest.raises(ValueError, match=rf"DropSchedule: {field}=.*expected"):
        DropSchedule(*args)


def test_even_and_layers_out_of_range_raise():
    with pytest.raises(ValueError, match="stages="):
        DropSchedule.even(3, stages=4)
    with pytest.raises(ValueError, match="layer=32"):
        DropSchedule.even(32).stage_of_layer(32)


def test_full_counters_written_out():
    """Spec §5.6 with a GQA shape: d = 8, d_kv = 4, m = 20, H = 2, d_h = 4."""
    d, kv, m = 8, 4, 20
    assert prefill_macs([5, 3], d, kv, m) == sum(n * d * (2 * d + 2 * kv) + 2 * n * n * d + 3 * n * d * m
                                                 for n in (5, 3))
    assert prefill_macs([5], d, kv, m) == 5 * 8 * 24 + 2 * 25 * 8 + 3 * 5 * 8 * 20
    assert scoring_macs(5, d, kv, 2, 4) == 5 * 8 * 4 + 64 + 5 * 2 * 4
    assert decode_macs([6, 4], d, kv, m) == 2 * (8 * 24 + 3 * 8 * 20) + 2 * 6 * 8 + 2 * 4 * 8
    assert kv_bytes_saved([0, 0, 32, 48], kv, 2) == 80 * 2 * 4 * 2


def test_full_prefill_counter_of_llava_1_5_7b(llama_7b):
    """With 40 text tokens, the default schedule leaves about half the whole-sequence MACs of the plain model."""
    d, m = llama_7b.hidden_size, llama_7b.intermediate_size
    kv = llama_7b.num_key_value_heads * (llama_7b.hidden_size // llama_7b.num_attention_heads)
    plan = DropSchedule.even(llama_7b.num_hidden_layers)
    before = prefill_macs([616] * 32, d, kv, m)
    after = prefill_macs([40 + n for n in plan.tokens_per_layer(576)], d, kv, m)
    assert before == pytest.approx(32 * (616 * 4096 * 16384 + 2 * 616 ** 2 * 4096 + 3 * 616 * 4096 * 11008))
    assert 0.45 < after / before < 0.55
