"""PuLID-FLUX backend (FLUX.1 host): ID cross-attention after the transformer's blocks, fed by
PuLID's ArcFace + EVA-CLIP IDFormer."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.pulid_flux.backend import PuLIDFluxBackend

    register(PuLIDFluxBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "pulid_flux":
        return None
    from bf_core.extras import folder_extras

    return folder_extras("bf_backends.pulid_flux",
                         prompt="a person is kneeling by a small lake",
                         id_prompt="a person", without=("scene_prompt", "call_kwargs"))
