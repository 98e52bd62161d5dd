"""Handles: every change a method makes to a model is recorded on one Handle and undone by ``remove()``."""

from __future__ import annotations

import weakref
from typing import Any, Callable

from torch import nn

_LIVE: "weakref.WeakKeyDictionary[nn.Module, list[Handle]]" = weakref.WeakKeyDictionary()


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
        """Make a method-specific action callable as ``handle.<name>(...)`` (e.g. PAINT's ``save_head_stats``)."""
        self._exposed[name] = function

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
        _LIVE.setdefault(self.model, []).append(self)

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
            handles = _LIVE.get(self.model, [])
            if self in handles:
                handles.remove(self)
            if not handles:
                _LIVE.pop(self.model, None)

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
    return list(_LIVE.get(model, []))


def remove_all(model: nn.Module) -> None:
    """Remove every live handle on ``model``, newest first."""
    for handle in reversed(attached(model)):
        handle.remove()
