"""``python -m demo [--host H] [--port P] [--share]``: the nograd Gradio demo (``demo.app``)."""

import sys

from demo.app import main

sys.exit(main())
