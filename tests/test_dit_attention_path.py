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


def ip_adapter_sd3(blocks):
    """A tiny SD3 transformer with diffusers' SD3 IP-Adapter processor (weights, extra call arguments) on ``blocks``,
    and the inputs, with and without the adapter's arguments."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    model = BUILDERS["sd3"](dual_attention_layers=())
    torch.manual_seed(1)
    for index in blocks:
        model.transformer_blocks[index].attn.set_processor(SD3IPAdapterJointAttnProcessor2_0(
            hidden_size=32, ip_hidden_states_dim=16, head_dim=8, timesteps_emb_dim=32, scale=1.0))
    inputs = transformer_inputs("sd3", model)
    ip = dict(ip_hidden_states=torch.randn(1, 4, 16), temb=torch.randn(1, 32))
    return model, inputs, {**inputs, "joint_attention_kwargs": ip}


def test_extra_processor_arguments_reach_the_wrapped_processor_or_raise():
    """An IP-Adapter processor keeps its weights in the model and gets its arguments while wrapped; where a method
    acts on such a module, nograd raises instead of dropping them."""
    model, inputs, with_ip = ip_adapter_sd3([0])
    want = run(model, with_ip)
    assert not torch.equal(want, run(model, inputs))
    params, keys = sum(p.numel() for p in model.parameters()), len(model.state_dict())
    with nograd.apply(model, "refam", layers=[1]) as handle:  # observes block 1; block 0 is only wrapped
        assert sum(p.numel() for p in model.parameters()) == params and len(model.state_dict()) == keys
        out, records = handle.capture({**with_ip, "return_dict": False}, slice(0, 5))
        assert torch.equal(out[0], want) and set(records) == {1}
    model, _, with_ip = ip_adapter_sd3([0, 1])
    before = snapshot(model)
    handle = nograd.apply(model, "refam", layers=[1])
    with pytest.raises(NotImplementedError, match=r"SD3IPAdapterJointAttnProcessor2_0 takes extra arguments "
                                                  r"\(ip_hidden_states, temb"):
        handle.capture({**with_ip, "return_dict": False}, slice(0, 5))
    handle.remove()
    with nograd.apply(model, "softpag", heads={1: [0]}, u=0.5):  # keeps every processor wrapped while attached
        model.to(torch.float64)  # moves the wrapped processors' weights too
        assert model.transformer_blocks[0].attn.processor.base.to_k_ip.weight.dtype == torch.float64
    model.to(torch.float32)
    assert same_state(model, before)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_length_is_found_when_the_text_is_passed_positionally(family):
    model = BUILDERS[family]()
    inputs = transformer_inputs(family, model)
    hidden, text = inputs.pop("hidden_states"), inputs.pop("encoder_hidden_states")
    lengths = []

    class Spans(Intervention):
        def key_bias(self, call):
            lengths.append(call.extras["spans"])

    with attach(model, {adapter_for(model).attention_modules[-1]: Spans()}), torch.no_grad():
        model(hidden, text, **inputs)
        model(hidden_states=hidden, encoder_hidden_states=text, **inputs)
    assert len(lengths) == 2 and lengths[0] == lengths[1]


class UserProcessor:
    """A processor a user sets after a method was attached (it delegates to the stock one)."""

    def __init__(self, stock):
        self.stock = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def test_processors_replaced_after_apply_raise_and_are_kept_by_remove():
    """Processors set after ``nograd.apply`` would silently switch the method off: the next call raises naming what
    happened, and ``remove()`` leaves the user's processors where they are (the others get theirs back)."""
    model = BUILDERS["sd3"]()
    inputs = transformer_inputs("sd3", model)
    modules = adapter_for(model).attention_modules
    stock = [module.processor for module in modules]
    handle = attach(model, {m: ZeroBias() for m in modules})
    mine = UserProcessor(stock[0])
    modules[0].set_processor(mine)
    with pytest.raises(RuntimeError, match="1 attention processors of SD3Transformer2DModel were replaced after"):
        run(model, inputs)
    handle.remove()
    assert modules[0].processor is mine
    assert all(module.processor is processor for module, processor in zip(modules[1:], stock[1:]))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_attention_backend_set_while_attached_reaches_the_processors_and_stays(family):
    """diffusers' ``set_attention_backend`` sets ``_attention_backend`` on every processor that has one (FLUX's; not
    SD3's): through the wrapper it reaches the wrapped processor, as on a plain model (it skipped the wrapper, and
    the choice was gone after ``remove()``)."""
    def backends(model):
        return [str(getattr(m.processor, "_attention_backend", None)) for m in adapter_for(model).attention_modules]

    plain, model = BUILDERS[family](), BUILDERS[family]()
    if not hasattr(plain, "set_attention_backend"):
        pytest.skip("this diffusers has no set_attention_backend")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    active = registry._active_backend
    try:
        plain.set_attention_backend("_native_math")
        with nograd.apply(model, "softpag", heads={0: "all"}, u=1.0):
            model.set_attention_backend("_native_math")
            assert backends(model) == backends(plain)
        assert backends(model) == backends(plain)
        assert family == "sd3" or set(backends(plain)) == {"AttentionBackendName._NATIVE_MATH"}
    finally:  # diffusers also makes it the process's active backend
        registry.set_active_backend(active)
