"""One file per method; importing this package registers them all."""

from . import act, carve, clearsight, fastv, frank, pai, paint, pyramiddrop, refam, softpag, zerotuning  # noqa: F401
