"""Pluggy hook specifications of the ``beyondfacial`` project.

A plugin is a module or object with functions decorated by ``bf_core.hookimpl`` and
registered under the entry-point group ``beyondfacial``. Hooks only ever gain arguments;
an implementation may accept fewer than the spec lists.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "beyondfacial"
ENTRY_POINT_GROUP = "beyondfacial"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def bf_register_backends(register) -> None:
    """Register identity backends: call ``register(backend)`` for each.

    ``backend`` satisfies ``bf_core.Backend``: a ``name``, a ``recognizes(pipe)`` check, a
    ``priority`` and ``open_session(pipe, request, config)``.
    """


@hookspec(firstresult=True)
def bf_backend_for_pipeline(pipe: Any, candidates: list[str]) -> str | None:
    """Name the backend that should serve ``pipe``, or None to let the next plugin decide.

    ``candidates`` are the installed backends whose ``recognizes(pipe)`` is true, best
    first. Without an answer from any plugin, the first candidate is used.
    """


@hookspec
def bf_register_metrics(register) -> None:
    """Register benchmark metrics: call ``register(metric)`` for each."""
