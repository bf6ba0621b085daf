"""The benchmark's hook specification: metrics as plugins.

Part of the ``beyondfacial`` project's hooks (same marker, same entry-point group), kept
beside the benchmark that calls it. The core registry adds this module through the
``beyondfacial.hookspecs`` entry point, so that ``check_pending()`` knows the hook.
"""

from __future__ import annotations

from bf_core.hookspecs import hookspec


@hookspec
def bf_register_metrics(register) -> None:
    """Register benchmark metrics: call ``register(metric)`` for each."""
