"""InstantID backend: IdentityNet + face IP attention, keypoints placed for full-body scenes."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.instantid.backend import InstantIDBackend

    register(InstantIDBackend())


@hookimpl
def bf_backend_extras(backend):
    if backend != "instantid":
        return None
    from bf_core.extras import folder_extras

    return folder_extras("bf_backends.instantid",
                         prompt="a person is kneeling by a small lake, touching the water, full body, wide shot",
                         id_prompt="a person")
