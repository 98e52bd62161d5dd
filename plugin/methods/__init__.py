"""One file per method; importing this package registers them all."""

from . import act, clearsight, pai, zerotuning  # noqa: F401
