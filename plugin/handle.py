"""Handles: every change a method makes to a model is recorded on one Handle and undone by ``remove()``."""

from __future__ import annotations

import weakref
from typing import Any, Callable

from torch import nn

HANDLES = "_nograd_handles"
"""The attribute of a model that holds its live handles (removed with the last one). The model keeps them alive and
nothing global does: a model dropped with a method still attached is garbage-collected as usual."""
_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
"""Every model with a live handle, held weakly (for checks that span models)."""


def _refuse_copy(memo_or_protocol) -> None:
    """``copy.deepcopy``, ``copy.copy``, ``pickle`` or ``torch.save`` of a model with live handles (each finds this on
    the instance as ``__deepcopy__`` / ``__reduce_ex__``): a copy would carry the method's hooks and attention names
    half-attached, unsteered, and break once the original's handles go; a pickle fails on the hooks' closures."""
    raise TypeError("nograd: a model with methods attached cannot be copied or pickled (the copy would carry them "
                    "half-attached); copy it before nograd.apply or after nograd.remove_all(model), and save it with "
                    "save_pretrained or its state_dict, which hold the plain model")


_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__")


class Handle:
    """One method attached to one model.

    ``remove()`` (idempotent) undoes every recorded change in reverse order; the handle is also a context manager.
    ``method`` and ``config`` say what is attached; ``stats`` is a dict the method updates as it runs.
    """

    def __init__(self, model: nn.Module, adapter, method: str, config, processor: Any = None, target: Any = None):
        self.model = model
        self.target = model if target is None else target
        """What ``nograd.apply`` was given: the model, or the pipeline that holds it."""
        self.adapter = adapter
        self.method = method
        self.config = config
        self.processor = processor
        self.stats: dict[str, Any] = {}
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._exposed: dict[str, Callable] = {}
        self._live = False

    def expose(self, name: str, function: Callable) -> None:
        """Make a method-specific action callable as ``handle.<name>(...)`` (e.g. PAINT's ``save_head_stats``); a name
        the handle already has (``remove``, ``stats``...) raises ``ValueError``, since it would never be reached."""
        if hasattr(type(self), name) or name in self.__dict__:
            raise ValueError(f"{self.method}: cannot expose {name!r}, a name every handle already has")
        self._exposed[name] = function

    def __dir__(self):
        return [*super().__dir__(), *self.__dict__.get("_exposed", {})]

    def __getattr__(self, name: str):
        exposed = self.__dict__.get("_exposed", {})
        if name in exposed:
            return exposed[name]
        raise AttributeError(f"the {self.__dict__.get('method')!r} handle has no attribute {name!r}")

    def on_remove(self, what: str, undo: Callable[[], None]) -> None:
        """Record how to undo one change (``what`` names it in the repr); undone last-in, first-out."""
        self._undo.append((what, undo))

    def _activate(self) -> None:
        self._live = True
        if HANDLES not in self.model.__dict__:
            self.model.__dict__.update(dict.fromkeys(_COPY_HOOKS, _refuse_copy))
        self.model.__dict__.setdefault(HANDLES, []).append(self)
        _MODELS.add(self.model)

    @property
    def live(self) -> bool:
        return self._live

    def remove(self) -> None:
        """Undo every change this handle made. Calling it again does nothing."""
        while self._undo:
            _, undo = self._undo.pop()
            undo()
        if self._live:
            self._live = False
            handles = self.model.__dict__.get(HANDLES, [])
            if self in handles:
                handles.remove(self)
            if not handles:
                self.model.__dict__.pop(HANDLES, None)
                for name in _COPY_HOOKS:
                    self.model.__dict__.pop(name, None)
                _MODELS.discard(self.model)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "live" if self._live else "removed"
        changes = ", ".join(what for what, _ in self._undo) or "none"
        return (f"<nograd.Handle {self.method} on {type(self.model).__name__} ({self.adapter.family}), {state}; "
                f"changes: {changes}; stats: {self.stats}>")


def attached(model: nn.Module) -> list[Handle]:
    """The live handles on ``model`` (a model, or a pipeline's model), oldest first."""
    return list(model.__dict__.get(HANDLES, []))


def models_with_handles() -> list[nn.Module]:
    """Every model that has a live handle now."""
    return list(_MODELS)


def remove_all(model: nn.Module) -> None:
    """Remove every live handle on ``model``, newest first."""
    for handle in reversed(attached(model)):
        handle.remove()
