"""IP-Adapter backend on diffusers' own IP-Adapter (plain, plus, plus-face, FaceID, FaceID-PlusV2)."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.ipadapter.backend import IPAdapterBackend

    register(IPAdapterBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "ipadapter":
        return None
    from bf_core.extras import folder_extras

    # No pipeline from files: IP-Adapter pipelines are built with diffusers'
    # load_ip_adapter and wrapped from Python.
    return folder_extras("bf_backends.ipadapter",
                         prompt="a person is kneeling by a small lake, touching the water",
                         id_prompt="a person",
                         without=("load_pipeline", "scene_prompt"))
