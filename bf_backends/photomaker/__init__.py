"""PhotoMaker V1/V2 backend: identity fused into the trigger-word prompt, LoRA per line."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.photomaker.backend import PhotoMakerBackend

    register(PhotoMakerBackend())
