"""A backend session opened on a pipeline outside a generation call, for white-box tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def opened_session(pipe: Any, backend: str | None = None, config: Any = None,
                   **call_kwargs: Any) -> Iterator[Any]:
    """The session ``wrap(pipe, backend, config)`` would open for a call with ``call_kwargs``
    (default ``prompt="x"``), opened; everything it changed is restored on exit.

    For tests that look inside one backend: its per-line state, its merged-row switches,
    its model call on hand-made row batches.
    """
    import bf_core

    wrapped = bf_core.wrap(pipe, backend=backend, config=config)
    call = wrapped.host.open_call(pipe, (), {"prompt": "x", **call_kwargs})
    session = wrapped.backend.open_session(call, wrapped.config)
    with contextlib.ExitStack() as restore:
        session.open(restore)
        yield session
