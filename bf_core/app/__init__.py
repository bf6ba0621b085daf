"""``beyondfacial app``: a web page over ``beyondfacial generate`` (the ``app`` extra).

- ``form``: the form's values as ``generate``'s command line, read by the CLI's own parser
  (no torch, no gradio);
- ``run``: one run (pipelines loaded once and reused, the method and its baseline, the
  files ``generate`` writes, the decision-map animation);
- ``ui``: the gradio page, the only module that imports gradio.
"""

from __future__ import annotations

INSTALL_HINT = 'the web app needs gradio: pip install "beyondfacial[app]"'


def gradio_missing() -> bool:
    """True when the ``app`` extra (gradio) is not installed."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        return True
    return False


def launch(host: str = "127.0.0.1", port: int | None = None, out: str = "beyondfacial-app",
           block: bool = True):
    """Serve the app (``bf_core.app.ui.launch``); gradio is imported only here."""
    from bf_core.app.ui import launch as serve

    return serve(host=host, port=port, out=out, block=block)


def serve_command(host: str = "127.0.0.1", port: int | None = None,
                  out: str = "beyondfacial-app") -> int:
    """``beyondfacial app``: serve, or exit with one line naming the extra to install."""
    if gradio_missing():
        raise SystemExit(f"error: {INSTALL_HINT}")
    launch(host=host, port=port, out=out)
    return 0
