"""The documentation site (mkdocs.yml) covers every page in docs/ and builds with --strict."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"


def nav_pages(entries) -> list[str]:
    """The page paths of a mkdocs nav, in order, at any depth."""
    pages: list[str] = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages.extend(nav_pages(value))
        elif not str(value).startswith(("http://", "https://")):
            pages.append(str(value))
    return pages


def site_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = site_config()
    assert config["docs_dir"] == "docs"
    nav = nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    on_disk = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    assert sorted(set(on_disk) - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(on_disk)) == [], "nav entries without a page"


def test_the_site_builds_offline():
    """No web fonts, no analytics: the build and the pages reach no network."""
    config = site_config()
    assert config["theme"]["name"] == "material"
    assert config["theme"]["font"] is False
    assert "analytics" not in config.get("extra", {})


def test_field_lines_become_lists():
    if importlib.util.find_spec("griffe") is None:
        pytest.skip('griffe is not installed (pip install -c constraints-cpu.txt -e ".[docs]")')
    spec = importlib.util.spec_from_file_location("griffe_field_lists",
                                                  DOCS / "griffe_field_lists.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = ("Summary.\n\nenabled: on or off.\nidaf_start: M1, a step index\n    or a fraction.\n"
            "Prose after it.\nA float, FLUX's\nchoice: stays prose.\n\nAn example::\n\n    code()")
    assert module.field_lists(text) == (
        "Summary.\n\n- `enabled`: on or off.\n- `idaf_start`: M1, a step index\n  or a fraction.\n"
        "\nProse after it.\nA float, FLUX's\nchoice: stays prose.\n\nAn example:\n\n    code()")


def test_mkdocs_build_strict(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: the docs extra "
                    '(pip install -c constraints-cpu.txt -e ".[docs]")')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
    assert "bf_core.config.BFConfig" in (
        tmp_path / "site" / "reference" / "config" / "index.html").read_text()
