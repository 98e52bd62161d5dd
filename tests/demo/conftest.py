"""The demo lives in the repository's ``demo/`` (not in the wheel): make it importable, ahead of this folder."""

import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if ROOT not in sys.path[:1]:
    sys.path.insert(0, ROOT)
if "demo" in sys.modules and getattr(sys.modules["demo"], "__file__", None) is None:
    del sys.modules["demo"]  # a namespace package made of tests/demo: the real one is ROOT/demo
