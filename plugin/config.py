"""Typed, frozen, validated method options.

Every method declares a ``MethodConfig`` subclass: a frozen dataclass whose fields are built with ``option(default,
doc)``. ``from_options`` rejects unknown names (``TypeError`` naming the option, the nearest names and all allowed
ones); ``validate`` rejects bad values (``ValueError`` naming the option, the value and what is allowed). Both run
before a method touches the model.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, dataclass, field, fields
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch


def option(default: Any, doc: str, *, choices: tuple | None = None):
    """A config field with its default, its meaning (shown by ``nograd.methods()``) and optional allowed values."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


def is_number(value: Any) -> bool:
    """A finite real number (``bool`` excluded)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """An integer: ``int`` or a numpy integer (``bool`` excluded)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


PLAIN_TYPES = {
    "float": (lambda v: isinstance(v, Real) and not isinstance(v, bool), "a number"),
    "int": (is_int, "an int"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "str": (lambda v: isinstance(v, str), "a string"),
}
"""What an option annotated ``float`` / ``int`` / ``bool`` / ``str`` holds (its default's ``None`` allowed too)."""


def _annotation(f) -> str:
    """A field's annotation as written (``from __future__ import annotations`` keeps it a string)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")


def _is_choice(value: Any, choices: tuple) -> bool:
    """``value`` is one of ``choices``, of the same type (``1`` is not ``True``; an array is no choice at all)."""
    return any(type(value) is type(choice) and value == choice for choice in choices)


def _own_copy(value: Any) -> Any:
    """A value the config can keep without sharing it with the caller: a tensor cloned, a list / dict / tuple of
    plain data (numbers, strings, None, nested containers of them) copied, numpy scalars as Python's (so the config
    and the stats made of it serialise); anything else (models, processors, calibration batches) as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, dict)) and _plain(value):
        if isinstance(value, dict):
            return {_own_copy(key): _own_copy(item) for key, item in value.items()}
        return type(value)(_own_copy(item) for item in value)
    return value


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() > 8:
        return f"<tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    if _plain(value) or isinstance(value, (torch.Tensor, torch.device, range)):
        return repr(value)
    return f"<{type(value).__name__}>"


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, Real))


def nearest(name: str, candidates) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options. Subclasses add fields with ``option`` and override ``validate``."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__repr__ = MethodConfig._brief_repr  # its own: ``@dataclass`` keeps a class's own ``__repr__``

    def _brief_repr(self) -> str:
        """The options, with a model, processor or batch of inputs shown by its type (not its whole repr)."""
        shown = ", ".join(f"{f.name}={_brief(getattr(self, f.name))}" for f in fields(self))
        return f"{type(self).__name__}({shown})"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "MethodConfig":
        allowed = [f.name for f in fields(cls)]
        for name in options:
            if name not in allowed:
                hint = nearest(name, allowed)
                raise TypeError(
                    f"{cls.method}: unknown option {name!r}"
                    + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else "")
                    + f"; allowed options: {', '.join(allowed)}"
                )
        return cls(**options)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _own_copy(getattr(self, f.name)))  # the caller's later edits stay theirs
            choices = f.metadata.get("choices")
            if choices is not None and not _is_choice(getattr(self, f.name), choices):
                self.invalid(f.name, f"one of {', '.join(map(repr, choices))}")
        self.validate()
        self._check_annotations()

    def _check_annotations(self) -> None:
        """An option annotated with a plain type holds one (after ``validate``, whose messages say more): a
        method's own ``validate`` need not repeat it."""
        for f in fields(self):
            check = PLAIN_TYPES.get(_annotation(f))
            value = getattr(self, f.name)
            if check is not None and not check[0](value) and not (value is None and f.default is None):
                self.invalid(f.name, check[1], TypeError)

    def validate(self) -> None:
        """Check option values; call ``self.invalid(name, allowed)`` on a bad one."""

    def invalid(self, name: str, allowed: str, error: type[Exception] = ValueError):
        raise error(f"{self.method}: option {name}={getattr(self, name)!r} is not allowed; expected {allowed}")

    @classmethod
    def describe(cls) -> dict[str, dict[str, Any]]:
        """name -> {"default", "doc", "choices"} for every option."""
        return {
            f.name: {
                "default": None if f.default is MISSING else f.default,
                "doc": f.metadata.get("doc", ""),
                "choices": f.metadata.get("choices"),
            }
            for f in fields(cls)
        }
