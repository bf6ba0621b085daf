"""InstantID backend: IdentityNet + face IP attention, keypoints placed for full-body scenes."""

from bf_core.hookspecs import hookimpl


@hookimpl
def bf_register_backends(register):
    from bf_backends.instantid.backend import InstantIDBackend

    register(InstantIDBackend())
