"""PuLID (v1 and v1.1, SDXL) backend: ID attention processors fed by ArcFace + EVA-CLIP."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.pulid.backend import PuLIDBackend

    register(PuLIDBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "pulid":
        return None
    from bf_core.extras import folder_extras

    return folder_extras("bf_backends.pulid",
                         prompt="a person is kneeling by a small lake",
                         id_prompt="a person")
