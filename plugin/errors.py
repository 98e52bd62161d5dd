"""The errors nograd raises, each before anything on the model has changed."""


class NogradError(Exception):
    """Base class of nograd's own errors."""


class UnsupportedModelError(NogradError, ValueError):
    """The model's architecture has no adapter in `nograd.patches` (or the method does not support its family)."""


class IncompatibleMethodsError(NogradError, ValueError):
    """Two methods that cannot share one model were attached to it."""
