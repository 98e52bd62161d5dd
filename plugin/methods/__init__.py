"""One file per method; importing this package registers them all."""

from . import act, carve, clearsight, fastv, pai, paint, pyramiddrop, softpag, zerotuning  # noqa: F401
