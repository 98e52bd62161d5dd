"""One file per method; importing this package registers them all."""

from . import zerotuning  # noqa: F401
