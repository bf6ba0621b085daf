"""Docs pull their code from tested files: the examples in docs/ cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def code_blocks(markdown: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S)]


def test_plugin_guide_shows_the_tested_example_plugin():
    blocks = code_blocks((ROOT / "docs" / "plugins.md").read_text())
    example = ROOT / "tests" / "fixtures" / "example_plugin"
    assert (example / "pyproject.toml").read_text().strip() in blocks
    assert (example / "beyondfacial_example_plugin" / "__init__.py").read_text().strip() in blocks
    assert (example / "beyondfacial_example_plugin" / "testing.py").read_text().strip() in blocks


def test_plugin_guide_shows_the_tested_conformance_example():
    blocks = code_blocks((ROOT / "docs" / "plugins.md").read_text())
    tested = (ROOT / "tests" / "e2e" / "test_dreambooth_conformance.py").read_text()
    body = tested.split('"""', 2)[2].strip()  # the file without its docstring
    assert body in blocks
