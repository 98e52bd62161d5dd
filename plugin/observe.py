"""Observing a method call of one object: see its arguments, change nothing.

Why this exists: some inputs never reach a module hook. In transformers 5.24, ``generate()`` encodes the images
before the first forward: ``GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation``
(``transformers/generation/utils.py``) calls ``model.base_model.get_image_features(pixel_values=..., image_sizes=...,
...)`` directly, hands the prefill ``mm_encoder_outputs`` instead, and pops the image inputs (``pixel_values``,
``image_sizes``, ``vision_feature_select_strategy``, LLaVA-OneVision's ``vision_aspect_ratio`` and
``batch_num_images``) from the forward kwargs. ``get_image_features`` is a method, not a module; only the modules
it calls (the vision tower, the projector) have hooks, and those never see ``image_sizes``.

``observe_calls`` is the call point for such inputs: an instance attribute that shadows the method, hands the
named arguments of every call to a callback, then calls the original bound method with the same arguments and
returns its result as is. It observes only: the model's code is neither copied nor altered, the arguments are not
changed, and ``handle.remove()`` deletes the instance attribute again (or puts back the exact object the instance
held before).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from .forward_inputs import cache_of, cached_length

_ACTIVE = "__nograd_observing__"


def observe_calls(handle, obj: Any, name: str, callback: Callable[[dict], None]) -> None:
    """Call ``callback(arguments)`` on every call of ``obj.<name>(...)``, before the original runs; undone by
    ``handle.remove()``.

    ``arguments`` maps parameter names to the values passed (``inspect.signature(original).bind_partial``; defaults
    are not filled in, and the entries of a ``**kwargs`` parameter are merged in by their own names). The call
    itself goes to the original with the caller's own ``args`` and ``kwargs``; its result is returned unchanged.
    Observers stack, and each ``remove()`` undoes only its own, in any order.
    """
    def observing(original):
        signature = inspect.signature(original)
        var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        def observed(*args, **kwargs):
            arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
            if var_keyword is not None:
                arguments.update(arguments.pop(var_keyword, {}))
            callback(arguments)
            return original(*args, **kwargs)

        return observed

    handle.on_remove(f"observe {type(obj).__name__}.{name}", shadow_method(obj, name, observing))


def shadow_method(obj: Any, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Shadow ``obj.<name>`` with an instance attribute that calls ``make(original)`` (a function that calls
    ``original``); returns the undo. Shadows stack: an undone one that another still covers becomes a pass-through
    to ``original`` until those above it are undone too, then every undone one is unwound from the top, down to the
    exact object the instance held before (or none)."""
    own = vars(obj)
    before = (name in own, own.get(name))
    original = getattr(obj, name)
    wrapped = make(original)

    @functools.wraps(original)
    def shadow(*args, **kwargs):
        return (wrapped if getattr(shadow, _ACTIVE) else original)(*args, **kwargs)

    setattr(shadow, _ACTIVE, True)
    shadow.__nograd_before__ = before
    object.__setattr__(obj, name, shadow)

    def undo():
        setattr(shadow, _ACTIVE, False)
        while (top := vars(obj).get(name)) is not None and getattr(top, _ACTIVE, True) is False:
            had, previous = top.__nograd_before__
            if had:
                object.__setattr__(obj, name, previous)
            else:
                object.__delattr__(obj, name)

    return undo


class GenerationStarts:
    """Whether a ``generate()`` call on ``handle.model`` began since the last forward: the first forward of a call
    is a new prompt, never a no-cache re-run of the last one (only the later forwards of ``generate(use_cache=False)``
    are). Seen through ``observe_calls`` on ``model.generate``; undone by ``handle.remove()``. A model without
    ``generate`` (a bare ``LlavaModel``) has no generation to start: every forward is a new prompt."""

    def __init__(self, handle):
        self._started = False
        if hasattr(handle.model, "generate"):
            observe_calls(handle, handle.model, "generate", self._start)

    def _start(self, arguments: dict) -> None:
        self._started = True

    def may_rerun(self, inputs: dict) -> bool:
        """Whether the forward with (bound) ``inputs`` can be a later forward of ``generate(use_cache=False)``,
        which re-runs the prompt plus the tokens generated so far: not the first of a ``generate()`` call, no cache
        object, ``use_cache=False``. Call it at every forward (it reads the start of a call once); whether the tokens
        do extend the last prompt is the caller's to check."""
        started, self._started = self._started, False
        return not started and cache_of(inputs) is None and inputs.get("use_cache") is False


def refuse_assisted_decoding(handle, reason: str) -> None:
    """``generate()`` on ``handle.model`` raises ``NotImplementedError(reason)`` before it starts assisted or
    prompt-lookup decoding (``assistant_model=``, ``prompt_lookup_num_tokens=``); undone by ``handle.remove()``.

    Its first forward runs the prompt and a draft together, so a method that takes a first forward's last token for
    the prompt's end would read a draft token. The mode is seen where transformers 5.x hands it to
    ``_validate_generation_mode``, before any forward (``generate`` looks the decoding loop up on the class).
    """
    model = handle.model
    if not hasattr(model, "_validate_generation_mode"):
        return
    from transformers.generation.configuration_utils import GenerationMode

    def check(arguments: dict) -> None:
        if arguments.get("generation_mode") == GenerationMode.ASSISTED_GENERATION:
            raise NotImplementedError(reason)

    observe_calls(handle, model, "_validate_generation_mode", check)


def refuse_prompt_state_breakers(handle, method: str) -> None:
    """``generate()`` on ``handle.model`` raises ``NotImplementedError`` before it runs the model in a way that a
    method keeping the prompt's state from forward to forward would misread: transformers' own classifier-free
    guidance (``guidance_scale`` other than 1), whose logits processor runs the model again, on an unconditional
    sequence and cache of its own, between the steps (taken for a new prompt); and chunked prefill
    (``prefill_chunk_size``), which runs the prompt as several forwards on a growing cache (the later chunks taken for
    decode steps: the prompt's end, its image and its statistics cut at the first chunk); and a ``past_key_values``
    that already holds tokens (a prefix prefilled by hand, a chat continued from a returned cache), whose prompt the
    method never saw (ACT found its sinks over the new tokens alone; the visual edits saw no image). Seen where
    transformers 5.x builds the processors (``_get_logits_processor``), before any forward; undone by
    ``handle.remove()``."""
    model = handle.model
    if not hasattr(model, "_get_logits_processor"):
        return

    def check(arguments: dict) -> None:
        config = arguments.get("generation_config")
        scale = getattr(config, "guidance_scale", None)
        if scale is not None and scale != 1:
            raise NotImplementedError(f"{method}: transformers' guidance_scale runs the model again between the "
                                      "generation's steps (an unconditional forward), which the method would take "
                                      "for a new prompt; generate without guidance_scale")
        if getattr(config, "prefill_chunk_size", None) is not None:
            raise NotImplementedError(f"{method}: prefill_chunk_size runs the prompt as several forwards, and the "
                                      "method reads the prompt (its end, its image, its statistics) from the first; "
                                      "generate without prefill_chunk_size")
        cached = cached_length(arguments.get("model_kwargs") or {})
        if cached:
            raise NotImplementedError(f"{method}: past_key_values already holds {cached} positions of a prompt the "
                                      "method did not see (it reads the prompt: its end, its image, its statistics, "
                                      "at the prompt's first forward); generate from the whole prompt without a "
                                      "filled cache")

    observe_calls(handle, model, "_get_logits_processor", check)
