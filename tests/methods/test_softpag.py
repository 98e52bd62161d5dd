"""SoftPAG / PAG / HeadHunter head sets on tiny SD3(.5) and FLUX pipelines: identities, diffusers oracles, guidance."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nograd
from checks import same_state, snapshot
from nograd.methods.softpag import image_identity_target, layer_modules, layer_names, reference_perturbed
from nograd.patches import adapter_for
from tiny.dit import BUILDERS, COLS, ROWS, build_pipeline, transformer_inputs

STEPS = dict(num_inference_steps=2, height=32, width=32)


def pipeline(family, **transformer_overrides):
    pipe = build_pipeline(family)
    if transformer_overrides:
        pipe.transformer = BUILDERS[family](**transformer_overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, prompt="a cat", seed=0, **kwargs):
    kwargs = {**STEPS, "output_type": "latent", "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(prompt=prompt, **kwargs).images


@pytest.fixture(scope="module")
def sd3():
    return pipeline("sd3")


@pytest.fixture(scope="module")
def flux():
    return pipeline("flux")


def untouched(model) -> bool:
    return (not model._forward_pre_hooks and not model._forward_hooks and "cache_context" not in model.__dict__
            and all(type(m.processor).__name__ != "NogradProcessor" for m in adapter_for(model).attention_modules))


# ---- identities ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_u0_no_heads_zero_scale_are_bit_identical_and_remove_restores(family, request):
    pipe = request.getfixturevalue(family)
    model, saved = pipe.transformer, snapshot(pipe.transformer)
    plain = images(pipe)
    for options in (dict(heads=None), dict(heads={0: "all"}, u=0.0), dict(heads=[(0, 1)], u=1.0, scale=0.0),
                    dict(heads=[(0, 1)], u=1.0, start=0.5, stop=0.5)):
        with nograd.apply(pipe, "softpag", **options) as handle:
            assert torch.equal(images(pipe), plain), options
            stats = handle.stats
            assert stats["perturbed_calls"] == stats["heads_touched"] == 0 and stats["layers"] == [], options
    handle = nograd.apply(pipe, "softpag", heads={0: [1]}, u=1.0)
    perturbed = images(pipe)
    assert handle.stats["heads_touched"] == 1 and handle.stats["perturbed_calls"] == 2
    assert handle.stats["extra_flops"] > 0 and not torch.equal(perturbed, plain)
    handle.remove()
    assert untouched(model) and same_state(model, saved) and pipe.transformer is model
    assert torch.equal(images(pipe), plain)


# ---- oracle A: diffusers' legacy SD3 PAG pipeline (image_identity) -------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_pag_image_identity_equals_diffusers_sd3_pag_pipeline(guidance_scale):
    """Precondition of the oracle: an SD3.0-shaped model without qk-norm (diffusers' PAG processors skip it)."""
    from diffusers import StableDiffusion3PAGPipeline

    pipe = pipeline("sd3", dual_attention_layers=(), qk_norm=None)
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    oracle = StableDiffusion3PAGPipeline(**components, pag_applied_layers=["blocks.0"])
    oracle.set_progress_bar_config(disable=True)
    want = images(oracle, guidance_scale=guidance_scale, pag_scale=3.0)
    with nograd.apply(pipe, "pag", layers=["blocks.0"], mode="image_identity", scale=3.0) as handle:
        got = images(pipe, guidance_scale=guidance_scale)
        assert handle.stats["layers"] == ["transformer_blocks.0"] and handle.stats["heads_touched"] == 4
    plain = images(pipe, guidance_scale=guidance_scale)
    assert (want - plain).abs().max() > 1e-3  # the PAG effect is real
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- oracle B: diffusers' attention-score skip hook (joint_identity) -----------------------------------------------
def skip_hooked(model, fqn, index):
    """A copy of ``model`` under ``LayerSkipConfig(skip_attention_scores=True)`` (diffusers' PAG guider), with the
    0.42 workarounds applied only where needed (spec §4.2)."""
    from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry
    from diffusers.hooks.layer_skip import LayerSkipConfig, _apply_layer_skip_hook

    hooked = copy.deepcopy(model)
    for module in hooked.modules():
        if type(module).__name__ == "FluxAttention" and not hasattr(module, "is_cross_attention"):
            module.is_cross_attention = False
        processor = getattr(module, "processor", None)
        if processor is not None:
            try:
                AttentionProcessorRegistry.get(type(processor))
            except ValueError:
                AttentionProcessorRegistry.register(type(processor), AttentionProcessorMetadata(lambda *a, **k: a[1]))
    config = LayerSkipConfig(indices=[index], fqn=fqn, skip_attention=False, skip_attention_scores=True,
                             skip_ff=False)
    _apply_layer_skip_hook(hooked, config)
    return hooked


@pytest.mark.parametrize("family, fqn, index, layer, overrides", [
    ("sd3", "transformer_blocks", 0, 0, {"dual_attention_layers": ()}),
    ("sd3", "transformer_blocks", 1, 1, {"dual_attention_layers": ()}),  # the context_pre_only block
    ("flux", "transformer_blocks", 1, 1, {}),
    ("flux", "single_transformer_blocks", 0, 2, {}),
])
def test_pag_joint_identity_equals_diffusers_skip_attention_scores(family, fqn, index, layer, overrides):
    model = BUILDERS[family](**overrides)
    inputs = transformer_inputs(family, model)
    with torch.no_grad():
        want = skip_hooked(model, fqn, index)(**inputs).sample
        with nograd.apply(model, "pag", layers=[layer]) as handle:
            with handle.perturbed_only():
                got = model(**inputs).sample
            guided = model(**inputs).sample
        plain = model(**inputs).sample
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    # no pipeline, no CFG: the guided output is cond + w (cond - ptb), w = the family default
    w = {"sd3": 3.0, "flux": 8.0}[family]
    torch.testing.assert_close(guided, plain + w * (plain - want), atol=2e-5, rtol=0)


# ---- only the selected heads change -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, layer", [("sd3", 0), ("flux", 0), ("flux", 2)])
@pytest.mark.parametrize("u", [0.25, 1.0])
def test_only_selected_heads_change_by_the_softpag_lerp(family, layer, u):
    """Planted: head 1 of one block; pre-output-projection per-head outputs (``to_out[0]`` / ``to_add_out`` made
    identities) equal ``(1-u) O + u V`` there, the explicit ``((1-u) A + u I) V``, and the plain output elsewhere."""
    model = BUILDERS[family]()
    adapter = adapter_for(model)
    attn = layer_modules(adapter)[layer]
    if getattr(attn, "to_out", None) is not None:  # (FLUX single blocks project outside the attention)
        attn.to_out[0] = nn.Identity()
    if getattr(attn, "to_add_out", None) is not None:
        attn.to_add_out = nn.Identity()
    seen = {}
    attn.register_forward_hook(lambda m, a, k, out: seen.__setitem__("out", out), with_kwargs=True)
    inputs = transformer_inputs(family, model)
    heads, head_dim = attn.heads, adapter.head_dim
    with torch.no_grad():
        model(**inputs)
        plain = seen["out"]
        with nograd.apply(model, "softpag", heads=[(layer, 1)], u=u) as handle, handle.perturbed_only():
            original = handle.adapter.joint_qkv

            def capture(*args):
                seen["qkv"] = original(*args)
                return seen["qkv"]

            handle.adapter.joint_qkv = capture
            model(**inputs)
            perturbed = seen["out"]
            del handle.adapter.joint_qkv

    def joint(out):  # (B, S, H*D) in the module's own token order
        if isinstance(out, tuple):
            image, text = out
            return torch.cat([text, image] if family == "flux" else [image, text], dim=1)
        return out

    plain, perturbed = joint(plain), joint(perturbed)
    q, k, v = seen["qkv"]
    per_head = lambda x: x.unflatten(-1, (heads, head_dim))  # noqa: E731
    changed = (per_head(perturbed) != per_head(plain)).any(dim=-1).any(dim=1)[0]
    assert changed.tolist() == [h == 1 for h in range(heads)]
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    expected = torch.lerp(sdpa[:, :, 1], v.transpose(1, 2)[:, :, 1], u)
    torch.testing.assert_close(per_head(perturbed)[:, :, 1], expected, atol=1e-6, rtol=0)
    weight = torch.tensor([[0.0, u] + [0.0] * (heads - 2)])
    explicit = reference_perturbed(q, k, v, weight, "joint_identity", {}, head_dim ** -0.5).transpose(1, 2)
    torch.testing.assert_close(per_head(perturbed), explicit, atol=1e-5, rtol=0)


def test_image_identity_target_equals_dense_masked_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64) for _ in range(3))
    image, text = slice(0, 7), slice(7, 11)
    allowed = torch.ones(11, 11, dtype=torch.bool)
    allowed[image, image] = torch.eye(7, dtype=torch.bool)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    target = image_identity_target(q, k, v, image, text, 0.5)
    torch.testing.assert_close(target.double(), F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.5)
                               [:, :, image], atol=1e-6, rtol=0)
    assert dense.shape == (2, 3, 11, 4)


# ---- reference path == fast path; batched == separate calls; window ---------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("mode", ["joint_identity", "image_identity"])
def test_reference_path_equals_fast_path(family, mode, request):
    pipe = request.getfixturevalue(family)
    heads = {0: [0, 1], 1: [1]}
    out = {}
    for path in ("fast", "reference"):
        with nograd.apply(pipe, "softpag", heads=heads, u=0.5, mode=mode, path=path):
            out[path] = images(pipe)
    torch.testing.assert_close(out["reference"], out["fast"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_u1_heads_skip_the_attention_product(family, request, monkeypatch):
    """Heads at u = 1 never reach SDPA: against u = 0.5 on the same heads, exactly ``identity_heads_skipped`` fewer
    (row, head) pairs are computed; the reference path (which computes them) gives the same images."""
    pipe = request.getfixturevalue(family)
    heads = {0: [1], 1: "all"}
    sdpa = F.scaled_dot_product_attention
    computed = []

    def counting(query, *args, **kwargs):
        computed.append(query.shape[0] * query.shape[1])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    runs = {}
    for u, path in ((0.5, "fast"), (1.0, "fast"), (1.0, "reference")):
        computed.clear()
        with nograd.apply(pipe, "softpag", heads=heads, u=u, path=path) as handle:
            runs[u, path] = images(pipe), sum(computed), dict(handle.stats)
    monkeypatch.undo()
    stats = runs[1.0, "fast"][2]
    per_call = len(heads[0]) + layer_modules(adapter_for(pipe.transformer))[1].heads
    assert stats["identity_heads_skipped"] == stats["perturbed_calls"] * per_call > 0
    assert runs[0.5, "fast"][1] - runs[1.0, "fast"][1] == stats["identity_heads_skipped"]
    assert runs[0.5, "fast"][2]["identity_heads_skipped"] == 0 and stats["attention_flops_saved"] > 0
    torch.testing.assert_close(runs[1.0, "fast"][0], runs[1.0, "reference"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_image_identity_u1_heads_skip_the_product_and_equal_the_reference(family, request):
    """image_identity at u = 1: the full attention of those heads is skipped (their text rows are recomputed alone,
    their image rows are the target), the images equal the explicit map's."""
    pipe = request.getfixturevalue(family)
    heads = {0: [1], 1: "all"}
    out = {}
    for path in ("fast", "reference"):
        with nograd.apply(pipe, "softpag", heads=heads, u=1.0, mode="image_identity", path=path) as handle:
            out[path] = images(pipe)
            stats = dict(handle.stats)
    per_call = len(heads[0]) + layer_modules(adapter_for(pipe.transformer))[1].heads
    assert stats["identity_heads_skipped"] == 0  # the reference path computes everything
    with nograd.apply(pipe, "softpag", heads=heads, u=1.0, mode="image_identity") as handle:
        images(pipe)
        assert handle.stats["identity_heads_skipped"] == handle.stats["perturbed_calls"] * per_call > 0
    torch.testing.assert_close(out["fast"], out["reference"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_late_fork_runs_earlier_blocks_at_the_plain_batch(family, request):
    """Spec §5.5: the perturbed rows join at the first perturbed block (FLUX: a single-stream one); blocks before it
    see only the pipeline's rows, the result equals the input-forked branch."""
    pipe = request.getfixturevalue(family)
    blocks = adapter_for(pipe.transformer).decoder_layers
    first = len(blocks) - 1
    out, seen, flops = {}, {}, {}
    for late in (False, True):
        with nograd.apply(pipe, "softpag", heads={first: "all"}, u=1.0, late_fork=late) as handle:
            hooks = [b.register_forward_pre_hook(
                lambda m, a, k, i=i: seen.setdefault((late, i), set()).add(k["hidden_states"].shape[0]),
                with_kwargs=True) for i, b in enumerate(blocks)]
            out[late] = images(pipe, guidance_scale=5.0)
            for hook in hooks:
                hook.remove()
            stats = dict(handle.stats)
        assert stats["fork_block"] == (first if late else 0)
        flops[late] = stats["extra_flops"] / stats["perturbed_calls"]
    assert flops[True] < flops[False] / 2  # one block (and norm_out) of the branch instead of all of them
    plain, grown = (2, 3) if family == "sd3" else (1, 2)  # CFG's [uncond, cond]; FLUX's distilled guidance: [cond]
    assert all(seen[False, i] == {grown} for i in range(len(blocks)))
    assert all(seen[True, i] == ({grown} if i == first else {plain}) for i in range(len(blocks)))
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)
    assert untouched(pipe.transformer)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_extra_flops_are_the_flops_torch_counts_for_the_extra_rows(family):
    """``extra_flops``: a row forked at the input (or run separately, batch=False) costs one plain transformer
    forward of a row, as torch's FlopCounterMode counts it (linears, the patch conv, attention on the math path);
    a later call of the shape reuses the figure. A parameter count times the tokens had overstated it 2-4x (the
    joint blocks route image and text tokens through separate weights; attention was left out). Late-forked, the
    rows cost what FlopCounterMode counts for the modules from the fork block on."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = BUILDERS[family]()
    adapter = adapter_for(model)
    one = {k: v[:1] if k not in ("img_ids", "txt_ids") else v for k, v in transformer_inputs(family, model).items()}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**one)
    plain = counter.get_total_flops()
    for options in (dict(late_fork=False), dict(batch=False)):
        with nograd.apply(model, "softpag", heads={0: "all"}, u=0.5, **options) as handle, torch.no_grad():
            model(**one)
            model(**one)
            assert handle.stats["perturbed_rows"] == 2 and handle.stats["extra_flops"] == 2 * plain
    first = len(adapter.decoder_layers) - 1
    names = [name for name, module in model.named_modules() if module is adapter.decoder_layers[first]]
    counts = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    late = sum(sum(counts[prefix + name].values()) for name in (*names, "norm_out", "proj_out"))
    with nograd.apply(model, "softpag", heads={first: "all"}, u=0.5) as handle, torch.no_grad():
        model(**one)
        assert handle.stats["fork_block"] == first and handle.stats["extra_flops"] == late


def test_image_identity_saves_the_image_to_other_image_attention():
    """``attention_flops_saved`` in ``image_identity``: a u = 1 head's image rows still attend to their own key and
    the text keys (its text rows are computed alone), so it saves ``4 I (I - 1) head_dim``, not ``4 I S head_dim``."""
    model = BUILDERS["sd3"]()
    adapter = adapter_for(model)
    inputs = transformer_inputs("sd3", model)
    with nograd.apply(model, "pag", layers=[0], mode="image_identity") as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    images, skipped = ROWS * COLS, inputs["hidden_states"].shape[0] * adapter.num_heads  # every head of each row
    assert stats["identity_heads_skipped"] == skipped
    assert stats["attention_flops_saved"] == 4 * images * (images - 1) * adapter.head_dim * skipped


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_controlnet_residuals_reach_the_perturbed_rows(family):
    """ControlNet residuals (added by the transformer between blocks) get the perturbed rows too: batched (forked at
    the input, not late), a second call, and the explicit ``cond + w (cond - ptb)`` agree."""
    model = BUILDERS[family](num_layers=3) if family == "sd3" else BUILDERS[family]()
    adapter = adapter_for(model)
    first, second = transformer_inputs(family, model), transformer_inputs(family, model, 1, 1)
    inputs = {k: torch.cat([v, second[k]]) if k not in ("img_ids", "txt_ids") else v for k, v in first.items()}
    tokens = ROWS * COLS
    g = torch.Generator().manual_seed(3)
    width = adapter.num_heads * adapter.head_dim
    residuals = lambda count: [torch.randn(2, tokens, width, generator=g) for _ in range(count)]  # noqa: E731
    if family == "sd3":
        inputs["block_controlnet_hidden_states"] = residuals(3)
    else:
        inputs["controlnet_block_samples"] = residuals(1)
        inputs["controlnet_single_block_samples"] = residuals(1)
    heads = {1: "all"}  # (a late fork at block 1 would meet the residuals of 2 rows after it with 4)
    out = {}
    with torch.no_grad():
        plain = model(**inputs)[0]
        for batch in (True, False):
            with nograd.apply(model, "softpag", heads=heads, u=1.0, scale=2.0, batch=batch):
                out[batch] = model(**inputs)[0]
        with nograd.apply(model, "softpag", heads=heads, u=1.0, scale=2.0) as handle, handle.perturbed_only():
            ptb = model(**inputs)[0]
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True], plain + 2.0 * (plain - ptb), atol=1e-5, rtol=0)
    assert not torch.equal(ptb, plain) and untouched(model)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_batch_of_prompts_equals_each_prompt_alone(family, request):
    """Two prompts x two images each: every image equals its prompt run alone with its seed (SD3 with CFG: the
    batch is [uncond x 4, cond x 4] and the four cond rows are perturbed)."""
    pipe = request.getfixturevalue(family)
    seeds = [torch.Generator().manual_seed(i) for i in range(4)]
    with nograd.apply(pipe, "softpag", heads={1: "all"}, u=1.0) as handle:
        both = images(pipe, ["a cat", "a dog"], generator=seeds, num_images_per_prompt=2)
        assert handle.stats["perturbed_rows"] == 2 * 4  # two steps, four conditional rows each
        for index, prompt in enumerate(["a cat", "a cat", "a dog", "a dog"]):
            alone = images(pipe, prompt, seed=index)
            torch.testing.assert_close(both[index:index + 1], alone, atol=2e-5, rtol=0)


def test_batched_branch_equals_separate_call_and_window_limits_steps(sd3):
    out = {}
    for batch in (True, False):
        with nograd.apply(sd3, "softpag", heads={0: "all"}, u=1.0, batch=batch) as handle:
            out[batch] = images(sd3)
            assert handle.stats["perturbed_calls"] == 2
    torch.testing.assert_close(out[False], out[True], atol=1e-5, rtol=0)
    with nograd.apply(sd3, "softpag", heads={0: "all"}, u=1.0, start=0.0, stop=1.0):
        assert torch.equal(images(sd3), out[True])
    plain = images(sd3)
    with nograd.apply(sd3, "softpag", heads={0: "all"}, u=1.0, start=0.5, stop=0.5) as handle:
        assert torch.equal(images(sd3), plain) and handle.stats["perturbed_calls"] == 0
    with nograd.apply(sd3, "softpag", heads={0: "all"}, u=1.0, start=0.5) as handle:
        late = images(sd3)
        assert handle.stats["perturbed_calls"] == 1  # step 1 of 2 only
    assert not torch.equal(late, out[True]) and not torch.equal(late, plain)


def test_flux_true_cfg_folds_w_over_true_cfg_scale(flux):
    """One Euler step is linear in the prediction: the perturbation term must be w (cond - ptb) with and without
    FLUX's true CFG (a fold by w instead of w / true_cfg_scale would multiply it by true_cfg_scale)."""
    one = dict(num_inference_steps=1)
    plain = images(flux, **one)
    plain_cfg = images(flux, negative_prompt="a dog", true_cfg_scale=3.0, **one)
    assert not torch.equal(plain, plain_cfg)
    with nograd.apply(flux, "softpag", heads={0: "all"}, u=1.0, scale=2.0) as handle:
        term = images(flux, **one) - plain
        term_cfg = images(flux, negative_prompt="a dog", true_cfg_scale=3.0, **one) - plain_cfg
        assert handle.stats["perturbed_calls"] == 2  # the "uncond" call is never perturbed
    assert term.abs().max() > 1e-4
    torch.testing.assert_close(term_cfg, term, atol=2e-5, rtol=0)


@pytest.mark.parametrize("pipeline_class", ["FluxPipeline", "FluxImg2ImgPipeline", "FluxKontextPipeline"])
def test_flux_true_cfg_perturbs_only_the_conditional_call_in_every_flux_pipeline(flux, pipeline_class):
    """One Euler step: true CFG with the method is ``neg + tc (cond - neg) + w (cond - ptb)`` (written out from plain
    runs and a perturbed-only run). FluxPipeline names its negative call (``cache_context("uncond")``); img2img and
    Kontext do not, and their negative call was perturbed and folded too (off by the whole effect)."""
    import diffusers

    pipe = getattr(diffusers, pipeline_class)(**flux.components)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if pipeline_class == "FluxPipeline" else dict(image=nograd.tiny.image(32, 32))
    extra |= dict(strength=1.0) if pipeline_class == "FluxImg2ImgPipeline" else {}
    extra |= dict(_auto_resize=False, max_area=32 * 32) if pipeline_class == "FluxKontextPipeline" else {}
    one = dict(num_inference_steps=1, **extra)
    true_cfg = dict(negative_prompt="a dog", true_cfg_scale=4.0, **one)
    plain, plain_cfg = images(pipe, **one), images(pipe, **true_cfg)
    with nograd.apply(pipe, "softpag", heads={0: "all"}, u=1.0, scale=2.0) as handle:
        with handle.perturbed_only():
            perturbed = images(pipe, **one)
        guided = images(pipe, **true_cfg)
        assert handle.stats["perturbed_calls"] == 1
    assert (guided - plain_cfg).abs().max() > 1e-2
    torch.testing.assert_close(guided, plain_cfg + 2.0 * (plain - perturbed), atol=2e-5, rtol=0)


@pytest.mark.parametrize("pipeline_class", ["FluxPipeline", "FluxImg2ImgPipeline"])
def test_flux_true_cfg_given_the_prompt_embeddings_as_the_negative_ones(flux, pipeline_class):
    """The same embedding objects for both prompts make the two true-CFG calls one: the result is still
    ``cond + w (cond - ptb)`` (img2img took both calls for the negative one and perturbed neither: no guidance)."""
    import diffusers

    pipe = getattr(diffusers, pipeline_class)(**flux.components)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if pipeline_class == "FluxPipeline" else dict(image=nograd.tiny.image(32, 32), strength=1.0)
    embeds, pooled, _ = pipe.encode_prompt("a cat", "a cat")
    one = dict(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=1, **extra)
    same = dict(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, true_cfg_scale=4.0, **one)
    plain = images(pipe, **one)
    torch.testing.assert_close(images(pipe, **same), plain, atol=2e-5, rtol=0)  # neg + tc (cond - neg) = cond
    with nograd.apply(pipe, "softpag", heads={0: "all"}, u=1.0, scale=2.0) as handle:
        with handle.perturbed_only():
            perturbed = images(pipe, **one)
        guided = images(pipe, **same)
    assert (guided - plain).abs().max() > 1e-2
    torch.testing.assert_close(guided, plain + 2.0 * (plain - perturbed), atol=2e-5, rtol=0)


# ---- addressing and validation ------------------------------------------------------------------------------------------
def test_layer_names_match_exactly_where_diffusers_regex_overmatches():
    model = BUILDERS["sd3"](num_layers=12, dual_attention_layers=())
    names = [n for n, m in model.named_modules() if n.endswith(".attn")]
    assert [n for n in names if re.search("blocks.1", n)] == [f"transformer_blocks.{i}.attn" for i in (1, 10, 11)]
    with nograd.apply(model, "pag", layers=["blocks.1"]) as handle:
        assert handle.stats["layers"] == ["transformer_blocks.1"]
    flux = BUILDERS["flux"]()
    modules = [n.removesuffix(".attn") for n, m in flux.named_modules() if n.endswith(".attn")]
    assert layer_names(adapter_for(flux)) == modules  # the paper's FLUX "layer" = forward order, dual then single
    with nograd.apply(flux, "pag", layers=["single_transformer_blocks.1", 0]) as handle:
        assert handle.stats["layers"] == ["transformer_blocks.0", "single_transformer_blocks.1"]
        assert {h[0] for h in handle.stats["heads"]} == {0, 3}


def test_sd35_dual_attention_and_qk_norm_block_runs(sd3):
    """diffusers' PAG crashes on SD3.5's attn2 for "blocks.0"; here attn2 is left alone and attn is perturbed."""
    block = sd3.transformer.transformer_blocks[0]
    assert block.attn2 is not None and block.attn.norm_q is not None
    plain = images(sd3)
    with nograd.apply(sd3, "pag", layers=["blocks.0"]) as handle:
        assert handle.stats["perturbed_attention_calls"] == 0  # listed from the start, as the other counters
        assert not torch.equal(images(sd3), plain)
        assert handle.stats["perturbed_attention_calls"] == 2  # attn only, once per step


def test_options_are_validated_before_touching_the_model():
    model = BUILDERS["sd3"]()
    with pytest.raises(ValueError, match=r"softpag: option mode='identity' is not allowed; expected one of"):
        nograd.apply(model, "softpag", heads=[(0, 0)], mode="identity")
    with pytest.raises(ValueError, match=r"option u=1.5"):
        nograd.apply(model, "softpag", heads=[(0, 0)], u=1.5)
    with pytest.raises(ValueError, match=r"option heads=\{\(0, 1\): 2.0\} .* \(per-head u in \[0, 1\]\)"):
        nograd.apply(model, "softpag", heads={(0, 1): 2.0})
    with pytest.raises(TypeError, match=r"\(per-head u in \[0, 1\]\)"):
        nograd.apply(model, "softpag", heads={(0, 1): "strong"})
    with pytest.raises(ValueError, match=r"head 7 of layer 0 is out of range; .* 2 layers x 4 heads"):
        nograd.apply(model, "softpag", heads=[(0, 7)])
    with pytest.raises(ValueError, match=r"no layer named 'blocks.5'"):
        nograd.apply(model, "pag", layers=["blocks.5"])
    with pytest.raises(ValueError, match=r"headhunter: option heads=None"):
        nograd.apply(model, "headhunter")
    with pytest.raises(ValueError, match=r"made for SD3Transformer2DModel with 24 layers x 24 heads"):
        nograd.apply(model, "headhunter", heads="paper:sd3-medium/darkness")
    assert untouched(model)
    info = nograd.methods()
    assert {"softpag", "pag", "headhunter"} <= set(info) and info["softpag"].arxiv == "2506.10978"


def test_per_head_u_dict_and_headhunter_top(sd3, tmp_path):
    from nograd.headhunter import HeadSet

    adapter = adapter_for(sd3.transformer)
    path = tmp_path / "heads.json"
    HeadSet([(1, 2), (0, 3), (0, 0)], "SD3Transformer2DModel", 2, 4, 8).save(path)
    with nograd.apply(sd3, "headhunter", heads=str(path), top=2) as handle:
        assert handle.stats["heads"] == [(0, 3), (1, 2)] and handle.stats["u"] == {"0,3": 0.5, "1,2": 0.5}
    for heads in (str(path), [(1, 2), (0, 3), (0, 0)]):  # more than the set holds: never silently fewer
        with pytest.raises(ValueError, match=r"top=4 asks for more heads than the set holds: an int in 0\.\.3"):
            nograd.apply(sd3, "headhunter", heads=heads, top=4)
        assert nograd.attached(sd3) == []
    with nograd.apply(sd3, "softpag", heads={(0, 1): 0.25, (1, 3): 1.0}) as handle:
        assert handle.stats["u"] == {"0,1": 0.25, "1,3": 1.0}
    assert len(layer_modules(adapter)) == 2


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bf16_pipeline_fast_path_follows_the_reference(family):
    """bf16 end to end: u = 0 stays bit-identical; the fast path (u = 1 heads skipped, the others blended) and the
    explicit map agree on one transformer call to bf16 accuracy."""
    model = BUILDERS[family]().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
              for k, v in transformer_inputs(family, model).items()}
    heads = {(0, 0): 1.0, (0, 1): 0.5, (1, 1): 1.0}
    out = {}
    with torch.no_grad():
        plain = model(**inputs)[0]
        with nograd.apply(model, "softpag", heads={0: [0]}, u=0.0):
            assert torch.equal(model(**inputs)[0], plain)
        for path in ("fast", "reference"):
            with nograd.apply(model, "softpag", heads=heads, path=path) as handle, handle.perturbed_only():
                out[path] = model(**inputs)[0]
    assert out["fast"].dtype == torch.bfloat16 and not torch.equal(out["fast"], plain)
    torch.testing.assert_close(out["fast"].float(), out["reference"].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("mode, path", [("joint_identity", "fast"), ("image_identity", "fast"),
                                        ("joint_identity", "reference"), ("image_identity", "reference")])
def test_a_perturbed_transformer_call_reads_nothing_back_from_the_device(family, mode, path):
    """The perturbed call on ``meta`` tensors (any read back raises there, as it syncs on CUDA; so does a tensor left
    on the host): the per-head weights, u = 1 heads skipped, blended and counted, are read on the host."""
    model = BUILDERS[family]()
    inputs = transformer_inputs(family, model)
    heads = {(0, 0): 1.0, (0, 1): 0.5, (1, 0): 1.0, (1, 1): 1.0}
    with nograd.apply(model, "softpag", heads=heads, mode=mode, path=path) as handle, handle.perturbed_only():
        model.to("meta")
        out = model(**{name: value.to("meta") for name, value in inputs.items()})[0]
        assert out.device.type == "meta" and handle.stats["perturbed_attention_calls"] == 2
        if path == "fast":
            assert handle.stats["identity_heads_skipped"] == 3


# ---- pipelines around the guidance ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_interrupted_perturbed_call_leaves_no_state_behind(family, request):
    """Ctrl-C inside a perturbed transformer call skips the forward hook's clean-up (torch runs ``always_call`` hooks
    for ``Exception`` only); the next pipeline call still equals an uninterrupted one."""
    pipe = request.getfixturevalue(family)
    cfg = dict(guidance_scale=5.0) if family == "sd3" else {}
    with nograd.apply(pipe, "softpag", heads={1: "all"}, u=1.0, start=0.5) as handle:
        want = images(pipe, **cfg)
        calls = {"n": 0}

        def interrupt(module, args, output):
            calls["n"] += 1
            if calls["n"] == 2:  # inside step 1, the perturbed call
                raise KeyboardInterrupt

        hook = handle.adapter.decoder_layers[-1].register_forward_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            images(pipe, **cfg)
        hook.remove()
        assert torch.equal(images(pipe, **cfg), want)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_img2img_window_counts_steps_from_the_first_denoised_one(family, request):
    """img2img starts its scheduler at ``begin_index``; the window is over the steps it runs (strength 0.5 of 4)."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    base = request.getfixturevalue(family)
    cls = StableDiffusion3Img2ImgPipeline if family == "sd3" else FluxImg2ImgPipeline
    pipe = cls(**base.components)
    pipe.set_progress_bar_config(disable=True)
    call = dict(image=nograd.tiny.image(32, 32), strength=0.5, num_inference_steps=4, height=32, width=32,
                output_type="latent", **({"guidance_scale": 1.0} if family == "sd3" else {}))
    for (start, stop), want in {(0.0, 0.5): 1, (0.5, 1.0): 1, (0.0, 1.0): 2}.items():
        with nograd.apply(pipe, "softpag", heads={0: "all"}, u=1.0, start=start, stop=stop) as handle:
            pipe("a cat", generator=torch.Generator().manual_seed(0), **call)
            assert pipe._num_timesteps == 2 and handle.stats["perturbed_calls"] == want, (start, stop)


def test_the_running_pipeline_sets_the_guidance_rows(sd3):
    """Applied to one pipeline, run by another sharing its transformer (img2img from the same components), or
    applied to the bare transformer: the CFG settings of the pipeline that runs are the ones used."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    img2img = StableDiffusion3Img2ImgPipeline(**sd3.components)
    img2img.set_progress_bar_config(disable=True)
    call = dict(image=nograd.tiny.image(32, 32), strength=0.75, num_inference_steps=4, height=32, width=32,
                output_type="latent")
    for text_cfg, image_cfg in ((1.0, 5.0), (5.0, 1.0)):
        out = {}
        for target in (img2img, sd3, sd3.transformer):
            images(sd3, guidance_scale=text_cfg)  # the text-to-image pipeline's last call
            with nograd.apply(target, "softpag", heads={1: "all"}, u=1.0) as handle:
                out[id(target)] = img2img("a cat", guidance_scale=image_cfg, generator=torch.Generator().manual_seed(0),
                                          **call).images
                assert handle.stats["perturbed_calls"] == 3
        assert torch.equal(out[id(sd3)], out[id(img2img)]) and torch.equal(out[id(sd3.transformer)], out[id(img2img)])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_bare_transformer_call_after_a_pipeline_call_is_a_bare_call(family, request):
    """A transformer call outside any pipeline (a user's own sampling loop) takes every row as conditional and every
    call as in the window, also after the pipeline the method was applied to has run: its finished call's CFG scale
    and scheduler position are not this call's (they split the rows in halves, or left the call unperturbed)."""
    pipe = request.getfixturevalue(family)
    model = pipe.transformer
    inputs = transformer_inputs(family, model)
    inputs = {name: value.repeat_interleave(2, 0) if name not in ("img_ids", "txt_ids") else value
              for name, value in inputs.items()}
    options = dict(heads={0: [1], 1: [0]}, u=0.5, start=0.0, stop=0.9)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with nograd.apply(model, "softpag", **options):
            want = model(**inputs)[0]
        images(pipe, **(dict(guidance_scale=5.0) if family == "sd3" else {}))
        with nograd.apply(pipe, "softpag", **options) as handle:
            assert torch.equal(model(**inputs)[0], want) and handle.stats["perturbed_rows"] == 2
    assert (want - plain).flatten(1).abs().amax(1).min() > 1e-3  # both rows guided


def test_sd3_skip_layer_guidance_keeps_the_perturbation_term(sd3):
    """SD3's skip-layer guidance adds s (cond - skip) with the pipeline's cond, which carries the fold; the skip call
    gets the same shift, so the PAG term is w (cond - ptb) with SLG on or off (step 0 is plain: start=0.5)."""
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=3.0, skip_layer_guidance_start=0.0,
               skip_layer_guidance_stop=1.0)
    plain, plain_slg = images(sd3, guidance_scale=2.0), images(sd3, guidance_scale=2.0, **slg)
    assert not torch.equal(plain, plain_slg)
    with nograd.apply(sd3, "softpag", heads={1: "all"}, u=1.0, scale=2.0, start=0.5):
        term = images(sd3, guidance_scale=2.0) - plain
        term_slg = images(sd3, guidance_scale=2.0, **slg) - plain_slg
    assert term.abs().max() > 1e-4
    torch.testing.assert_close(term_slg, term, atol=2e-6, rtol=0)


@pytest.mark.parametrize("options, error, match", [
    (dict(heads=[(0, True)]), ValueError, r"head True of layer 0 is out of range"),
    (dict(heads={0: [False]}), ValueError, r"head False of layer 0 is out of range"),
    (dict(heads=[(True, 1)]), ValueError, r"layer True is neither a layer index nor a block name"),
    (dict(heads={0: "all"}, start=0.8, stop=0.2), ValueError, r"option stop=0.2 .* >= start \(0.8\)"),
])
def test_head_and_window_options_are_checked_before_any_change(options, error, match):
    model = BUILDERS["sd3"]()
    with pytest.raises(error, match=match):
        nograd.apply(model, "softpag", **options)
    with pytest.raises(ValueError, match=r"top=1 selects a prefix of an ordered head list"):
        nograd.apply(model, "headhunter", heads={0: "all"}, top=1)
    assert untouched(model)
    with nograd.apply(model, "softpag", heads=[(np.int64(0), np.int64(1))]) as handle:  # numpy indices are integers
        assert handle.stats["heads"] == [(0, 1)]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gradient_checkpointing_is_refused_with_a_clear_error(family, request):
    """Checkpointing re-runs the blocks in the backward pass, after the call's perturbed rows and late fork are gone
    (a CheckpointError on backward): a guided call with gradients under it raises first; under no_grad it runs."""
    model = request.getfixturevalue(family).transformer
    inputs = transformer_inputs(family, model)
    with nograd.apply(model, "softpag", heads=[(0, 1)], u=1.0):  # the transformer alone: every call is guided
        model.enable_gradient_checkpointing()
        try:
            with pytest.raises(NotImplementedError, match="gradient checkpointing.*torch.no_grad"):
                model(**inputs)
            with torch.no_grad():
                guided = model(**inputs).sample
        finally:
            model.disable_gradient_checkpointing()
        with torch.no_grad():
            assert torch.equal(model(**inputs).sample, guided)
