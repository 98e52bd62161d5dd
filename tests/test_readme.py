"""The README's set-up commands are what CI runs, and its code example works."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 2
    demo, tests = blocks
    assert "demo" in demo and "pytest" in tests
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines
    assert ci_lines.index(tests) > max(i for i, line in enumerate(ci_lines) if "venv" in line)
