"""The options contract across methods: values of another type are refused naming the option (an array was no
choice at all but a crash), numpy integers count as ints, and the frozen config keeps its own copy of what it was
given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nograd
from checks import attn_names


@pytest.mark.parametrize("method, options, words", [
    ("pyramiddrop", {"positions": np.array(["original"])}, ["positions", "'original'"]),
    ("pyramiddrop", {"positions": torch.tensor([1])}, ["positions", "'original'"]),
    ("carve", {"steps": np.array(["all"])}, ["steps", "'all'"]),
    ("carve", {"preset": np.array(["paper"])}, ["preset", "'paper'"]),
    ("carve", {"cache_general": 1}, ["cache_general", "True"]),  # 1 is not True
    ("zerotuning", {"target": np.array(["first_token"])}, ["target", "'first_token'"]),
    ("zerotuning", {"heads": {0: [3]}}, ["heads", "gamma table"]),  # ACT's form: it took the keys, head 0
    ("pai", {"layers": (True, None)}, ["layers", "int start"]),
    ("paint", {"heads": [[float("nan")] * 4] * 2}, ["heads", "finite values >= 0"]),
    ("paint", {"heads": [[-1.0] * 4] * 2}, ["heads", "finite values >= 0"]),
])
def test_values_of_another_kind_are_refused_naming_the_option(build, method, options, words):
    model = build("llava")
    names = attn_names(model)
    with pytest.raises((ValueError, TypeError)) as info:
        nograd.apply(model, method, **options)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert attn_names(model) == names and nograd.attached(model) == []


def test_plain_annotations_are_checked_for_every_method():
    """An option annotated ``float`` / ``int`` / ``bool`` / ``str`` refuses another kind of value without the method's
    own ``validate`` (a custom method's ``strength: float`` took ``"abc"``); numpy scalars and a ``None`` default
    pass."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Options(nograd.MethodConfig):
        strength: float = nograd.option(1.0, "a float")
        count: int = nograd.option(2, "an int")
        flag: bool = nograd.option(False, "a bool")
        name: str = nograd.option("x", "a str")
        limit: float = nograd.option(None, "None or a float")

    Options.method = "custom"
    assert Options(strength=np.float32(2), count=np.int64(3), limit=0.5).count == 3
    for name, value, allowed in (("strength", "abc", "a number"), ("strength", True, "a number"),
                                 ("count", 2.0, "an int"), ("flag", 1, "True or False"), ("name", 3, "a string"),
                                 ("limit", "1", "a number")):
        with pytest.raises(TypeError, match=f"custom: option {name}={value!r} is not allowed; expected {allowed}"):
            Options(**{name: value})


def test_a_zero_dimensional_tensor_gamma_is_a_number(build):
    """ZeroTuning's ``gamma`` as a 0-d tensor is the number it holds (1-D and 2-D tensors were tables already)."""
    model = build("llama")
    with nograd.apply(model, "zerotuning", gamma=torch.tensor(1.5)) as zt:
        assert zt.config.gamma == 1.5 and type(zt.config.gamma) is float


def test_numpy_integers_are_ints(build):
    model = build("llava")
    with nograd.apply(model, "pai", layers=(np.int64(1), None)) as pai:
        assert pai.config.layers == (1, None) and type(pai.config.layers[0]) is int
    with nograd.apply(model, "zerotuning", layers=[np.int64(0)], heads=np.int32(1)) as zt:
        assert zt.config.layers == (0,) and zt.config.heads == (1,)
    with nograd.apply(model, "pyramiddrop", boundaries=[np.int64(1)], keep=[np.float32(0.5)]) as drop:
        assert type(drop.config.boundaries[0]) is int and type(drop.config.keep[0]) is float
        import json

        json.dumps({key: value for key, value in drop.stats.items() if key != "kept"})  # numpy scalars do not dump


def test_the_config_keeps_its_own_copy(build):
    """A tensor or list the caller edits after apply neither changes h.config nor what runs (h.config showed the
    edit while the method ran the value given)."""
    model = build("llama")
    ids = torch.randint(4, 100, (1, 7))
    gamma = torch.full((3,), 2.0)
    heads = [0, 1]
    with nograd.apply(model, "zerotuning", gamma=gamma) as zt, torch.no_grad():
        before = model(ids).logits
        gamma.fill_(1.0)
        assert torch.equal(zt.config.gamma, torch.full((3,), 2.0, dtype=torch.float64))
        assert torch.equal(model(ids).logits, before)
    with nograd.apply(model, "act", heads=heads) as act:
        heads.append(2)
        assert list(act.config.heads) == [0, 1]


def test_the_config_repr_names_models_and_processors_by_type(build):
    """``h.config``'s repr shows a processor (or a model, a big table) by its type, not its whole repr."""
    model = build("llava")
    processor = nograd.tiny.vlm("llava", layers=2)[1]
    with nograd.apply(model, "carve", processor=processor) as carve:
        text = repr(carve.config)
    assert text.startswith("CARVEConfig(processor=<") and "steps='all'" in text and len(text) < 800
    with nograd.apply(build("llama"), "zerotuning", gamma=torch.full((3, 4), 2.0)) as zt:
        assert "gamma=<tensor (3, 4) float64>" in repr(zt.config)
