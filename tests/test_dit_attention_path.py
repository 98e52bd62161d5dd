"""The shared attention path on diffusers MM-DiTs: processor wrappers, pass-through, restore, spans."""

from __future__ import annotations

import pytest
import torch

import nograd
from checks import same_state, snapshot
from nograd.attention import Intervention, intervene
from nograd.patches import adapter_for
from tiny.dit import BUILDERS, ROWS, COLS, TEXT_LEN, build_pipeline, transformer_inputs

VARIANTS = {"sd3.5": ("sd3", {}), "sd3.0": ("sd3", {"dual_attention_layers": ()}), "flux": ("flux", {})}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def attach(model, interventions):
    handle = nograd.Handle(model, adapter_for(model), "test", None)
    intervene(handle, interventions)
    return handle


class ZeroBias(Intervention):
    def key_bias(self, call):
        return torch.zeros(1, 1, call.key.shape[2])


@pytest.fixture(params=list(VARIANTS))
def dit(request):
    family, overrides = VARIANTS[request.param]
    model = BUILDERS[family](**overrides)
    return family, model, transformer_inputs(family, model)


def test_inactive_wrappers_are_bit_identical_and_restored(dit):
    family, model, inputs = dit
    adapter = adapter_for(model)
    plain, saved, processors = run(model, inputs), snapshot(model), adapter.processors()
    handle = attach(model, {m: Intervention() for m in adapter.attention_modules})
    assert all(type(p).__name__ == "NogradProcessor" for p in adapter.processors().values())
    assert torch.equal(run(model, inputs), plain)
    handle.remove()
    assert all(adapter.processors()[name] is p for name, p in processors.items())
    assert torch.equal(run(model, inputs), plain) and same_state(model, saved)


def test_zero_bias_through_kernels_equals_stock_processor(dit):
    """The adapter's joint q/k/v and output halves reproduce the stock processors, FLUX single blocks included."""
    family, model, inputs = dit
    plain = run(model, inputs)
    with attach(model, {m: ZeroBias() for m in adapter_for(model).attention_modules}):
        torch.testing.assert_close(run(model, inputs), plain, atol=1e-5, rtol=0)


class TextKeyBoost(Intervention):
    """Plant: head 0 puts (almost) all its attention on the first text key, found through the call's spans."""

    observes = True

    def __init__(self):
        self.rows, self.spans = None, None

    def key_bias(self, call):
        bias = torch.zeros(1, call.query.shape[1], call.key.shape[2])
        text = call.extras["spans"]["text"]
        if text.stop > text.start:
            bias[0, 0, text.start] = 40.0
        return bias

    def observe(self, call):
        self.spans = call.extras["spans"]
        self.rows = call.attention_rows(torch.arange(call.query.shape[2]))


@pytest.mark.parametrize("family, module_index", [("sd3", 0), ("flux", 0), ("flux", 3)])
def test_spans_reach_interventions_and_planted_bias_is_recovered(family, module_index):
    model = BUILDERS[family]()
    inputs = transformer_inputs(family, model)
    module = adapter_for(model).attention_modules[module_index]
    plant = TextKeyBoost()
    with attach(model, {module: plant}):
        run(model, inputs)
    spans = plant.spans
    assert spans["text"].stop - spans["text"].start == TEXT_LEN
    assert spans["image"].stop - spans["image"].start == ROWS * COLS
    first_text = spans["text"].start
    assert (plant.rows[0, 0].argmax(-1) == first_text).all() and plant.rows[0, 0, :, first_text].min() > 0.999
    assert (plant.rows[0, 1:].argmax(-1) != first_text).any()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_with_patched_transformer_restores_bit_exact(family):
    pipe = build_pipeline(family)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0))

    def image():
        kwargs["generator"] = torch.Generator().manual_seed(0)
        return pipe("a cat", **kwargs).images

    plain = image()
    model = nograd.resolve(pipe)[0]
    assert model is pipe.transformer
    handle = attach(model, {m: ZeroBias() for m in adapter_for(model).attention_modules})
    torch.testing.assert_close(image(), plain, atol=1e-4, rtol=0)
    handle.remove()
    assert torch.equal(image(), plain)


def test_apply_on_a_diffusers_pipeline(last_dit_method):
    pipe = build_pipeline("flux")
    model = pipe.transformer
    inputs = transformer_inputs("flux", model)
    plain = run(model, inputs)
    with nograd.apply(pipe, last_dit_method) as handle:
        assert handle.model is model and nograd.attached(pipe) == [handle]
        assert not torch.equal(run(model, inputs), plain)
    assert torch.equal(run(model, inputs), plain) and nograd.attached(pipe) == []


def test_text_only_method_refuses_a_dit_before_touching_it():
    pipe = build_pipeline("sd3")
    processors = adapter_for(pipe.transformer).processors()
    with pytest.raises(nograd.UnsupportedModelError, match=r"zerotuning does not support SD3Transformer2DModel \(a dit model"):
        nograd.apply(pipe, "zerotuning")
    assert adapter_for(pipe.transformer).processors() == processors


@pytest.fixture
def last_dit_method():
    @nograd.register
    class DiTTextBoost(nograd.Method):
        name = "test_dit_text_boost"
        kinds = ("dit",)

        def attach(self, handle):
            intervene(handle, {m: TextKeyBoost() for m in self.adapter.attention_modules})

    yield DiTTextBoost.name
    nograd.registry.unregister(DiTTextBoost.name)
