"""PhotoMaker V1/V2 backend: identity fused into the trigger-word prompt, LoRA per line."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.photomaker.backend import PhotoMakerBackend

    register(PhotoMakerBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "photomaker":
        return None
    from bf_core.extras import folder_extras

    # Its scene prompt gets the trigger word for PhotoMaker's own algorithm (the baseline).
    return folder_extras("bf_backends.photomaker",
                         prompt="a person img is kneeling by a small lake, touching the water, full body, wide shot",
                         id_prompt="a person img",
                         without=())
