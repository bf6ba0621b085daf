"""Pluggy hook specifications of the ``beyondfacial`` project.

A plugin is a module or object with functions decorated by ``bf_core.hookimpl`` and
registered under the entry-point group ``beyondfacial``. Hooks only ever gain arguments;
an implementation may accept fewer than the spec lists. After loading, the registry runs
``check_pending()``: a plugin implementing a hook no spec names (a misspelling) is
reported and skipped.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "beyondfacial"
ENTRY_POINT_GROUP = "beyondfacial"
#: entry points naming further hookspec modules (the benchmark's metrics hook)
HOOKSPEC_GROUP = "beyondfacial.hookspecs"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def bf_register_backends(register) -> None:
    """Register identity backends: call ``register(backend)`` for each.

    ``backend`` satisfies ``bf_core.Backend``: a ``name``, the ``hosts`` it serves, its
    call ``options``, a ``recognizes(pipe)`` check, a ``priority`` and
    ``open_session(call, config)``.
    """


@hookspec
def bf_register_hosts(register) -> None:
    """Register host families (base models): call ``register(host)`` for each.

    ``host`` satisfies ``bf_core.hosts.Host``: a ``name``, ``recognizes(pipe)`` and
    ``open_call(pipe, args, kwargs)``.
    """


@hookspec(firstresult=True)
def bf_backend_for_pipeline(pipe: Any, candidates: list[str]) -> str | None:
    """Name the backend that should serve ``pipe``, or None to let the next plugin decide.

    ``candidates`` are the installed backends whose ``recognizes(pipe)`` is true, best
    first. Without an answer from any plugin, the first candidate is used.
    """


@hookspec(firstresult=True)
def bf_backend_extras(backend: str) -> Any:
    """The ``bf_core.extras.BackendExtras`` of the backend named ``backend``, or None.

    What the demo, the CLI and the benchmarks need beyond generation: a tiny offline
    pipeline, a pipeline from files, the speed script's set-up, benchmark call keywords.
    """
