"""Method names -> Method classes. ``register`` is the extension point; ``get`` resolves a user's string."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .config import nearest

if TYPE_CHECKING:
    from .methods.base import Method

_METHODS: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class MethodInfo:
    """What ``nograd.methods()`` says of one method."""

    name: str
    summary: str
    paper: str
    arxiv: str
    families: tuple[str, ...]
    options: dict

    def __repr__(self) -> str:
        return f"<{self.name}: {self.summary} (arXiv {self.arxiv}); families: {', '.join(self.families)}>"


KINDS = ("text", "vlm", "dit")


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a ``Method`` subclass reachable as ``nograd.apply(model, cls.name)``.

    Checked here, not at the first ``apply``: a ``Method`` subclass with its own ``attach``, a lower-case identifier
    ``name`` no other class holds, ``kinds`` from ``KINDS``,
    and a ``Config`` that subclasses ``MethodConfig`` as a ``@dataclass(frozen=True)`` whose every option is an
    ``option(default, doc)``. A Config another method already uses (or none: ``MethodConfig`` itself) is given a
    subclass of its own, so that its errors name this method."""
    from .config import MethodConfig

    from .methods.base import Method

    where = cls.__qualname__
    if not isinstance(cls.name, str) or not re.fullmatch(r"[a-z][a-z0-9_\-]*", cls.name):
        raise ValueError(f"{where}: method name must be a lower-case identifier (letters, digits, '_' or '-', "
                         f"starting with a letter: what apply and the CLI take), got {cls.name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.attach is Method.attach:
        raise TypeError(f"{where}: a method is a nograd.Method subclass with its own attach(self, handle)")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__qualname__})")
    if not cls.kinds or not set(cls.kinds) <= set(KINDS):
        raise ValueError(f"{where}: kinds must name the model kinds it supports, some of {KINDS}; got {cls.kinds!r}")
    config = cls.Config
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"{where}: Config must be a subclass of nograd.MethodConfig, got {config!r}")
    if vars(config).get("__annotations__") and "__dataclass_fields__" not in vars(config):
        raise TypeError(f"{where}: Config {config.__qualname__} is not a dataclass (its options would be lost); "
                        "decorate it with @dataclass(frozen=True)")
    undocumented = [f.name for f in fields(config) if "doc" not in f.metadata]
    if undocumented:
        raise TypeError(f"{where}: options {', '.join(undocumented)} of {config.__qualname__} are not built with "
                        "nograd.option(default, doc)")
    if vars(config).get("method", cls.name) != cls.name:  # shared with another method, or MethodConfig itself
        config = dataclass(frozen=True)(type(config.__name__, (config,), {"__module__": cls.__module__,
                                                                          "__qualname__": f"{where}.Config"}))
        cls.Config = config
    config.method = cls.name
    _METHODS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def get(name: str) -> type["Method"]:
    """The Method class registered as ``name`` (case-insensitive); ``ValueError`` naming the nearest and all names."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string naming a method, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _METHODS:
        hint = nearest(key, _METHODS)
        raise ValueError(
            f"unknown method {name!r}"
            + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else "")
            + f"; available methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[key]


def classes() -> dict[str, type["Method"]]:
    """Every registered Method class, by name (a copy, sorted by name)."""
    return dict(sorted(_METHODS.items()))


def methods() -> dict[str, MethodInfo]:
    """Every registered method: name -> MethodInfo (summary, paper, arXiv id, families, options)."""
    from .patches import supported_families

    return {
        name: MethodInfo(name, cls.summary, cls.paper, cls.arxiv,
                         cls.families or tuple(f for kind in cls.kinds for f in supported_families(kind)),
                         cls.Config.describe())
        for name, cls in classes().items()
    }
