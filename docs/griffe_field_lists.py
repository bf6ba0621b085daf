"""A griffe extension for the API reference: docstring field lines become Markdown lists.

The docstrings of ``bf_core`` describe parameters and fields in prose lines of the form
``name: what it is``, continued by indented lines, after a blank line::

    Top-level configuration of BeyondFacial.

    enabled: ``False`` runs the backend's stock single-line algorithm.
    idaf_start: M1. The ID line runs and IdAF fuses at steps ``i > M1``. A float in
        [0, 1) is a fraction of the step count; an int is a step index.

Rendered as Markdown such a block would run together into one paragraph. This extension
turns each field line of such a block into a list item (``- `name`: what it is``). Only
blocks that start after a blank line are touched, so a sentence that happens to contain
``word:`` in running text stays as written. A reST ``text::`` before an indented example
becomes ``text:`` (the indented lines are a code block in Markdown as they are).
mkdocs.yml loads it for mkdocstrings.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# "name: text" or "name, other: text" at the docstring's own indentation
FIELD = re.compile(r"^(?P<names>[a-z_][\w*]*(?:, [a-z_][\w*]*)*): (?P<text>\S.*)$")


def field_lists(text: str) -> str:
    """``text`` with each field line of a field block as a Markdown list item."""
    lines = text.splitlines()
    out: list[str] = []
    in_block = False
    for index, line in enumerate(lines):
        match = FIELD.match(line)
        previous = lines[index - 1] if index else ""
        starts = match is not None and not previous.strip()
        continues = match is not None and in_block
        if starts or continues:
            if starts and out and out[-1].strip():
                out.append("")
            names = ", ".join(f"`{name}`" for name in match["names"].split(", "))
            out.append(f"- {names}: {match['text']}")
            in_block = True
        elif in_block and line.startswith((" ", "\t")) and line.strip():
            out.append("  " + line.strip())
        else:
            if line.endswith("::") and not line.endswith(" ::"):
                line = line[:-1]  # reST's "text::" before a literal block: "text:" in Markdown
            if in_block and line.strip():
                out.append("")  # prose right after a block is a paragraph of its own
            in_block = False
            out.append(line)
    return "\n".join(out)


class FieldLists(griffe.Extension):
    """Rewrites the docstring of every object griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and docstring.value:
            docstring.value = field_lists(docstring.value)
