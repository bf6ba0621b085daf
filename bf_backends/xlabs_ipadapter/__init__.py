"""XLabs FLUX IP-Adapter backend (FLUX.1 host) on diffusers' own FLUX IP-Adapter."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.xlabs_ipadapter.backend import XLabsIPAdapterBackend

    register(XLabsIPAdapterBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "xlabs_ipadapter":
        return None
    from bf_core.extras import folder_extras

    return folder_extras("bf_backends.xlabs_ipadapter",
                         prompt="a person is kneeling by a small lake, touching the water",
                         id_prompt="a person", without=("scene_prompt", "call_kwargs"))
