"""IP-Adapter backend on diffusers' own IP-Adapter (plain, plus, plus-face, FaceID, FaceID-PlusV2)."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.ipadapter.backend import IPAdapterBackend

    register(IPAdapterBackend())
