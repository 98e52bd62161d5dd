"""Every ```python block of README.md runs: on ``nograd.tiny`` models, offline, in a temporary working folder.

The README is split into sections at its headings; a section's blocks run in order in one fresh namespace (a later
block may use the names of an earlier one), so each section's first block is self-contained. A failure names the
README line: the code is compiled as ``README.md`` with its own line numbers.
"""

from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest
import torch

import nograd
from nograd import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def sections(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """[(heading, [(first line of the code, code), ...])] for every section with python blocks, in README order.

    Headings are lines starting with ``#`` outside fenced blocks; fences are lines starting with three backticks."""
    found, heading, blocks = [], "(top)", []
    fence, start, body = None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, start, body = line[3:].strip(), number + 1, []
            elif re.match(r"#{1,6} ", line):
                if blocks:
                    found.append((heading, blocks))
                heading, blocks = line.lstrip("#").strip(), []
        elif line.startswith("```"):
            if fence == "python":
                blocks.append((start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the block opened at line {start - 1} is never closed"
    if blocks:
        found.append((heading, blocks))
    return found


SECTIONS = sections(README.read_text())


def handles(namespace: dict) -> list[nograd.Handle]:
    return [value for value in namespace.values() if isinstance(value, nograd.Handle)]


# Cheap facts checked after a section ran (on its namespace), beside "every block runs".
CHECKS = {
    "nograd": lambda ns, cwd: not nograd.attached(ns["model"]) and ns["out"].shape[1] > ns["inputs"]["input_ids"].shape[1],
    "ZeroTuning": lambda ns, cwd: not nograd.attached(ns["model"]),
    "PAINT": lambda ns, cwd: (cwd / "llava-heads.safetensors").is_file(),
    "CARVE": lambda ns, cwd: isinstance(ns["out"].text, str) and ns["heat"].dim() == 2,
    "RefAM": lambda ns, cwd: "accuracy" in ns["scores"] and not nograd.attached(ns["flux_pipe"]),
    "SoftPAG": lambda ns, cwd: (cwd / "my_style.json").is_file(),
    "FRANK": lambda ns, cwd: any((cwd / "merged").glob("*.safetensors")) and not nograd.attached(ns["mllm"]),
    "Writing a method": lambda ns, cwd: "my_method" in nograd.methods() and not torch.equal(ns["steered"], ns["plain"]),
    "Demo and command line": lambda ns, cwd: isinstance(ns["r"]["method_text"], str),
}


def check_for(heading: str):
    matches = [check for key, check in CHECKS.items() if heading.startswith(key)]
    return matches[0] if matches else None


def test_the_readme_has_python_examples_and_every_check_names_a_section():
    assert sum(len(blocks) for _, blocks in SECTIONS) > 15
    headings = [heading for heading, _ in SECTIONS]
    for key in CHECKS:
        assert any(heading.startswith(key) for heading in headings), key


@pytest.mark.parametrize("heading, blocks", SECTIONS, ids=[heading for heading, _ in SECTIONS])
def test_readme_section_runs(heading, blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # ``from demo import compare``, as from a clone
    registered = set(nograd.methods())
    torch.manual_seed(0)
    module = types.ModuleType("__readme__")  # a real module: dataclasses look their class's module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    try:
        for line, code in blocks:
            # padded so that tracebacks name README.md and the line of the README
            exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
        check = check_for(heading)
        assert check is None or check(namespace, tmp_path), f"README.md, section {heading!r}: the check failed"
    finally:
        for handle in handles(namespace):
            handle.remove()
        for name in set(nograd.methods()) - registered:  # "Writing a method" registers one
            registry.unregister(name)
