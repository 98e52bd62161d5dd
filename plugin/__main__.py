"""``python -m nograd ...``: the ``nograd`` command line (``nograd.cli``)."""

import sys

from .cli import main

sys.exit(main())
