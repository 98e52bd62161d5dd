"""Handles: every change a method makes to a model is recorded on one Handle and undone by ``remove()``."""

from __future__ import annotations

import functools
import math
import sys
import threading
import weakref
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

HANDLES = "_nograd_handles"
"""The attribute of a model that holds its live handles (removed with the last one). The model keeps them alive and
nothing global does: a model dropped with a method still attached is garbage-collected as usual."""
_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
"""Every model with a live handle, held weakly (for checks that span models)."""


_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__")
_SAVED_COPY_HOOKS = "_nograd_saved_copy_hooks"
"""The attribute of a module that holds its own instance ``_COPY_HOOKS``, if it had any, while ``_refuse_copy``
stands in for them."""


def _refuse_copy(memo_or_protocol) -> None:
    """``copy.deepcopy``, ``copy.copy``, ``pickle`` or ``torch.save`` of a model with live handles (each finds this on
    the instance as ``__deepcopy__`` / ``__reduce_ex__``): a copy would carry the method's hooks and attention names
    half-attached, unsteered, and break once the original's handles go; a pickle fails on the hooks' closures."""
    raise TypeError("nograd: a model with methods attached cannot be copied or pickled, nor can a part of it that "
                    "holds attention layers (the copy would carry them half-attached); copy it before nograd.apply or "
                    "after nograd.remove_all(model), and save it with save_pretrained or its state_dict, which hold "
                    "the plain model")


def _guard_copies(modules) -> None:
    """``_refuse_copy`` in place of each module's instance ``_COPY_HOOKS`` (its own kept aside)."""
    for module in modules:
        own = module.__dict__
        own[_SAVED_COPY_HOOKS] = {name: own[name] for name in _COPY_HOOKS if name in own}
        own.update(dict.fromkeys(_COPY_HOOKS, _refuse_copy))


def _unguard_copies(modules) -> None:
    for module in modules:
        own = module.__dict__
        for name in _COPY_HOOKS:
            own.pop(name, None)
        own.update(own.pop(_SAVED_COPY_HOOKS, {}))  # the user's own, if any


_CALL_CODES = (nn.Module._call_impl.__code__,)
"""The frames of a module call (``generate`` is guarded by ``try / finally`` and needs none)."""

GUARD = "_nograd_one_thread"
"""The attribute of a model that holds its ``OneThreadAtATime`` while it has live handles."""


def calls_running(module: nn.Module, frame) -> int:
    """How many calls of ``module`` run in the stack that ``frame`` ends (the only record that outlives a
    ``KeyboardInterrupt``, which skips forward hooks, ``always_call`` ones included)."""
    count = 0
    while frame is not None:
        count += frame.f_code in _CALL_CODES and frame.f_locals.get("self") is module
        frame = frame.f_back
    return count


class OneThreadAtATime:
    """On a model with methods attached: a forward or ``generate()`` that starts while a forward or ``generate()`` of
    the same model runs in another thread raises ``RuntimeError``. The methods keep the running call's state on the
    model (its padding, its prompt and images, the sinks or kept tokens found at its prefill, used by every decode
    step), so two threads' calls would read each other's (wrong logits, or shape errors). A call inside the same
    thread's call passes (``generate``'s forwards, nograd's own extra passes)."""

    def __init__(self, model: nn.Module):
        from .observe import shadow_method

        self.model_name = type(model).__name__
        self._model = weakref.ref(model)
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._entered = threading.local()
        hooks = (model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave,
                                                                                            always_call=True))
        self._undo = [hook.remove for hook in hooks]
        if hasattr(model, "generate"):
            self._undo.append(shadow_method(model, "generate", self._guarded))

    def _guarded(self, generate: Callable) -> Callable:
        def guarded(*args, **kwargs):
            try:  # a refused call's entry is popped too (it was left on the thread's stack: one per retry)
                self._enter()
                return generate(*args, **kwargs)
            finally:
                self._leave()

        return guarded

    def _enter(self, *_) -> None:
        me = threading.get_ident()
        with self._lock:
            busy = self._depth and self._owner != me
            if busy and not self._in_call(self._owner):  # its call ended by an interrupt the hooks never saw
                self._depth, busy = 0, False
            if not busy:
                self._owner, self._depth = me, self._depth + 1
        self._entered.__dict__.setdefault("stack", []).append(not busy)
        if busy:
            raise RuntimeError(
                f"nograd: this {self.model_name} has methods attached and is running a call in another thread; the "
                "methods keep the running call's state on the model, so it serves one thread at a time: give each "
                "thread its own model, or serialize the calls (a lock around generate / forward)")

    def _in_call(self, thread: int) -> bool:
        """Whether thread ``thread`` runs a forward or ``generate()`` of the model now. A ``KeyboardInterrupt`` (a
        ``BaseException``) skips the forward hooks' ``always_call``, so a forward it ended never left; its thread's
        stack tells."""
        return calls_running(self._model(), sys._current_frames().get(thread)) > 0

    def _leave(self, *_) -> None:
        stack = self._entered.__dict__.get("stack")
        if stack and stack.pop():
            with self._lock:
                self._depth -= 1

    def remove(self) -> None:
        for undo in self._undo:
            undo()


def jsonable(value: Any) -> Any:
    """``value`` as plain data for ``json.dumps`` (see ``Handle.stats_json``)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


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

    def stats_json(self) -> dict[str, Any]:
        """``stats`` as plain data for ``json.dumps`` (logging, reports): tensors as lists (a 0-d one as its
        number), numpy scalars as Python's, keys as strings, non-finite floats as strings, anything else its repr."""
        return jsonable(self.stats)

    def expose(self, name: str, function: Callable, live_only: bool = True) -> None:
        """Make a method-specific action callable as ``handle.<name>(...)`` (e.g. CARVE's ``generate``); a name the
        handle already has (``remove``, ``stats``...) raises ``ValueError``, since it would never be reached. After
        ``remove()`` a ``live_only`` action raises ``RuntimeError`` (it would act through what was taken off); one
        that reads what the handle gathered (PAINT's ``save_head_stats``) passes ``live_only=False``."""
        if hasattr(type(self), name) or name in self.__dict__:
            raise ValueError(f"{self.method}: cannot expose {name!r}, a name every handle already has")
        self._exposed[name] = self._live_only(name, function) if live_only else function

    def _live_only(self, name: str, action: Callable) -> Callable:
        @functools.wraps(action)
        def while_live(*args, **kwargs):
            if not self._live:
                raise RuntimeError(f"{self.method}: this handle was removed, so handle.{name}() has no method to act "
                                   "through; nograd.apply the method again")
            return action(*args, **kwargs)

        return while_live

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
        own = self.model.__dict__
        if HANDLES not in own:
            _guard_copies(self._copied_with_methods())
            own[GUARD] = OneThreadAtATime(self.model)
        self.model.__dict__.setdefault(HANDLES, []).append(self)
        _MODELS.add(self.model)

    def _copied_with_methods(self) -> list[nn.Module]:
        """The model and its attention modules: a copy of any part that holds one (``deepcopy(model.model.layers)``)
        would carry a nograd attention name in its config, unregistered once the handles go."""
        return [self.model, *dict.fromkeys(getattr(self.adapter, "attention_modules", ()))]

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
                _unguard_copies(self._copied_with_methods())
                self.model.__dict__.pop(GUARD).remove()
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
