"""RefAM on tiny FLUX and SD3 pipelines: exact capture (fast == eager full softmax), non-invasive and restored,
planted patterns and sinks recovered, token filtering, pixel-space shapes for non-square images, SAM, sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import nograd
import nograd.data
from nograd.methods import refam as refam_module
from tiny.dit import build_pipeline

FAMILIES = ["flux", "sd3"]
OPTS = dict(resolution=48, max_sequence_length=48)
TEXT = "the red car on the left"


def picture(width=48, height=32, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def pipes():
    return {family: build_pipeline(family) for family in FAMILIES}


@pytest.fixture
def apply(pipes):
    handles = []

    def attach(family, **options):
        handle = nograd.apply(pipes[family], "refam", **{**OPTS, **options})
        handles.append(handle)
        return handle

    yield attach
    for handle in handles:
        handle.remove()


def records_of(handle, image=None, text=TEXT, blocks=None):
    inputs, valid, grid, tokens = handle.prepare(image or picture(), text)
    out, records = handle.capture(inputs, valid, blocks)
    return inputs, out, records, tokens


# ---- exactness and non-invasiveness --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("normalisation", ["text_softmax", "joint"])
def test_fast_capture_equals_eager_full_softmax(apply, pipes, family, normalisation):
    depth = len(pipes[family].transformer.transformer_blocks) + len(
        getattr(pipes[family].transformer, "single_transformer_blocks", []))
    blocks = list(range(depth))  # every block: FLUX double and single, SD3's context_pre_only last block
    fast = apply(family, normalisation=normalisation, gas_mode="none")
    _, _, got, tokens = records_of(fast, blocks=blocks)
    fast.remove()
    eager = apply(family, normalisation=normalisation, gas_mode="none", capture="eager")
    _, _, want, _ = records_of(eager, blocks=blocks)
    assert sorted(got) == blocks
    for b in blocks:
        assert got[b].probs.shape == (1, 8 * 12, len(tokens))
        torch.testing.assert_close(got[b].probs, want[b].probs, atol=1e-6, rtol=0)
        sums = got[b].probs.sum(-1)
        if normalisation == "text_softmax":
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)
        else:
            assert bool((sums <= 1 + 1e-6).all()) and bool((sums < 0.999).any())  # padding/image keys take mass


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_eager_softmax_of_the_stock_processors_own_qk(apply, pipes, monkeypatch, family):
    """Independent of nograd's adapter: record the q/k the stock processors hand to their attention function
    (FLUX: diffusers' ``dispatch_attention_fn``; SD3: ``F.scaled_dot_product_attention``), softmax them in full."""
    import diffusers.models.transformers.transformer_flux as flux_module

    seen = []
    if family == "flux":
        original = flux_module.dispatch_attention_fn

        def recorder(q, k, v, *args, **kwargs):  # (B, S, H, D)
            seen.append((q.transpose(1, 2).clone(), k.transpose(1, 2).clone()))
            return original(q, k, v, *args, **kwargs)

        monkeypatch.setattr(flux_module, "dispatch_attention_fn", recorder)
    else:
        original = torch.nn.functional.scaled_dot_product_attention

        def recorder(q, k, v, *args, **kwargs):  # (B, H, S, D)
            seen.append((q.clone(), k.clone()))
            return original(q, k, v, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorder)
    handle = apply(family, gas_mode="none")
    depth = len(handle.adapter.decoder_layers)
    inputs, out, records, tokens = records_of(handle, blocks=list(range(depth)))
    n = 8 * 12
    text_len = inputs["encoder_hidden_states"].shape[1]
    joint = [(q, k) for q, k in seen if q.shape[2] == n + text_len]  # SD3.5's image-only attn2 calls dropped
    assert len(joint) == depth
    _, valid, _, _ = handle.prepare(picture(), TEXT)
    text, image = (slice(0, text_len), slice(text_len, None)) if family == "flux" else (slice(n, None), slice(0, n))
    for block, (q, k) in enumerate(joint):
        probs = ((q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        v = slice(text.start + valid.start, text.start + valid.stop)
        want = probs[:, :, image, v]
        want = (want / want.sum(-1, keepdim=True)).mean(1).float()
        torch.testing.assert_close(records[block].probs, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_is_non_invasive_and_remove_restores(pipes, apply, family):
    pipe = pipes[family]
    model = pipe.transformer
    processors = dict(model.attn_processors)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=16)

    def generate():
        return pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images

    plain = generate()
    handle = apply(family)
    inputs, valid, _, _ = handle.prepare(picture(), TEXT)
    with torch.no_grad():
        stock = model(**inputs)[0]
    out, records = handle.capture(inputs, valid)
    assert records and torch.equal(out[0], stock)  # the forward that is read is the stock forward, bit for bit
    assert {k: type(v) for k, v in model.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    assert torch.equal(generate(), plain)  # installed: generation untouched
    handle.ground(picture(), TEXT)
    blocks = [1, 2, 3] if family == "flux" else [1]  # "paper": FLUX double from 9/19 + single; SD3 second half
    assert handle.stats["blocks"] == blocks and handle.stats["grounds"] == 1 and handle.stats["forwards"] == 2
    assert set(handle.stats["gas"]) == set(blocks) and handle.stats["last"]["grid"] == (8, 12)
    handle.remove()
    assert all(model.attn_processors[k] is v for k, v in processors.items())
    with pytest.raises(RuntimeError, match="handle was removed"):
        handle.ground(picture(), TEXT)
    assert torch.equal(generate(), plain) and nograd.attached(pipe) == []


class PeakTensor(TorchDispatchMode):
    """The largest tensor (bytes) any op creates inside the mode."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("normalisation", ["text_softmax", "joint"])
def test_fast_capture_never_builds_the_joint_attention(apply, monkeypatch, normalisation):
    peaks = {}
    observe = refam_module.BlockCapture.observe

    def tracked(self, call):
        with PeakTensor() as mode:
            observe(self, call)
        peaks[self.config.capture] = max(peaks.get(self.config.capture, 0), mode.peak)

    monkeypatch.setattr(refam_module.BlockCapture, "observe", tracked)
    for capture in ("fast", "eager"):
        handle = apply("flux", normalisation=normalisation, capture=capture, lse_chunk=32)
        records_of(handle)
        handle.remove()
    heads, seq = 2, 8 * 12 + OPTS["max_sequence_length"]
    assert peaks["eager"] >= heads * seq * seq * 4
    assert peaks["fast"] <= heads * max(32, 38) * seq * 4 < heads * seq * seq * 4 / 2


# ---- planted patterns ----------------------------------------------------------------------------------------------
def plant(handle, region: torch.Tensor, valid: slice, target: int, sink: int | None = None):
    """Override the post-RoPE q/k the capture reads: image queries in ``region`` (N,) along u, elsewhere along v;
    the text key ``target`` (index in V) along u (logit 8 in the region); a ``sink`` key along w that every query
    reaches with logit 10."""
    adapter, original = handle.adapter, handle.adapter.joint_qkv
    n = region.numel()

    def joint_qkv(attn, hidden, encoder=None, rotary=None):
        q, k, v = original(attn, hidden, encoder, rotary)
        s = q.shape[2]
        text_first = adapter.family == "flux"
        image = slice(s - n, s) if text_first else slice(0, n)
        text0 = 0 if text_first else n
        scale = q.shape[-1] ** -0.5
        q, k = torch.zeros_like(q), torch.zeros_like(k)
        q[:, :, image, 0] = 4.0 * region.float()
        q[:, :, image, 1] = 4.0 * (~region).float()
        k[:, :, text0 + valid.start + target, 0] = 8.0 / (4.0 * scale)
        if sink is not None:
            q[:, :, :, 2] = 1.0
            k[:, :, text0 + valid.start + sink, 2] = 10.0 / scale
        return q, k, v

    adapter.joint_qkv = joint_qkv
    return lambda: delattr(adapter, "joint_qkv")


def region_of(rows=8, cols=12, r=(2, 6), c=(3, 8)):
    region = torch.zeros(rows, cols, dtype=torch.bool)
    region[r[0]:r[1], c[0]:c[1]] = True
    return region


def pixel_region(region, height, width):
    ys = (torch.arange(height) + 0.5) * region.shape[0] / height
    xs = (torch.arange(width) + 0.5) * region.shape[1] / width
    return region[ys.long()][:, xs.long()]


@pytest.mark.parametrize("family", FAMILIES)
def test_an_offloaded_transformer_grounds_as_the_resident_one(family):
    """accelerate.cpu_offload leaves the transformer's parameters on the meta device: the latents and timesteps go
    to the hooks' execution device (they were sent to "meta")."""
    import accelerate

    pipe = build_pipeline(family)
    with nograd.apply(pipe, "refam", **OPTS) as handle:
        expected = handle.ground(picture(), TEXT)
    accelerate.cpu_offload(pipe.transformer, execution_device="cpu")
    assert pipe.transformer.device.type == "meta"
    with nograd.apply(pipe, "refam", **OPTS) as handle:
        got = handle.ground(picture(), TEXT)
    assert torch.equal(torch.as_tensor(got.heatmap), torch.as_tensor(expected.heatmap)) and got.point == expected.point


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_pattern_is_recovered_where_planted(apply, family):
    text = "the red car"
    handle = apply(family)
    _, valid, grid, tokens = handle.prepare(picture(), text)
    assert grid == (8, 12)
    target = next(t.index for t in tokens if t.word == "car")
    region = region_of()
    undo = plant(handle, region.flatten(), valid, target)
    try:
        result = handle.ground(picture(), text)
    finally:
        undo()
    truth = pixel_region(region, 32, 48)
    x, y = result.point
    assert truth[y, x]
    car = result.token_grids[..., target]
    assert region.flatten()[int(car.flatten().argmax())]
    iou = (result.mask & truth).sum() / (result.mask | truth).sum()
    assert iou > 0.9, float(iou)


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_sink_is_detected_and_suppressed(apply, family):
    text = "the red car"
    runs = {}
    modes = ("suppress", "none", "suppress_pre") if family == "flux" else ("suppress",)  # the rest is family-free
    for mode in modes:
        handle = apply(family, gas_mode=mode)
        _, valid, _, tokens = handle.prepare(picture(), text)
        target = next(t.index for t in tokens if t.word == "car")
        sink = next(t.index for t in tokens if t.word == "red")  # a sink on a meaningful token
        undo = plant(handle, region_of().flatten(), valid, target, sink=sink)
        try:
            runs[mode] = handle.ground(picture(), text, return_layers=True)
        finally:
            undo()
        handle.remove()
    kept = torch.tensor([t.kept for t in tokens])
    for result in runs.values():
        assert all(g == [tokens[sink].piece] for g in result.gas_tokens.values())  # exactly the planted token
    sink_only = torch.zeros_like(kept)
    sink_only[sink] = True
    torch.testing.assert_close(runs["suppress"].grid, runs["suppress"].token_grids[..., kept & ~sink_only].sum(-1))
    truth = pixel_region(region_of(), 32, 48)
    for mode in [m for m in ("suppress", "suppress_pre") if m in runs]:
        x, y = runs[mode].point
        assert truth[y, x]
    if family == "flux":
        torch.testing.assert_close(runs["none"].grid, runs["none"].token_grids[..., kept].sum(-1))
        pre = runs["suppress_pre"].token_grids
        assert float(pre[..., sink].abs().max()) == 0.0
        torch.testing.assert_close(pre.sum(-1), torch.ones(pre.shape[:2]), atol=1e-5, rtol=0)  # renormalised


# ---- tokens, shapes, determinism -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_filtered_tokens_are_exactly_stop_words_magnets_and_specials(apply, family):
    handle = apply(family)
    _, _, tokens, valid = handle.encode_text(TEXT)
    assert valid.stop - valid.start == len(tokens)
    assert {t.word for t in tokens if t.kept} == {"red", "car", "left"}
    for t in tokens:
        if t.piece in ("</s>", "<unk>", "▁"):
            assert t.role == "special"
        elif t.word_index < 0:
            assert t.role == "magnet"
        else:
            assert t.role == ("stop" if t.word in ("the", "on") else "content")
    assert sum(t.piece == "</s>" for t in tokens) == 1 + 5  # the expression's and one per magnet segment
    assert {t.word for t in tokens if t.role == "magnet"} == {"with", "a", "the", "pink"}  # "." is <unk> here
    np_only = refam_module.kept_mask(tokens, noun_phrase_only=True)
    assert {t.word for t, k in zip(tokens, np_only) if k} == {"red", "car"}


def test_an_expression_past_the_t5_length_names_the_length_that_takes_it(apply):
    """An expression longer than the T5 length is refused naming a ``max_sequence_length`` that takes it (up to
    512), and with it the expression grounds."""
    text = "the red car " * 30
    first = apply("sd3")
    with pytest.raises(ValueError, match=r"more than max_sequence_length=\d+; max_sequence_length=\d+ \(up to 512\)"):
        first.ground(picture(), text)
    first.remove()
    handle = apply("sd3", max_sequence_length=512)
    assert handle.ground(picture(), text).heatmap.shape == (32, 48)


@pytest.mark.parametrize("family", FAMILIES)
def test_noun_phrase_results_say_what_was_summed(apply, family):
    """With ``noun_phrase=True`` only the head noun phrase is summed; ``kept_tokens`` and ``stats["last"]["kept"]``
    say so (they listed every content word: "left" reported as summed)."""
    handle = apply(family, noun_phrase=True)
    result = handle.ground(picture(), TEXT)
    summed = refam_module.kept_mask(result.tokens, noun_phrase_only=True).tolist()
    assert result.kept_tokens == [t.piece for t, k in zip(result.tokens, summed) if k]
    assert {t.word for t, k in zip(result.tokens, summed) if k} == {"red", "car"}
    assert "left" in {t.word for t, k in zip(result.tokens, summed) if t.kept and not k}  # a content word left out
    assert handle.stats["last"]["kept"] == len(result.kept_tokens) == sum(summed)


@pytest.mark.parametrize("family", FAMILIES)
def test_segments_separate_keeps_the_bare_expression_embeddings(apply, pipes, family):
    handle = apply(family)
    states, _, tokens, valid = handle.encode_text(TEXT)
    handle.remove()
    plain = apply(family, magnets=())
    bare, _, bare_tokens, bare_valid = plain.encode_text(TEXT)
    n = bare_valid.stop - bare_valid.start
    assert [t.piece for t in tokens[:n]] == [t.piece for t in bare_tokens]
    assert torch.equal(states[:, valid.start:valid.start + n], bare[:, bare_valid.start:bare_valid.stop])
    own = pipes[family]._get_t5_prompt_embeds(prompt=TEXT, max_sequence_length=OPTS["max_sequence_length"])
    # the pipeline's own T5 encoding (it runs with autograd on, hence float rounding apart)
    torch.testing.assert_close(states[:, valid.start:valid.start + n], own[:, :n].detach())
    assert states.shape[1] == valid.start + OPTS["max_sequence_length"]


@pytest.mark.parametrize("family, size", [("flux", (50, 30)), ("sd3", (24, 40))])
def test_pixel_space_shapes_for_non_square_images(apply, family, size):
    width, height = size
    result = apply(family).ground(picture(width, height), TEXT)
    assert result.heatmap.shape == result.mask.shape == (height, width)
    assert result.heatmap.dtype == torch.float32 and result.mask.dtype == torch.bool
    assert float(result.heatmap.min()) == 0.0 and float(result.heatmap.max()) == 1.0
    x, y = result.point
    assert 0 <= x < width and 0 <= y < height and result.heatmap[y, x] == 1.0 and result.mask[y, x]
    assert result.overlay().size == (width, height)
    assert result.token_map("car").shape == (height, width)


def test_num_samples_is_the_mean_of_single_seed_runs(apply):
    def grid(**options):
        handle = apply("flux", **options)
        result = handle.ground(picture(), TEXT).grid
        handle.remove()
        return result

    two = grid(num_samples=2, seed=3)
    singles = [grid(seed=s) for s in (3, 4)]
    torch.testing.assert_close(two, (singles[0] + singles[1]) / 2, atol=1e-6, rtol=0)
    assert torch.equal(grid(seed=3), singles[0]) and not torch.equal(singles[0], singles[1])


def test_sam_prompted_by_the_point(apply, tiny_sam):
    model, processor = tiny_sam
    handle = apply("flux", sam=(model, processor), max_sequence_length=512)  # a SAM pair and the longest T5 text pass
    with pytest.raises(TypeError, match=r"ground\(sam=\(1, 2\)\) .* a pair \(SamModel, SamProcessor\)"):
        handle.ground(picture(50, 30), TEXT, sam=(1, 2))
    image = picture(50, 30)
    result = handle.ground(image, TEXT, sam=(model, processor))
    assert result.mask.shape == (30, 50) and result.mask.dtype == torch.bool
    inputs = processor(images=image, input_points=[[[list(map(float, result.point))]]], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"], multimask_output=True)
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    best = int(out.iou_scores[0, 0].argmax())
    assert torch.equal(result.mask, masks[0, best].bool()) and result.sam_score == pytest.approx(
        float(out.iou_scores[0, 0, best]))


@pytest.fixture(scope="module")
def tiny_sam():
    from transformers import SamConfig, SamModel, SamProcessor

    try:
        from transformers import SamImageProcessorPil as SamImageProcessor
    except ImportError:
        from transformers import SamImageProcessor
    config = SamConfig(
        vision_config=dict(hidden_size=32, patch_size=8, image_size=64, output_channels=16, num_pos_feats=8,
                           global_attn_indexes=[0], window_size=0, num_hidden_layers=1, num_attention_heads=2,
                           mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))
    torch.manual_seed(0)
    processor = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16}))
    return SamModel(config).eval(), processor


# ---- sweep on a RefCOCO-style folder --------------------------------------------------------------------------------
def test_sweep_point_accuracy_on_a_refcoco_folder(apply, tmp_path):
    (tmp_path / "images").mkdir()
    refs = []
    region = region_of()
    rows, cols = torch.nonzero(region, as_tuple=True)
    y0, y1, x0, x1 = int(rows.min()) * 4, (int(rows.max()) + 1) * 4, int(cols.min()) * 4, (int(cols.max()) + 1) * 4
    for i in range(2):
        picture(seed=i).save(tmp_path / "images" / f"{i}.png")
        refs.append({"ref_id": i, "file_name": f"{i}.png", "sentences": [{"sent": "the red car"}],
                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "split": "val"})
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    data = nograd.data.refcoco(tmp_path, split="val")
    assert len(data) == 2 and torch.equal(data[0].mask, pixel_region(region, 32, 48))
    handle = apply("flux")
    _, valid, _, tokens = handle.prepare(data[0].image, "the red car")
    undo = plant(handle, region.flatten(), valid, next(t.index for t in tokens if t.word == "car"))
    try:
        result = handle.sweep(data, blocks=[1, [2, 3]], sigmas=[0.3, 0.7])
    finally:
        undo()
    assert result["count"] == 2
    assert result["accuracy"] == {(s, c): 1.0 for s in (0.3, 0.7) for c in ((1,), (2, 3))}
    unplanted = handle.sweep(data, blocks=[[1, 2, 3]], limit=1)
    assert unplanted["count"] == 1 and 0.0 <= unplanted["accuracy"][(0.5, (1, 2, 3))] <= 1.0


# ---- options -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, error, match", [
    (dict(sigma=0), ValueError, r"sigma=0 .* \(0, 1\]"),
    (dict(gas_mode="drop"), ValueError, r"gas_mode='drop' .* 'redirect', 'suppress', 'suppress_pre', 'none'"),
    (dict(normalisation="joint", gas_mode="suppress_pre"), ValueError, r"gas_mode='suppress_pre'"),
    (dict(threshold=2.0), ValueError, r"threshold=2.0 .* 'otsu', 'mean'"),
    (dict(layers=[9]), ValueError, r"layers=\[9\] .* block indices in 0..3"),
    (dict(max_sequence_length=10**5), ValueError, r"max_sequence_length=100000 .* 1..512"),
    (dict(max_sequence_length=0), ValueError, r"max_sequence_length=0 .* 1..512"),
    (dict(max_sequence_length=True), TypeError, r"max_sequence_length=True .* 1..512"),
    (dict(seed=2**70), ValueError, r"seed=1180591620717411303424 .* \[0, 2\*\*63\)"),
    (dict(seed=-1), ValueError, r"seed=-1 .* \[0, 2\*\*63\)"),
    (dict(seed=1.0), TypeError, r"seed=1.0 .* an int"),
    (dict(sam=(1, 2)), TypeError, r"sam=\(1, 2\) .* a pair \(SamModel, SamProcessor\)"),
    (dict(sam=(torch.nn.Linear(1, 1), "processor")), TypeError, r"option sam=.* a callable \(image, points"),
])
def test_bad_options_are_named_before_any_change(pipes, options, error, match):
    processors = dict(pipes["flux"].transformer.attn_processors)
    with pytest.raises(error, match=match):
        nograd.apply(pipes["flux"], "refam", **options)
    with pytest.raises(TypeError, match="unknown option 'sigmas'"):
        nograd.apply(pipes["flux"], "refam", sigmas=[0.5])
    assert dict(pipes["flux"].transformer.attn_processors) == processors


def test_bare_transformer_needs_the_pipeline_for_ground(pipes):
    with nograd.apply(pipes["flux"].transformer, "refam") as handle:
        with pytest.raises(ValueError, match="needs the diffusers pipeline"):
            handle.ground(picture(), TEXT)


def test_timestep_and_flux_dev_guidance_embedding(pipes):
    from diffusers import FluxPipeline

    from tiny.dit import BUILDERS

    base = pipes["flux"]
    pipe = FluxPipeline(transformer=BUILDERS["flux"](guidance_embeds=True), scheduler=base.scheduler, vae=base.vae,
                        text_encoder=base.text_encoder, tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
                        tokenizer_2=base.tokenizer_2)
    with nograd.apply(pipe, "refam", guidance=2.5, sigma=0.25, **OPTS) as handle:
        inputs, _, _, _ = handle.prepare(picture(), TEXT)
        assert inputs["guidance"].tolist() == [2.5] and inputs["timestep"].tolist() == [0.25]
        assert handle.ground(picture(), TEXT).heatmap.shape == (32, 48)
    with nograd.apply(base, "refam", **OPTS) as handle:
        assert "guidance" not in handle.prepare(picture(), TEXT)[0]
    with nograd.apply(pipes["sd3"], "refam", **OPTS) as handle:  # SD3 takes the timestep in [0, 1000]
        assert handle.prepare(picture(), TEXT)[0]["timestep"].tolist() == [500.0]


@pytest.mark.parametrize("text", ["it", "the of a", ".", ""])
def test_an_expression_without_a_content_word_is_refused(apply, text):
    handle = apply("flux")
    with pytest.raises(ValueError, match="has no content word to ground"):
        handle.ground(picture(), text)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [True, False])
def test_a_guidance_method_on_the_same_pipeline_leaves_the_read_out_alone(apply, pipes, family, batch):
    """RefAM's own forward runs outside SoftPAG's guidance (suspended): nothing perturbed, folded or overwritten."""
    refam = apply(family)
    alone = refam.ground(picture(), TEXT)
    with nograd.apply(pipes[family], "softpag", heads={0: "all"}, u=1.0, batch=batch) as softpag:
        both = refam.ground(picture(), TEXT)
        assert softpag.stats["perturbed_calls"] == 0
    assert torch.equal(both.heatmap, alone.heatmap) and both.point == alone.point


def test_ground_takes_one_pil_image_and_one_expression(apply):
    handle = apply("sd3")
    with pytest.raises(TypeError, match="refam grounds in one PIL image at a time; got list"):
        handle.ground([picture(), picture()], TEXT)
    with pytest.raises(TypeError, match="got Tensor .* PIL.Image.fromarray"):
        handle.ground(torch.zeros(3, 32, 48), TEXT)
    with pytest.raises(TypeError, match="refam grounds one referring expression .* got list"):
        handle.ground(picture(), [TEXT, TEXT])
