"""DreamBooth / textual-inversion / character-LoRA backend: identity carried by a prompt trigger."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.dreambooth.backend import DreamBoothBackend

    register(DreamBoothBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "dreambooth":
        return None
    from bf_core.extras import folder_extras

    return folder_extras("bf_backends.dreambooth",
                         prompt="a person is kneeling by a small lake, touching the water",
                         id_prompt="a photo of sks person")
