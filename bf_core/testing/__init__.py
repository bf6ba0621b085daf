"""Test support shipped with the package: the tiny offline pipeline and the conformance kit.

Every backend, built-in or third-party, proves the same contract by subclassing
``BackendConformance`` in its own test suite::

    from bf_core.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend_name = "my-method"

        def make_pipeline(self):
            return build_my_tiny_pipeline()      # offline, seconds

        def identity_kwargs(self):
            return {"id_images": [my_test_image()]}

``make_pipeline`` may return a tiny FLUX.1 pipeline (``tiny_flux_pipeline``) for a backend
that serves FLUX: the checks are the same. pytest then runs the checks below against it: baseline parity with the stock pipeline,
determinism, output shapes, the method on differing from the baseline, both lines merged
into one UNet call equal to one call per line (under ``batch_invariant_kernels``), and the
pipeline state restored after a call and after an exception raised inside one.
"""

from __future__ import annotations

from bf_core.testing.conformance import BackendConformance
from bf_core.testing.fingerprint import pipeline_fingerprint
from bf_core.testing.kernels import batch_invariant_kernels, forward_hooks_registered
from bf_core.testing.sessions import opened_session
from bf_core.testing.tiny import add_tiny_lora, make_scheduler, tiny_sdxl_pipeline, tiny_tokenizers
from bf_core.testing.tiny_flux import add_tiny_flux_lora, tiny_flux_pipeline

__all__ = [
    "BackendConformance",
    "add_tiny_flux_lora",
    "add_tiny_lora",
    "batch_invariant_kernels",
    "forward_hooks_registered",
    "make_scheduler",
    "opened_session",
    "pipeline_fingerprint",
    "tiny_flux_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_tokenizers",
]
