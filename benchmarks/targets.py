"""How the benchmark builds a pipeline and identity inputs for any installed backend.

The benchmark protocol is optional; a backend implements what it can:

- ``benchmark_pipeline(base_model, checkpoint, *, torch_dtype, device)``: the pipeline
  this backend serves. Without it, ``from_pretrained`` with the same arguments is used.
- ``benchmark_tiny_pipeline(seed=0)``: an offline tiny pipeline it serves, for
  ``--tiny`` runs. Without it the backend is left out of tiny runs (with a note).
- ``benchmark_call_kwargs(identity, images)``: the call keywords that give one identity
  (``identity`` is a ``BenchIdentity``, ``images`` its reference photos as PIL images).
  Without it: ``id_images=images`` plus ``id_prompt`` when the identity sets one.
- ``benchmark_prompt(prompt)``: the prompt this backend is called with for a scene prompt
  of the grid (PhotoMaker adds its trigger word); the metrics still score the scene
  prompt. Without it: the prompt as it is.

The protocol is looked up on the registered backend object, so a backend that adds these
methods is picked up with no change here. Backends shipped before the protocol existed get
their answers from ``KNOWN_BACKENDS`` below, which holds only what their public API (and
their ``testing`` module) already offers; a backend's own method always wins over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bf_core.errors import ConfigError


def unchanged_prompt(prompt: str) -> str:
    return prompt


@dataclass
class BackendTarget:
    """Everything the runner needs from one backend."""

    name: str
    build_pipeline: Callable[[str | None], Any]  # checkpoint -> pipeline
    call_kwargs: Callable[[Any, list], dict[str, Any]]  # (identity, images) -> keywords
    prompt: Callable[[str], str] = unchanged_prompt  # scene prompt -> the one passed


def default_call_kwargs(backend: Any, identity: Any, images: list) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"id_images": images}
    id_prompt = identity.option(backend.name, "id_prompt", identity.id_prompt)
    if id_prompt:
        kwargs["id_prompt"] = id_prompt
    return kwargs


def _dreambooth_tiny(seed: int = 0):
    from bf_core.testing.tiny import add_tiny_lora, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=seed)
    add_tiny_lora(pipe, adapter_name="identity")
    return pipe


def _dreambooth_kwargs(backend: Any, identity: Any, images: list) -> dict[str, Any]:
    # The identity lives in the LoRA and its trigger prompt; the photos only feed the metrics.
    id_prompt = identity.option(backend.name, "id_prompt", identity.id_prompt)
    return {"id_prompt": id_prompt or backend.default_id_prompt}


#: the tiny IP-Adapter variant: a CLIP-image one, so the tiny identity photos feed it
#: directly (FaceID variants would also need a face detector that finds faces in them)
TINY_IPADAPTER_VARIANT = "plus-face"


def _ipadapter_tiny(seed: int = 0):
    from bf_backends.ipadapter.testing import tiny_pipeline

    return tiny_pipeline(TINY_IPADAPTER_VARIANT, seed=seed)


#: name -> (tiny pipeline builder, call keywords) for backends without the protocol;
#: None: the protocol's default (IP-Adapter takes ``id_images`` as they are)
KNOWN_BACKENDS: dict[str, tuple[Callable | None, Callable | None]] = {
    "dreambooth": (_dreambooth_tiny, _dreambooth_kwargs),
    "ipadapter": (_ipadapter_tiny, None),
}


def resolve_target(backend: Any, *, tiny: bool, base_model: str | None, torch_dtype: Any = None,
                   device: str | None = None) -> BackendTarget | str:
    """The backend's target, or a sentence saying why it cannot be benchmarked here."""
    known_tiny, known_kwargs = KNOWN_BACKENDS.get(backend.name, (None, None))
    if hasattr(backend, "benchmark_call_kwargs"):
        call_kwargs = backend.benchmark_call_kwargs
    elif known_kwargs is not None:
        def call_kwargs(identity, images, _f=known_kwargs):
            return _f(backend, identity, images)
    else:
        def call_kwargs(identity, images):
            return default_call_kwargs(backend, identity, images)

    prompt = getattr(backend, "benchmark_prompt", None) or unchanged_prompt

    if tiny:
        builder = getattr(backend, "benchmark_tiny_pipeline", None) or known_tiny
        if builder is None:
            return "has no benchmark_tiny_pipeline() (see docs/benchmark.md, 'Backend protocol')"
        return BackendTarget(backend.name, lambda checkpoint, _b=builder: _b(seed=0), call_kwargs,
                             prompt)

    builder = getattr(backend, "benchmark_pipeline", None) or getattr(backend, "from_pretrained", None)
    if builder is None:
        return "has neither benchmark_pipeline() nor from_pretrained()"
    if not base_model:
        raise ConfigError("--base-model is required (a diffusers SDXL folder or hub id), or pass "
                          "--tiny for the offline tiny setup")
    return BackendTarget(
        backend.name,
        lambda checkpoint, _b=builder: _b(base_model, checkpoint, torch_dtype=torch_dtype,
                                          device=device),
        call_kwargs, prompt)


def base_pipeline(*, tiny: bool, base_model: str | None, torch_dtype: Any = None,
                  device: str | None = None):
    """The base model alone (no identity method): the FID reference images come from it."""
    if tiny:
        from bf_core.testing.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed=0)
    if not base_model:
        raise ConfigError("the FID reference set needs --base-model (or --fid-reference DIR)")
    from bf_core.sdxl import load_sdxl_pipeline

    return load_sdxl_pipeline(base_model, torch_dtype=torch_dtype, device=device)
