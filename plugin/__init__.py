"""nograd: training-free, inference-time attention methods for Hugging Face models.

    h = nograd.apply(model, "zerotuning", gamma=1.5)   # a transformers model or pipeline, a diffusers pipeline
    ...                                                 # unchanged user code
    h.remove()                                          # the model is bit-for-bit what it was

``nograd.tiny`` builds tiny random-weight models for trying the methods offline (imported on first use).
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .api import apply, resolve
from .attention import Intervention
from .config import MethodConfig, option
from .errors import IncompatibleMethodsError, NogradError, UnsupportedModelError
from .handle import Handle
from .handle import attached as _attached
from .handle import remove_all as _remove_all
from .merge import merge
from .methods.base import Method
from .registry import MethodInfo, methods, register

__version__ = "0.1.0"


def __getattr__(name: str):
    """``nograd.tiny`` is imported on first use."""
    if name == "tiny":
        import importlib

        return importlib.import_module(".tiny", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attached(target) -> list[Handle]:
    """The live handles on a model or pipeline, oldest first."""
    return _attached(resolve(target)[0])


def remove_all(target) -> None:
    """Remove every live handle on a model or pipeline, newest first."""
    _remove_all(resolve(target)[0])


__all__ = [
    "Handle",
    "IncompatibleMethodsError",
    "Intervention",
    "Method",
    "MethodConfig",
    "MethodInfo",
    "NogradError",
    "UnsupportedModelError",
    "apply",
    "attached",
    "merge",
    "methods",
    "option",
    "register",
    "remove_all",
]
