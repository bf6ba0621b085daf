"""PuLID (v1 and v1.1, SDXL) backend: ID attention processors fed by ArcFace + EVA-CLIP."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.pulid.backend import PuLIDBackend

    register(PuLIDBackend())
