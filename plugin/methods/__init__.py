"""One file per method; importing this package registers them all."""

from . import act, clearsight, pai, paint, zerotuning  # noqa: F401
