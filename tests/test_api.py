"""nograd.apply / Handle / registry: the contract every method shares."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import nograd
from checks import TEXT_FAMILIES, attn_names, same_state, snapshot
from nograd.attention import Intervention, ModelPatch, intervene, registered_names


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_apply_changes_outputs_and_remove_is_bit_exact(build, padded_batch, family):
    model = build(family)
    ids, mask = padded_batch
    saved, plain, names = snapshot(model), logits(model, ids, mask), attn_names(model)
    handle = nograd.apply(model, "zerotuning", gamma=2.0)
    assert not torch.equal(logits(model, ids, mask), plain)
    assert attn_names(model) != names
    handle.remove()
    assert torch.equal(logits(model, ids, mask), plain)
    assert same_state(model, saved) and attn_names(model) == names
    assert registered_names() == [] and nograd.attached(model) == []
    handle.remove()  # idempotent
    assert torch.equal(logits(model, ids, mask), plain)


def test_handle_contract(build):
    model = build("llama")
    handle = nograd.apply(model, "zerotuning", gamma=1.5)
    assert handle.method == "zerotuning" and handle.config.gamma == 1.5 and handle.live
    assert nograd.attached(model) == [handle]
    assert "zerotuning" in repr(handle) and "LlamaForCausalLM" in repr(handle) and "live" in repr(handle)
    with handle:
        pass
    assert not handle.live and "removed" in repr(handle) and nograd.attached(model) == []


def test_methods_lists_zerotuning():
    info = nograd.methods()["zerotuning"]
    assert info.arxiv == "2505.11739" and "ZeroTuning" in info.paper
    assert {"llama", "qwen2", "gemma"} <= set(info.families)
    assert info.options["gamma"]["default"] == 4.0 and info.options["gamma"]["doc"]


def test_unknown_method_names_nearest_and_all(build):
    model = build("llama")
    with pytest.raises(ValueError, match=r"unknown method 'zerotunning' \(did you mean 'zerotuning'\?\); available methods: .*zerotuning"):
        nograd.apply(model, "zerotunning")


def test_unsupported_model_names_class_and_families():
    class Tiny(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(nograd.UnsupportedModelError, match=r"no adapter for Tiny; supported families: llama, mistral"):
        nograd.apply(Tiny(), "zerotuning")
    assert issubclass(nograd.UnsupportedModelError, ValueError)


def test_bad_target_type():
    with pytest.raises(TypeError, match="target must be"):
        nograd.apply("gpt2", "zerotuning")


def test_same_method_twice_is_refused_and_model_untouched(build, padded_batch):
    model = build("llama")
    ids, mask = padded_batch
    first = nograd.apply(model, "zerotuning", gamma=2.0)
    with_first = logits(model, ids, mask)
    with pytest.raises(nograd.IncompatibleMethodsError, match=r"cannot attach 'zerotuning'.*attached 'zerotuning'"):
        nograd.apply(model, "zerotuning", gamma=3.0)
    assert torch.equal(logits(model, ids, mask), with_first) and nograd.attached(model) == [first]
    first.remove()


@pytest.mark.parametrize("outer_first", [True, False])
def test_a_model_and_its_own_language_model_cannot_both_carry_methods(build, outer_first):
    """A VLM and its ``language_model`` share attention modules and configs: a method on each would switch them
    unaware of the other (silently off, then a broken registration on remove), so the second apply is refused."""
    model = build("llava")
    inner = model.model.language_model
    first, second = (model, inner) if outer_first else (inner, model)
    with nograd.apply(first, "zerotuning", gamma=2.0):
        saved, names = snapshot(model), attn_names(model)
        relation = "which contains it" if outer_first else "a part of it"
        with pytest.raises(nograd.IncompatibleMethodsError, match=f"'zerotuning' is attached to .*, {relation}"):
            nograd.apply(second, "act")
        assert same_state(model, saved) and attn_names(model) == names and nograd.attached(second) == []
    assert registered_names() == []


def test_two_models_sharing_one_config_cannot_both_carry_methods(build, padded_batch):
    """``Model(config)`` twice (or ``from_config`` of another model's config) shares one config object, which holds
    one attention implementation: removing the first model's methods set it back under the second's live handle
    (whose next forward then blamed a set_attn_implementation nobody called). The second apply is refused."""
    first = build("llama")
    torch.manual_seed(1)
    second = type(first)(first.config).eval()
    ids, mask = padded_batch
    plain = logits(second, ids, mask)
    with nograd.apply(first, "zerotuning", gamma=2.0):
        saved = snapshot(second)
        with pytest.raises(nograd.IncompatibleMethodsError, match="config of this LlamaForCausalLM is shared with "
                                                                  "another model that carries nograd methods"):
            nograd.apply(second, "act")
        assert same_state(second, saved) and nograd.attached(second) == []
    with nograd.apply(second, "zerotuning", gamma=2.0):  # the other model's methods removed: allowed
        assert not torch.equal(logits(second, ids, mask), plain)
    assert torch.equal(logits(second, ids, mask), plain) and registered_names() == []


def test_copying_or_pickling_refuses_a_model_with_methods_attached(build, tmp_path):
    """deepcopy, copy and pickle (torch.save) would carry the methods half-attached (or fail on a hook's closure):
    refused with one clear error while a handle lives; the plain model copies and pickles after ``remove()``."""
    import copy
    import pickle

    model = build("llama")
    attempts = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": pickle.dumps,
                "torch.save": lambda m: torch.save(m, tmp_path / "model.pt")}
    with nograd.apply(model, "zerotuning", gamma=2.0), nograd.apply(model, "act"):
        for name, attempt in attempts.items():  # the model, or a part holding attention (its config says nograd)
            # (a shallow copy of a part shares its layers: allowed)
            for part in (model, *([] if name == "copy" else [model.model.layers, model.model.layers[1]])):
                with pytest.raises(TypeError, match="methods attached cannot be copied or pickled"):
                    attempt(part)
    assert torch.equal(logits(model, ids := torch.randint(4, 100, (1, 7))), logits(model, ids))
    layers = copy.deepcopy(model.model.layers)  # after remove(): a plain copy that runs
    assert layers[0].self_attn.config._attn_implementation == "sdpa"
    ids = torch.randint(4, 100, (1, 7))
    assert torch.equal(logits(copy.deepcopy(model), ids), logits(model, ids))
    assert torch.equal(logits(pickle.loads(pickle.dumps(model)), ids), logits(model, ids))
    assert not {"__deepcopy__", "__reduce_ex__"} & set(vars(model))

    def own_deepcopy(memo):  # a user's own instance hook comes back after remove() (it was deleted)
        return "the user's copy"

    model.__deepcopy__ = own_deepcopy
    with nograd.apply(model, "zerotuning", gamma=2.0), pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(model)
    assert vars(model)["__deepcopy__"] is own_deepcopy and "__reduce_ex__" not in vars(model)
    assert copy.deepcopy(model) == "the user's copy"


@pytest.mark.parametrize("wrapper", ["PeftModel", "LoraModel", "pipeline", "compiled", "DataParallel"])
def test_a_wrapped_model_takes_methods_on_the_model_it_wraps(build, wrapper):
    """``nograd.apply(peft_model, ...)`` attaches to the adapted transformers model (LoRA layers included):
    the same logits as applying to ``get_base_model()``; ``attached`` / ``remove_all`` see through the wrapper. So
    does a pipeline over the PEFT model (refused: its model was not resolved again), a ``torch.compile``d module and
    ``DataParallel`` (refused, "no adapter")."""
    peft = pytest.importorskip("peft")
    model = build("llama")
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    import transformers

    target = {"PeftModel": lambda: adapted, "LoraModel": lambda: adapted.base_model,
              "pipeline": lambda: transformers.pipeline("text-generation", model=adapted,
                                                        tokenizer=nograd.tiny.llm()[1]),
              "compiled": lambda: torch.compile(adapted, backend="eager"),
              "DataParallel": lambda: nn.DataParallel(adapted)}[wrapper]()
    ids = torch.randint(4, 100, (2, 7))
    plain, saved = logits(model, ids), snapshot(model)
    with nograd.apply(model, "zerotuning", gamma=2.0):
        expected = logits(model, ids)
    handle = nograd.apply(target, "zerotuning", gamma=2.0)
    assert handle.model is model and nograd.attached(adapted) == nograd.attached(model) == [handle]
    assert torch.equal(logits(adapted, ids), expected) and not torch.equal(expected, plain)
    nograd.remove_all(target)
    assert not handle.live and same_state(model, saved) and torch.equal(logits(adapted, ids), plain)


@dataclass(frozen=True)
class LastKeyConfig(nograd.MethodConfig):
    bias: float = nograd.option(1.0, "logit bias on each row's last key")


class LastKeyBias(Intervention):
    def __init__(self, bias):
        self.bias = bias

    def key_bias(self, call):
        b, h, _, n = call.shape
        bias = torch.zeros(1, 1, n)
        bias[..., -1] = self.bias
        return bias


@pytest.fixture
def last_key_method():
    """A second, test-only bias method, to check that bias methods stack."""

    @nograd.register
    class LastKey(nograd.Method):
        name = "test_last_key"
        summary = "bias on the last key"
        kinds = ("text",)
        Config = LastKeyConfig

        def attach(self, handle):
            intervene(handle, {m: LastKeyBias(self.config.bias) for m in self.adapter.attention_modules})

    yield "test_last_key"
    nograd.registry.unregister("test_last_key")


@pytest.mark.parametrize("remove_first", ["zerotuning", "test_last_key"])
def test_bias_methods_stack_and_come_off_in_any_order(build, padded_batch, last_key_method, remove_first):
    model = build("llama")
    ids, mask = padded_batch
    saved, plain, names = snapshot(model), logits(model, ids, mask), attn_names(model)
    with nograd.apply(model, "zerotuning", gamma=2.0):
        only_zt = logits(model, ids, mask)
    with nograd.apply(model, last_key_method, bias=1.5):
        only_lk = logits(model, ids, mask)
    handles = {"zerotuning": nograd.apply(model, "zerotuning", gamma=2.0),
               last_key_method: nograd.apply(model, last_key_method, bias=1.5)}
    both = logits(model, ids, mask)
    assert not torch.equal(both, only_zt) and not torch.equal(both, only_lk)
    handles.pop(remove_first).remove()
    (kept,) = handles.values()
    torch.testing.assert_close(logits(model, ids, mask), only_zt if kept.method == "zerotuning" else only_lk,
                               atol=1e-6, rtol=0)
    kept.remove()
    assert torch.equal(logits(model, ids, mask), plain) and same_state(model, saved) and attn_names(model) == names


def test_remove_all(build, padded_batch, last_key_method):
    model = build("llama")
    ids, mask = padded_batch
    plain = logits(model, ids, mask)
    nograd.apply(model, "zerotuning")
    nograd.apply(model, last_key_method)
    assert len(nograd.attached(model)) == 2
    nograd.remove_all(model)
    assert nograd.attached(model) == [] and torch.equal(logits(model, ids, mask), plain)


def test_failed_attach_rolls_back(build, padded_batch):
    model = build("llama")
    ids, mask = padded_batch
    plain, names = logits(model, ids, mask), attn_names(model)

    @nograd.register
    class Broken(nograd.Method):
        name = "test_broken"
        kinds = ("text",)

        def attach(self, handle):
            intervene(handle, {self.adapter.attention_modules[0]: LastKeyBias(1.0)})
            raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            nograd.apply(model, "test_broken")
    finally:
        nograd.registry.unregister("test_broken")
    assert attn_names(model) == names and torch.equal(logits(model, ids, mask), plain)
    assert nograd.attached(model) == [] and registered_names() == []


# ---- the method-author API ------------------------------------------------------------------------------------------
@dataclass(eq=True)
class CountCalls(Intervention):
    """An observer whose instances compare equal (a dataclass): removal must still find its own object."""

    stats: dict
    observes = True

    def observe(self, call):
        self.stats["calls"] = self.stats.get("calls", 0) + 1


def _counting(name):
    class Counting(nograd.Method):
        kinds = ("text",)

        def attach(self, handle):
            intervene(handle, {m: CountCalls(handle.stats) for m in self.adapter.attention_modules})

    Counting.name = name
    return nograd.register(Counting)


def test_remove_takes_off_its_own_interventions_not_equal_ones(build):
    model = build("llama")
    ids = torch.randint(4, 100, (1, 6))
    for name in ("test_count_a", "test_count_b"):
        _counting(name)
    try:
        a, b = nograd.apply(model, "test_count_a"), nograd.apply(model, "test_count_b")
        b.remove()
        a.stats.clear(), b.stats.clear()
        logits(model, ids)
        assert a.stats == {"calls": model.config.num_hidden_layers} and b.stats == {}
        a.remove()
    finally:
        for name in ("test_count_a", "test_count_b"):
            nograd.registry.unregister(name)
    assert registered_names() == []


def test_register_checks_the_class_and_gives_a_shared_config_its_own_name():
    @dataclass(frozen=True)
    class Shared(nograd.MethodConfig):
        x: int = nograd.option(0, "x")

    made = []
    try:
        for name in ("test_shared_a", "test_shared_b", "test_no_config"):
            made.append(nograd.register(type(name, (nograd.Method,), {"name": name, "kinds": ("text",),
                                                                      "attach": lambda self, handle: None,
                                                                      **({} if name == "test_no_config" else
                                                                         {"Config": Shared})})))
        with pytest.raises(TypeError, match="^test_shared_a: unknown option 'y'"):
            made[0].Config.from_options({"y": 1})
        with pytest.raises(TypeError, match="^test_shared_b: unknown option 'y'"):
            made[1].Config.from_options({"y": 1})
        assert nograd.MethodConfig.method == "" and made[2].Config.method == "test_no_config"
    finally:
        for method in made:
            nograd.registry.unregister(method.name)

    class Undecorated(nograd.MethodConfig):
        strength: float = nograd.option(1.0, "lost without @dataclass")

    @dataclass(frozen=True)
    class Bare(nograd.MethodConfig):
        strength: float = 1.0

    attach = {"attach": lambda self, handle: None}
    for attributes, error, match in [(attach, ValueError, "kinds must name the model kinds"),
                                     ({"kinds": ("txt",), **attach}, ValueError, "kinds must name"),
                                     ({"kinds": ("text",), "Config": Undecorated, **attach}, TypeError,
                                      "is not a dataclass"),
                                     ({"kinds": ("text",), "Config": Bare, **attach}, TypeError,
                                      "strength of .*nograd.option"),
                                     ({"kinds": ("text",)}, TypeError, "with its own attach"),
                                     ({"kinds": ("text",), "name": "test bad", **attach}, ValueError,
                                      "lower-case identifier")]:
        with pytest.raises(error, match=match):
            nograd.register(type("Bad", (nograd.Method,), {"name": "test_bad", **attributes}))
        assert "test_bad" not in nograd.methods() and "test bad" not in nograd.methods()


@pytest.mark.parametrize("method, options", [("zerotuning", {}), ("pyramiddrop", {"boundaries": [1], "keep": [0.5]}),
                                             ("paint", {"layers": (0, None)})])
def test_stats_json_is_plain_data(build, method, options):
    """``h.stats`` holds tensors (ZeroTuning's target keys, the kept positions, PAINT's selection); ``stats_json()``
    is the same as plain data that ``json.dumps`` takes, tensors as their lists."""
    import json

    from tiny import vlm as tiny_vlm

    model = build("llava")
    with nograd.apply(model, method, **options) as h, torch.no_grad():
        model(**tiny_vlm.make_inputs("llava", model))
    with pytest.raises(TypeError, match="Tensor is not JSON serializable"):
        json.dumps(h.stats)
    plain = json.loads(json.dumps(h.stats_json()))
    assert plain.keys() == {str(k) for k in h.stats}
    tensors = {k: v for k, v in h.stats.items() if isinstance(v, torch.Tensor)}
    assert all(plain[k] == (v.item() if v.dim() == 0 else v.tolist()) for k, v in tensors.items())


def test_expose_refuses_the_names_of_the_handle_and_live_only_actions_after_remove(build):
    handle = nograd.Handle(build("llama"), None, "test", None)
    handle.expose("act_now", lambda: "done")
    handle.expose("read", lambda: "read", live_only=False)
    handle._activate()
    assert handle.act_now() == "done" and "act_now" in dir(handle)
    for name in ("remove", "stats", "config"):
        with pytest.raises(ValueError, match=f"cannot expose '{name}'"):
            handle.expose(name, lambda: None)
    handle.remove()
    with pytest.raises(RuntimeError, match=r"test: this handle was removed, so handle.act_now\(\) has no method"):
        handle.act_now()
    assert handle.read() == "read"


@pytest.mark.parametrize("method, action", [("carve", "generate"), ("softpag", "perturbed_only"),
                                            ("refam", "ground")])
def test_a_removed_handle_refuses_its_actions(method, action):
    """CARVE's generate raised an internal error after remove() and SoftPAG's perturbed_only ran the plain
    pipeline silently; every method's actions now say the handle was removed (PAINT's save_head_stats still saves)."""
    target, options = _target(method)
    handle = nograd.apply(target, method, **options)
    handle.remove()
    with pytest.raises(RuntimeError, match=f"{method}: this handle was removed, so handle.{action}"):
        getattr(handle, action)(nograd.tiny.image(32, 32), "a question")


def _target(method):
    """A model (or pipeline) ``method`` attaches to, and its options."""
    if method in ("refam", "softpag", "pag", "headhunter"):
        pytest.importorskip("diffusers")
        options = {"refam": {}, "softpag": dict(heads={0: [1]}), "pag": {},
                   "headhunter": dict(heads={0: [1]})}[method]
        return nograd.tiny.sd3(), options
    if method in ("zerotuning", "act"):
        return nograd.tiny.llm()[0], {}
    model, processor = nograd.tiny.vlm("llava")
    if method == "frank":
        return model, dict(reasoning=nograd.tiny.llm(layers=8)[0], rule="linear", lambda_r=0.5)
    return model, (dict(processor=processor) if method == "carve" else {})


@pytest.mark.parametrize("method", ["act", "carve", "clearsight", "fastv", "frank", "headhunter", "pag", "pai", "paint",
                                    "pyramiddrop", "refam", "softpag", "zerotuning"])
def test_a_model_dropped_with_a_method_attached_is_freed(method):
    """Nothing global holds a model: dropped with its handle still live, it is garbage-collected, and the attention
    names nograd registered for it go with it."""
    import gc
    import weakref

    target, options = _target(method)
    handle = nograd.apply(target, method, **options)
    model = weakref.ref(handle.model)
    del target, handle, options
    gc.collect()
    assert model() is None and registered_names() == []


def test_a_model_with_methods_serves_one_thread_at_a_time(build):
    """A forward that starts while another thread's forward of the same model runs raises RuntimeError (the methods
    keep the running call's state on the model: a second thread read the first's padding, prompt or sinks); the
    first thread's call is unaffected, a forward inside the same thread's forward passes, and remove() lifts it."""
    import threading

    model = build("llama")
    ids = torch.randint(4, 100, (1, 7))
    inside, release = threading.Event(), threading.Event()
    results = {}

    def hold(module, args, output):
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(timeout=30)

    def first():
        results["first"] = logits(model, ids)

    with nograd.apply(model, "zerotuning", gamma=2.0):
        expected = logits(model, ids)
        hook = model.model.layers[0].register_forward_hook(hold)
        thread = threading.Thread(target=first, name="first")
        thread.start()
        assert inside.wait(timeout=30)
        try:
            with pytest.raises(RuntimeError, match="running a call in another thread"):
                logits(model, ids)
            with pytest.raises(RuntimeError, match="running a call in another thread"):
                model.generate(ids, max_new_tokens=1)
            guard = vars(model)[nograd.handle.GUARD]
            assert guard._entered.stack == []  # a refused generate() left its entry (one per retry, unbounded)
        finally:
            release.set()
            thread.join(timeout=30)
        hook.remove()
        assert torch.equal(results["first"], expected) and torch.equal(logits(model, ids), expected)
        calls = []

        def nest(module, args, output):
            if not calls:  # once: a forward of the model inside its own forward, in this thread
                calls.append("nested")
                model(ids[:, :3])

        nested = model.model.layers[0].register_forward_hook(nest)
        with torch.no_grad():
            model(ids)
        nested.remove()
        assert len(calls) == 1

        def interrupt(module, args, output):  # Ctrl-C mid-forward: a BaseException skips the always_call hooks
            raise KeyboardInterrupt

        stop = model.model.layers[0].register_forward_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            logits(model, ids)
        stop.remove()
        other = threading.Thread(target=first, name="other")  # nothing runs now: another thread is served
        results.clear()
        other.start()
        other.join(timeout=30)
        assert torch.equal(results["first"], expected)
        patch = next(iter(model.__dict__[ModelPatch.PATCHES].values()))
        assert patch._outer == []  # the interrupted forward's batch state is not kept as an outer forward's
    assert not model._forward_pre_hooks and not model._forward_hooks
