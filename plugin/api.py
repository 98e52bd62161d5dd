"""``nograd.apply``: resolve the target, validate everything, then attach through one Handle."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from . import registry
from .errors import IncompatibleMethodsError, UnsupportedModelError
from .handle import Handle, attached, models_with_handles
from .observe import refuse_assisted_decoding, refuse_prompt_state_breakers
from .patches import adapter_for, supported_families


def _is_instance(obj, module: str, name: str) -> bool:
    """Whether ``obj`` is a ``module.name``; a module not imported yet holds no object (nothing is imported here)."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(obj, cls)


def resolve(target: Any) -> tuple[nn.Module, Any]:
    """(model, processor) of a transformers model or Pipeline, a diffusers pipeline or a diffusers model; a wrapper
    resolves to the model it wraps: a PEFT ``PeftModel`` (or its ``LoraModel``-style tuner), ``torch.compile``'s
    module (the compiled graph runs the steered model: it is guarded on the attention name nograd switches) and
    ``DataParallel`` / ``DistributedDataParallel``; a Pipeline to its model, resolved alike."""
    if _is_instance(target, "peft", "PeftModel"):
        return target.get_base_model(), None
    if _is_instance(target, "peft.tuners.tuners_utils", "BaseTuner"):
        return target.model, None
    if _is_instance(target, "torch._dynamo.eval_frame", "OptimizedModule"):
        return resolve(target._orig_mod)
    if isinstance(target, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return resolve(target.module)
    if _is_instance(target, "transformers", "Pipeline"):
        processor = getattr(target, "processor", None) or getattr(target, "tokenizer", None)
        return resolve(target.model)[0], processor
    if _is_instance(target, "diffusers", "DiffusionPipeline"):
        model = getattr(target, "transformer", None)
        if model is None:
            raise UnsupportedModelError(
                f"{type(target).__name__} has no `transformer` (UNet pipelines are not supported); "
                f"supported families: {', '.join(supported_families())}"
            )
        return model, None
    if isinstance(target, nn.Module):
        return target, None
    raise TypeError(
        "target must be a transformers PreTrainedModel or Pipeline, a diffusers DiffusionPipeline or a diffusers "
        f"transformer model; got {type(target).__name__}"
    )


def refuse_nested(model: nn.Module, method: str) -> None:
    """Raise ``IncompatibleMethodsError`` if a method is attached to a module that contains ``model`` or that
    ``model`` contains (a VLM and its own ``language_model``): the two would switch the same attention modules and
    configs, each unaware of the other."""
    for other in models_with_handles():
        handles = attached(other)
        if other is model or not handles:
            continue
        if any(module is model for module in other.modules()):
            relation = "which contains it"
        elif any(module is other for module in model.modules()):
            relation = "a part of it"
        else:
            continue
        raise IncompatibleMethodsError(
            f"cannot attach {method!r} to {type(model).__name__}: {handles[0].method!r} is attached to "
            f"{type(other).__name__}, {relation}; attach every method to the same object, or remove that handle first")


def apply(target: Any, method: str, /, **options) -> Handle:
    """Attach ``method`` to ``target`` with ``options``; returns the Handle that removes it.

    Every error (unknown method, unsupported model, bad option, conflicting method) is raised before the model is
    touched.
    """
    method_cls = registry.get(method)
    config = method_cls.Config.from_options(options)
    model, processor = resolve(target)
    adapter = adapter_for(model)
    if adapter.kind not in method_cls.kinds:
        families = ", ".join(f for k in method_cls.kinds for f in supported_families(k))
        raise UnsupportedModelError(
            f"{method_cls.name} does not support {type(model).__name__} (a {adapter.kind} model, family "
            f"{adapter.family}); it supports: {families}"
        )
    if method_cls.families and adapter.family not in method_cls.families:
        raise UnsupportedModelError(
            f"{method_cls.name} supports the families {', '.join(method_cls.families)}; {type(model).__name__} "
            f"({adapter.family}) is not one of them yet"
        )
    instance = method_cls(adapter, config)
    instance.check_model()
    refuse_nested(model, method_cls.name)
    for other in attached(model):
        other_cls = registry.get(other.method)
        shared = method_cls.conflicts(other_cls)
        if shared:
            verb = "already holds" if shared & other_cls.claims() else "reads"  # e.g. token dropping after a reader
            raise IncompatibleMethodsError(
                f"cannot attach {method_cls.name!r} to {type(model).__name__}: the attached {other.method!r} "
                f"{verb} {', '.join(sorted(shared))}; remove that handle first"
            )
    handle = Handle(model, adapter, method_cls.name, config, processor, target)
    try:
        instance.attach(handle)
        if not instance.supports_assisted_decoding():
            refuse_assisted_decoding(handle, f"{method_cls.name}: assisted and prompt-lookup decoding run the prompt "
                                     "and a draft in one first forward, where the method reads the prompt's last "
                                     "token; generate without assistant_model / prompt_lookup_num_tokens")
        if instance.keeps_prompt_state():
            refuse_prompt_state_breakers(handle, method_cls.name)
    except BaseException:
        handle.remove()
        raise
    handle._activate()
    return handle
