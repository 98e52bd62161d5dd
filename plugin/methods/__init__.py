"""One file per method; importing this package registers them all."""

from . import act, clearsight, fastv, pai, paint, pyramiddrop, zerotuning  # noqa: F401
