"""``nograd.observe.observe_calls``: the callback sees the named arguments, the call's result is the original's, and
removing puts back exactly what the instance held (nothing, or its own attribute), in any order."""

from __future__ import annotations

from nograd.handle import Handle
from nograd.observe import observe_calls


class Encoder:
    def __init__(self):
        self.calls = 0

    def encode(self, pixels, sizes=None, *, scale=1, **kwargs):
        self.calls += 1
        return {"pixels": pixels, "sizes": sizes, "scale": scale, "extra": kwargs, "self": self}


def handle():
    return Handle(model=None, adapter=None, method="test", config=None)


def test_callback_sees_the_arguments_and_the_result_is_the_originals():
    encoder, seen = Encoder(), []
    h = handle()
    observe_calls(h, encoder, "encode", seen.append)
    pixels = object()
    result = encoder.encode(pixels, [3, 4], scale=2, strategy="full")
    assert result == {"pixels": pixels, "sizes": [3, 4], "scale": 2, "extra": {"strategy": "full"}, "self": encoder}
    assert result["pixels"] is pixels and encoder.calls == 1
    assert seen == [{"pixels": pixels, "sizes": [3, 4], "scale": 2, "strategy": "full"}]  # defaults not filled in
    assert "encode" in vars(encoder)
    h.remove()
    assert "encode" not in vars(encoder) and encoder.encode.__func__ is Encoder.encode
    encoder.encode(1)
    assert len(seen) == 1


def test_an_own_attribute_of_the_instance_is_restored():
    encoder, seen = Encoder(), []

    def own(pixels, **kwargs):
        return ("own", pixels)

    encoder.encode = own
    h = handle()
    observe_calls(h, encoder, "encode", seen.append)
    assert encoder.encode(5, sizes=2) == ("own", 5) and seen == [{"pixels": 5, "sizes": 2}]
    h.remove()
    assert vars(encoder)["encode"] is own


def test_stacked_observers_come_off_in_any_order():
    encoder, first_seen, second_seen = Encoder(), [], []
    first, second = handle(), handle()
    observe_calls(first, encoder, "encode", first_seen.append)
    observe_calls(second, encoder, "encode", second_seen.append)
    encoder.encode(1)
    assert first_seen == second_seen == [{"pixels": 1}]
    first.remove()  # under the second: it stops observing but stays until the second goes
    assert encoder.encode(2)["pixels"] == 2 and first_seen == [{"pixels": 1}] and len(second_seen) == 2
    second.remove()
    assert "encode" not in vars(encoder) and encoder.encode(3)["pixels"] == 3 and encoder.calls == 3
