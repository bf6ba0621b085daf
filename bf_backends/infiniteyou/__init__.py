"""InfiniteYou backend (FLUX.1 host): InfuseNet residuals on the ID rows only."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.infiniteyou.backend import InfiniteYouBackend

    register(InfiniteYouBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "infiniteyou":
        return None
    from bf_core.extras import folder_extras

    return folder_extras("bf_backends.infiniteyou",
                         prompt="a person is kneeling by a small lake, touching the water, "
                                "full body, wide shot",
                         id_prompt="a person", without=("scene_prompt", "call_kwargs"))
