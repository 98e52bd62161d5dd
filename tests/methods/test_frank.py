"""FRANK in place (``nograd.apply(mllm, "frank", ...)``) on a homologous trio of tiny models built from configs.

base = a tiny Qwen2; the MLLM = a tiny Qwen2.5-VL whose language model is the base plus 0.01 noise; the reasoning
LLM = the base plus 0.02 noise (spec ``frank.md`` §5.7).
"""

from __future__ import annotations

import copy
import importlib
import itertools
import math

import pytest
import torch

import nograd
import tiny
from checks import attn_names, same_state, snapshot
from nograd.methods.frank import coefficients, depth_prior, fit_decay, FrankConfig
from nograd.tiny.vlm_families import noisy
from tiny import vlm
from tiny.trio import make_trio

M = importlib.import_module("nograd.merge")
LAYERS = 4


@pytest.fixture(scope="module")
def trio():
    return make_trio(LAYERS)


def fresh(trio):
    mllm, reasoning, base = trio
    return copy.deepcopy(mllm), reasoning, base


def layer_state(mllm, layer):
    return {n: p.detach().clone() for n, p in mllm.get_decoder().layers[layer].named_parameters()}


def outside_layers(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items() if ".layers." not in n or "visual" in n}


def test_lambda_r_zero_is_the_mllm_bit_for_bit(trio):
    mllm, reasoning, base = fresh(trio)
    saved = snapshot(mllm)
    with nograd.apply(mllm, "frank", reasoning=reasoning, base=base, prior=[1.0] * LAYERS) as h:
        assert same_state(mllm, saved)
        assert h.stats["lambda_r"] == [0.0] * LAYERS and h.stats["layers"] == [] and h.stats["tensors_merged"] == 0
    with nograd.apply(mllm, "frank", reasoning=reasoning, coef="prior", prior=[1.0] * LAYERS):  # no base needed
        assert same_state(mllm, saved)
    with nograd.apply(mllm, "frank", reasoning=reasoning, rule="linear", lambda_r=0.0):
        assert same_state(mllm, saved)


def test_merged_tensors_follow_the_closed_form(trio):
    """Layers with π_V = 1 and everything outside the decoder stay bit-identical; merged tensors equal
    θ_0 + λ_V τ_V + λ_R τ_R with λ from norms computed here in fp64 (spec §5.7, tests 2-5)."""
    mllm, reasoning, base = fresh(trio)
    prior = [1.0, 1.0, 0.6, 0.0]
    before = [layer_state(mllm, i) for i in range(LAYERS)]
    rest = outside_layers(mllm)
    sources = snapshot(reasoning), snapshot(base)
    h = nograd.apply(mllm, "frank", reasoning=reasoning, base=base, prior=prior)
    assert same_state(reasoning, sources[0]) and same_state(base, sources[1])  # the sources are only read
    assert h.stats["layers"] == [2, 3] and h.stats["kept_layers"] == [0, 1]
    assert h.stats["tensors_merged"] == 2 * len(before[0])
    after = [layer_state(mllm, i) for i in range(LAYERS)]
    for i in (0, 1):
        assert all(torch.equal(after[i][n], before[i][n]) for n in before[i])
    state = mllm.state_dict()
    assert all(torch.equal(state[n], t) for n, t in rest.items())  # vision, projector, embeddings, norm, lm_head
    for i in (2, 3):
        v = before[i]
        r = {n: p.detach().double() for n, p in reasoning.model.layers[i].named_parameters()}
        b = {n: p.detach().double() for n, p in base.model.layers[i].named_parameters()}
        a_v = sum(float(((v[n].double() - b[n]) ** 2).sum()) for n in v)
        a_r = sum(float(((r[n] - b[n]) ** 2).sum()) for n in v)
        lam_v = prior[i] * a_v / (prior[i] * a_v + (1 - prior[i]) * a_r)
        assert h.stats["lambda_v"][i] == pytest.approx(lam_v, rel=1e-9)
        assert h.stats["lambda_v"][i] + h.stats["lambda_r"][i] == 1.0
        for n in v:
            expected = b[n] + lam_v * (v[n].double() - b[n]) + (1 - lam_v) * (r[n] - b[n])
            torch.testing.assert_close(after[i][n].double(), expected, atol=1e-6, rtol=0)
    assert 0.5 < h.stats["lambda_r"][2] < 1 and h.stats["lambda_r"][3] == 1.0
    for i in (3,):  # π_V = 0: exactly the reasoning layer
        assert all(torch.equal(after[i][n], p) for n, p in reasoning.model.layers[i].named_parameters())
    h.remove()
    assert all(torch.equal(layer_state(mllm, i)[n], before[i][n]) for i in range(LAYERS) for n in before[i])


def test_layers_outside_the_range_are_unchanged(trio):
    mllm, reasoning, base = fresh(trio)
    before = [layer_state(mllm, i) for i in range(LAYERS)]
    with nograd.apply(mllm, "frank", reasoning=reasoning, rule="linear", lambda_r=0.5, layers=(1, 3)) as h:
        assert h.stats["layers"] == [1, 2]
        for i in range(LAYERS):
            same = all(torch.equal(layer_state(mllm, i)[n], before[i][n]) for n in before[i])
            assert same == (i in (0, 3))
    with nograd.apply(mllm, "frank", reasoning=reasoning, rule="linear", lambda_r=0.5, keep_shallow_layers=3) as h:
        assert h.stats["layers"] == [3]


def test_closed_form_is_the_grid_argmin_of_the_objective():
    """Synthetic orthogonal task vectors (disjoint supports): (15*) = arg-min over a 0.005 grid of
    S(λ) = Σ_t π_t a_t ‖λ_V τ_V + λ_R τ_R − τ_t‖² (spec §1.4-1.5)."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(400, generator=g)
    tau_v, tau_r = torch.zeros(400), torch.zeros(400)
    tau_v[:200] = 0.3 * torch.randn(200, generator=g)
    tau_r[200:] = 0.5 * torch.randn(200, generator=g)
    a_v, a_r, cos = M.layer_stats([(b + tau_v, b + tau_r, b)])
    assert cos == 0.0
    grid = torch.arange(0, 1.0001, 0.005, dtype=torch.float64)
    lv, lr = torch.meshgrid(grid, grid, indexing="ij")
    tv, tr = tau_v.double(), tau_r.double()
    for pi in (1.0, 0.8, 0.5, 0.2, 0.0):
        dist_v = ((lv - 1) ** 2) * (tv @ tv) + lr**2 * (tr @ tr)  # ‖λ_V τ_V + λ_R τ_R − τ_V‖², τ_V ⟂ τ_R
        dist_r = lv**2 * (tv @ tv) + ((lr - 1) ** 2) * (tr @ tr)
        objective = pi * a_v * dist_v + (1 - pi) * a_r * dist_r
        k = int(torch.argmin(objective))
        lam_v, lam_r = coefficients(pi, a_v, a_r, "frank")
        assert abs(float(lv.flatten()[k]) - lam_v) <= 1e-2 and abs(float(lr.flatten()[k]) - lam_r) <= 1e-2
        assert lam_v + lam_r == 1.0
    assert coefficients(1.0, a_v, a_r) == (1.0, 0.0) and coefficients(0.0, a_v, a_r) == (0.0, 1.0)
    assert coefficients(0.5, 0.0, 0.0) == (1.0, 0.0)
    # MetaGPT's (13*) is invariant to scaling both task vectors
    scaled = M.layer_stats([(b + 3 * tau_v, b + 3 * tau_r, b)])
    assert coefficients(0.5, *scaled[:2], "metagpt")[0] == pytest.approx(coefficients(0.5, a_v, a_r, "metagpt")[0])


def test_prior_fit_recovers_the_decay():
    depth = 12
    x = [layer / (depth - 1) for layer in range(depth)]
    r = [0.4 * math.exp(-3 * t) + 0.02 for t in x]
    fit = fit_decay(r)
    assert fit["beta"] == pytest.approx(3.0, rel=0.05) and fit["rmse"] < 1e-6
    config = FrankConfig.from_options({"reasoning": "unused", "coef": "prior", "prior": "attention",
                                       "calibration": {"input_ids": torch.zeros(1, 1)}})
    pi = depth_prior(config, depth, r)["pi_v"]
    assert pi[0] == pytest.approx(1.0) and pi[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(pi))
    first = FrankConfig.from_options({"reasoning": "unused", "coef": "prior", "prior": "attention",
                                      "prior_normalize": "first", "calibration": {"input_ids": torch.zeros(1, 1)}})
    assert depth_prior(first, depth, r)["pi_v"][-1] == pytest.approx((0.4 * math.exp(-3) + 0.02) / 0.42, rel=1e-3)
    data_free = depth_prior(FrankConfig.from_options({"reasoning": "unused", "coef": "prior"}), depth)
    assert data_free["prior_source"] == "exp" and data_free["pi_v"][-1] == pytest.approx(math.exp(-3))
    weak = [0.8 + 0.002 * math.exp(-3 * t) for t in x]  # a 0.25 % decay (random weights): still min-max, but warned
    with pytest.warns(UserWarning, match=r"varies by only 0\.2\d% over depth"):
        pi = depth_prior(config, depth, weak)["pi_v"]
    assert pi[0] == pytest.approx(1.0) and pi[-1] == pytest.approx(0.0, abs=1e-9)


def test_calibration_measures_image_attention_share(trio):
    mllm, reasoning, base = fresh(trio)
    names, saved = attn_names(mllm), snapshot(mllm)
    inputs = vlm.make_inputs("qwen2_5_vl", mllm)
    with pytest.warns(UserWarning, match="flat over depth"):  # random tiny weights: no decay to fit
        h = nograd.apply(mllm, "frank", reasoning=reasoning, base=base, calibration=[inputs])
    r = h.stats["r"]
    assert len(r) == LAYERS and all(0 < v < 1 for v in r)
    assert h.stats["prior_source"].startswith("exp") and len(h.stats["pi_v"]) == LAYERS
    assert not any(isinstance(v, torch.Tensor) for v in h.stats.values())
    assert attn_names(mllm) == names  # the attention path is gone after measuring
    h.remove()
    assert same_state(mllm, saved) and attn_names(mllm) == names


def test_text_model_copied_into_mllm_gives_identical_logits(trio):
    """π_V ≡ 0 with the reasoning LLM's embeddings, norm and lm_head: text-only logits equal the text model's."""
    mllm, reasoning, base = fresh(trio)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reasoning(ids).logits
        plain = mllm(input_ids=ids).logits
    with nograd.apply(mllm, "frank", reasoning=reasoning, base=base, prior=[0.0] * LAYERS,
                      non_layer_policy="reasoning") as h:
        assert h.stats["non_layer"] == ["embed", "norm", "lm_head"]
        with torch.no_grad():
            assert torch.equal(mllm(input_ids=ids).logits, want)
    with torch.no_grad():
        assert torch.equal(mllm(input_ids=ids).logits, plain)


def test_merge_policy_combines_non_layer_tensors_with_the_nearest_layers_coefficients(trio):
    """``non_layer_policy="merge"``: the embeddings take the first decoder layer's coefficients, the final norm and
    lm_head the last's; where that layer keeps the MLLM's (``keep_shallow_layers``) the tensor does too."""
    original = trio[0]
    mllm, reasoning, base = fresh(trio)
    saved = snapshot(mllm)
    parts = {"embed": lambda m: m.get_decoder().embed_tokens.weight, "norm": lambda m: m.get_decoder().norm.weight,
             "lm_head": lambda m: m.lm_head.weight}
    lam = [0.1, 0.4, 0.6, 0.9]
    with nograd.apply(mllm, "frank", reasoning=reasoning, rule="linear", lambda_r=lam, non_layer_policy="merge") as h:
        assert h.stats["non_layer"] == ["embed", "norm", "lm_head"]
        for role, get in parts.items():
            weight = lam[0] if role == "embed" else lam[-1]
            assert torch.equal(get(mllm), torch.lerp(get(original), get(reasoning), weight))
    assert same_state(mllm, saved)
    with nograd.apply(mllm, "frank", reasoning=reasoning, rule="linear", lambda_r=lam, keep_shallow_layers=1,
                      non_layer_policy="merge") as h:
        assert h.stats["non_layer"] == ["norm", "lm_head"]
        assert torch.equal(parts["embed"](mllm), parts["embed"](original))
    weights = (0.7, 0.5)  # task arithmetic: θ_0 + λ_V τ_V + λ_R τ_R on the non-layer tensors too
    with nograd.apply(mllm, "frank", reasoning=reasoning, base=base, rule="task_arithmetic", weights=weights,
                      non_layer_policy="merge"):
        for get in parts.values():
            b, v, r = get(base).float(), get(original).float(), get(reasoning).float()
            torch.testing.assert_close(get(mllm).float(), b + weights[0] * (v - b) + weights[1] * (r - b), atol=1e-6,
                                       rtol=0)
    assert same_state(mllm, saved)
    wider = copy.deepcopy(reasoning)
    wider.resize_token_embeddings(wider.config.vocab_size + 8)
    with pytest.raises(ValueError, match=r"shape mismatch at tensor .*embed_tokens.* identical vocabularies"):
        nograd.apply(mllm, "frank", reasoning=wider, rule="linear", non_layer_policy="merge")
    assert same_state(mllm, saved) and nograd.attached(mllm) == []


def test_failed_merge_leaves_the_model_untouched(trio, monkeypatch):
    mllm, reasoning, base = fresh(trio)
    saved = snapshot(mllm)
    broken = copy.deepcopy(reasoning)
    broken.model.layers[2].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 100))
    with pytest.raises(ValueError, match=r"shape mismatch at tensor 'model\.language_model\.layers\.2\.mlp\.down_proj"
                                         r"\.weight'"):
        nograd.apply(mllm, "frank", reasoning=broken, base=base, prior=[0.0] * LAYERS)
    assert same_state(mllm, saved) and nograd.attached(mllm) == []
    calls = []
    original = M.combine

    def failing(rule, v, *args, **kwargs):  # an error in the middle of the writes: layers 0-1 are already merged
        calls.append(1)
        if len(calls) > 2 * len(layer_state(mllm, 0)):
            raise RuntimeError("disk full")
        return original(rule, v, *args, **kwargs)

    monkeypatch.setattr(M, "combine", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        nograd.apply(mllm, "frank", reasoning=reasoning, base=base, prior=[0.0] * LAYERS)
    assert same_state(mllm, saved) and nograd.attached(mllm) == []


def test_sources_as_checkpoint_folders_give_the_same_merge(trio, tmp_path):
    mllm, reasoning, base = fresh(trio)
    reasoning.save_pretrained(tmp_path / "reasoning", max_shard_size="100KB")
    base.save_pretrained(tmp_path / "base")
    assert (tmp_path / "reasoning" / M.SAFE_INDEX).exists()
    options = dict(prior=[1.0, 0.7, 0.3, 0.0])
    with nograd.apply(mllm, "frank", reasoning=reasoning, base=base, **options) as h:
        in_memory, stats = snapshot(mllm), dict(h.stats)
    with nograd.apply(mllm, "frank", reasoning=str(tmp_path / "reasoning"), base=tmp_path / "base", **options) as h:
        assert same_state(mllm, in_memory) and h.stats["lambda_r"] == stats["lambda_r"]


def test_offloaded_mllm(trio, tmp_path):
    """accelerate device_map with a decoder layer on "disk" and one offloaded to "cpu": merged like in memory."""
    from accelerate.utils import align_module_device
    from transformers import Qwen2_5_VLForConditionalGeneration

    mllm, reasoning, base = fresh(trio)
    mllm.save_pretrained(tmp_path / "mllm")
    lm = "model.language_model"
    device_map = {"model.visual": "cpu", f"{lm}.embed_tokens": "cpu", f"{lm}.layers.0": "cpu",
                  f"{lm}.layers.1": "cpu", f"{lm}.layers.2": "disk", f"{lm}.layers.3": "disk",
                  f"{lm}.norm": "cpu", f"{lm}.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "mllm", device_map=device_map, offload_folder=tmp_path / "offload").eval()
    layer = offloaded.get_decoder().layers[3]
    assert layer.mlp.down_proj.weight.device.type == "meta"
    ids = torch.randint(4, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = offloaded(input_ids=ids).logits
    options = dict(reasoning=reasoning, base=base, prior=[1.0, 0.6, 0.3, 0.0])
    with nograd.apply(mllm, "frank", **options):
        want = layer_state(mllm, 3)
        with torch.no_grad():
            want_logits = mllm(input_ids=ids).logits
    with nograd.apply(offloaded, "frank", **options):
        with align_module_device(layer.mlp.down_proj, "cpu"):
            assert torch.equal(layer.mlp.down_proj.weight, want["mlp.down_proj.weight"])
        with torch.no_grad():
            torch.testing.assert_close(offloaded(input_ids=ids).logits, want_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=ids).logits, plain)


def test_cpu_offloaded_mllm(trio):
    """accelerate.cpu_offload keeps the weights in a plain dict (no disk loader): merged as in memory, restored."""
    import accelerate

    mllm, reasoning, base = fresh(trio)
    ids = torch.randint(4, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    options = dict(reasoning=reasoning, base=base, prior=[1.0, 0.6, 0.3, 0.0], non_layer_policy="merge")
    with torch.no_grad():
        plain = mllm(input_ids=ids).logits
        with nograd.apply(mllm, "frank", **options):
            want = mllm(input_ids=ids).logits
        accelerate.cpu_offload(mllm, execution_device="cpu")
        with nograd.apply(mllm, "frank", **options):
            torch.testing.assert_close(mllm(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        assert torch.equal(mllm(input_ids=ids).logits, plain)


def test_tied_offloaded_mllm_after_a_forward(trio, tmp_path):
    """accelerate's hooks put fresh meta parameters in place at a forward: a tied lm_head is then another object,
    with its own offloaded entry, and still takes the merged embeddings (it had kept the MLLM's: logits 1.1 off)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    mllm, reasoning, base = fresh(trio)
    mllm.config.tie_word_embeddings = True
    mllm.tie_weights()
    assert mllm.lm_head.weight is mllm.get_input_embeddings().weight
    mllm.save_pretrained(tmp_path / "mllm")
    offloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "mllm", device_map="auto", max_memory={"cpu": "200KB"}, offload_folder=tmp_path / "offload").eval()
    ids = torch.randint(4, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    options = dict(reasoning=reasoning, base=base, prior=[1.0, 0.6, 0.3, 0.0], non_layer_policy="merge")
    with torch.no_grad():
        plain = offloaded(input_ids=ids).logits
        assert offloaded.lm_head.weight is not offloaded.get_input_embeddings().weight
        with nograd.apply(mllm, "frank", **options) as h:
            want, stats = mllm(input_ids=ids).logits, h.stats
        with nograd.apply(offloaded, "frank", **options) as h:
            torch.testing.assert_close(offloaded(input_ids=ids).logits, want, atol=1e-5, rtol=0)
            assert h.stats["tensors_merged"] == stats["tensors_merged"] and h.stats["warnings"] == stats["warnings"]
        assert torch.equal(offloaded(input_ids=ids).logits, plain)


@pytest.mark.parametrize("options, name", [
    (dict(rule="ties", lambda_r=0.9), "lambda_r"), (dict(weights=(0.2, 0.2)), "weights"),
    (dict(rule="linear", prior=[1.0, 0.5, 0.2, 0.0]), "prior"), (dict(rule="task_arithmetic", density=0.3), "density"),
    (dict(rule="ties", seed=3), "seed"),
    (dict(prior="exp", calibration={"input_ids": torch.ones(1, 3)}), "calibration"),
    (dict(coef="metagpt", calibration={"input_ids": torch.ones(1, 3)}), "calibration"),
    (dict(lambda_r=0.5, prior_beta=1.0), "prior_beta"), (dict(rule="linear", coef="prior"), "coef"),
])
def test_an_option_the_rule_never_reads_is_refused(trio, options, name):
    """An option the chosen rule, coef or prior never reads was accepted and ignored silently (``lambda_r`` under
    ties merged with λ_R = 1; a calibration set with prior 'exp' was never run)."""
    mllm, reasoning, base = fresh(trio)
    saved = snapshot(mllm)
    with pytest.raises(ValueError, match=f"^frank: option {name} is read only by "):
        nograd.apply(mllm, "frank", reasoning=reasoning, base=base, **options)
    assert same_state(mllm, saved) and nograd.attached(mllm) == []


def test_validation_and_config_warnings(trio):
    mllm, reasoning, base = fresh(trio)
    saved = snapshot(mllm)
    with pytest.raises(ValueError, match="option base=None"):
        nograd.apply(mllm, "frank", reasoning=reasoning)
    with pytest.raises(ValueError, match="option base=None"):
        nograd.apply(mllm, "frank", reasoning=reasoning, rule="ties")
    with pytest.raises(TypeError, match="option reasoning"):
        nograd.apply(mllm, "frank")
    with pytest.raises(ValueError, match="option prior='attention'"):
        nograd.apply(mllm, "frank", reasoning=reasoning, base=base, prior="attention")
    with pytest.raises(ValueError, match="option rule='slerp'"):
        nograd.apply(mllm, "frank", reasoning=reasoning, rule="slerp")
    with pytest.raises(ValueError, match="option prior="):
        nograd.apply(mllm, "frank", reasoning=reasoning, base=base, prior=[1.0, 0.0])
    with pytest.raises(ValueError, match="option layers"):
        nograd.apply(mllm, "frank", reasoning=reasoning, base=base, layers=(2, 9))
    with pytest.raises(FileNotFoundError, match="base: no checkpoint at '/no/such/folder'"):
        nograd.apply(mllm, "frank", reasoning=reasoning, base="/no/such/folder")
    _, other, other_base = make_trio(LAYERS, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    with pytest.warns(UserWarning, match="rope_theta"):
        h = nograd.apply(mllm, "frank", reasoning=other, base=base, prior=[1.0, 0.5, 0.5, 0.0])
    assert any("rope_theta" in m for m in h.stats["mismatches"])
    h.remove()
    assert same_state(mllm, saved)


@pytest.mark.parametrize("options, error, match", [
    (dict(device=True), TypeError, r"option device=True .* a torch\.device, or a CUDA index"),  # a dtype cast for .to
    (dict(device=0.5), TypeError, r"option device=0\.5 .* a device string"),
    (dict(device=torch.tensor([0, 1])), TypeError, r"option device=tensor\(\[0, 1\]\) .* a device string"),
    (dict(device="gpu"), ValueError, r"option device='gpu' .* 'cpu', 'cuda' or 'cuda:1'"),
    (dict(device=-1), ValueError, r"option device=-1 .* CUDA index \(int >= 0\)"),
    (dict(calibration={"pixel_values": None}), ValueError,
     r"option calibration=.* processor outputs \(input_ids, attention_mask, pixel_values, \.\.\.\)"),
    (dict(reasoning=""), ValueError, r"option reasoning='' .* a non-empty path"),
    (dict(max_shard_size=0), ValueError, r"option max_shard_size=0 .* a positive int \(bytes\) or a size"),
    (dict(max_shard_size=-1), ValueError, r"option max_shard_size=-1 .* '5GB'"),
    (dict(max_shard_size="0GB"), ValueError, r"option max_shard_size='0GB' .* '5GB'"),
    (dict(max_shard_size=True), TypeError, r"option max_shard_size=True .* '5GB'"),
    (dict(keep_shallow_layers=LAYERS + 1), ValueError, rf"option keep_shallow_layers={LAYERS + 1} .* 0\.\.{LAYERS}"),
])
def test_bad_options_leave_the_model_untouched(trio, options, error, match):
    mllm, reasoning, base = fresh(trio)
    saved = snapshot(mllm)
    with pytest.raises(error, match=match):
        nograd.apply(mllm, "frank", **{"reasoning": reasoning, "base": base, **options})
    assert same_state(mllm, saved) and nograd.attached(mllm) == []


def test_device_spellings_give_the_same_merge(trio):
    mllm, reasoning, base = fresh(trio)
    with nograd.apply(mllm, "frank", reasoning=reasoning, base=base) as h:
        merged, lambda_r = snapshot(mllm), h.stats["lambda_r"]
    for device in ("cpu", torch.device("cpu")):
        with nograd.apply(mllm, "frank", reasoning=reasoning, base=base, device=device) as h:
            assert same_state(mllm, merged) and h.stats["lambda_r"] == lambda_r
    if torch.cuda.is_available():
        assert FrankConfig(reasoning=reasoning, base=base, device=0).device == 0  # a CUDA index


@pytest.mark.parametrize("device", ["meta", torch.device("meta")] + ([] if torch.cuda.is_available() else ["cuda", 0]))
def test_a_device_without_values_or_missing_here_is_refused_before_any_work(trio, device):
    mllm, reasoning, base = fresh(trio)
    saved = snapshot(mllm)
    with pytest.raises(ValueError, match=r"option device=.* of a device this machine has \(not 'meta'\)"):
        nograd.apply(mllm, "frank", reasoning=reasoning, base=base, device=device)
    assert same_state(mllm, saved) and nograd.attached(mllm) == []


def test_metagpt_and_non_orthogonal_warning(trio):
    mllm, reasoning, base = fresh(trio)
    with nograd.apply(mllm, "frank", reasoning=reasoning, base=base, coef="metagpt") as h:
        a_v, a_r = h.stats["a_v"], h.stats["a_r"]
        assert h.stats["pi_v"] is None
        assert h.stats["lambda_v"] == pytest.approx([v / (v + r) for v, r in zip(a_v, a_r)])
        assert h.stats["warnings"] == []
    twin = copy.deepcopy(reasoning)
    twin.model.load_state_dict(mllm.get_decoder().state_dict())  # τ_R = τ_V: cos = 1
    with pytest.warns(UserWarning, match="orthogonal"):
        h = nograd.apply(mllm, "frank", reasoning=twin, base=base, prior="exp")
    assert all(c == pytest.approx(1.0) for c in h.stats["cos"])
    h.remove()


def test_quantized_mllm_is_refused(trio):
    mllm, reasoning, base = fresh(trio)
    mllm.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ValueError, match="quantized"):
        nograd.apply(mllm, "frank", reasoning=reasoning, base=base)


def test_llava_in_place_with_measured_prior():
    """LLaVA (a Llama language model): calibration on its image tokens, merge from a Llama pair, bit-exact remove."""
    base = tiny.build("llama", vocab_size=160, num_hidden_layers=3, max_position_embeddings=512)
    mllm = tiny.build("llava", text_layers=3)
    mllm.get_decoder().load_state_dict(base.model.state_dict())
    noisy(mllm.get_decoder().layers, 0.01, 1)
    reasoning = copy.deepcopy(base)
    noisy(reasoning.model.layers, 0.02, 2)
    saved = snapshot(mllm)
    inputs = vlm.make_inputs("llava", mllm)
    with pytest.warns(UserWarning, match="flat"):
        h = nograd.apply(mllm, "frank", reasoning=reasoning, base=base, calibration=inputs, keep_shallow_layers=1)
    assert len(h.stats["r"]) == 3 and all(0 < v < 1 for v in h.stats["r"])
    assert h.stats["layers"] == [1, 2] and h.stats["mismatches"] == []
    with torch.no_grad():
        mllm(**inputs)
    h.remove()
    assert same_state(mllm, saved)
