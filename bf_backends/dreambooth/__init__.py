"""DreamBooth / textual-inversion / character-LoRA backend: identity carried by a prompt trigger."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.dreambooth.backend import DreamBoothBackend

    register(DreamBoothBackend())
