"""How the benchmark builds a pipeline and identity inputs for any installed backend.

Everything comes from the backend's ``BackendExtras`` (the ``bf_backend_extras`` hook; see
docs/plugins.md), so a third-party backend joins the benchmark by answering that hook:

- ``tiny_pipeline(seed)``: the offline tiny pipeline of ``--tiny`` runs (required for them);
- ``load_pipeline(base_model, checkpoint, *, torch_dtype, device)``: the real pipeline
  (required for real runs);
- ``call_kwargs(identity, images)``: the call keywords that give one identity
  (``identity`` a ``BenchIdentity``, ``images`` its photos as PIL images); without it:
  ``id_images=images`` plus ``id_prompt`` when the identity sets one;
- ``scene_prompt(prompt)``: the prompt this backend is called with for a scene prompt of
  the grid (PhotoMaker adds its trigger word); the metrics still score the scene prompt.

A pipeline set-up's ``options`` (e.g. a tiny face analyser) go to every call on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bf_core.errors import ConfigError
from bf_core.extras import BackendExtras, PipelineSetup


def unchanged_prompt(prompt: str) -> str:
    return prompt


@dataclass
class BackendTarget:
    """Everything the runner needs from one backend."""

    name: str
    build_pipeline: Callable[[str | None], PipelineSetup]  # checkpoint -> pipeline set-up
    call_kwargs: Callable[[Any, list], dict[str, Any]]  # (identity, images) -> keywords
    prompt: Callable[[str], str] = unchanged_prompt  # scene prompt -> the one passed


def default_call_kwargs(backend: Any, identity: Any, images: list) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"id_images": images}
    id_prompt = identity.option(backend.name, "id_prompt", identity.id_prompt)
    if id_prompt:
        kwargs["id_prompt"] = id_prompt
    return kwargs


def resolve_target(backend: Any, extras: BackendExtras | None, *, tiny: bool,
                   base_model: str | None, torch_dtype: Any = None,
                   device: str | None = None, host: str = "sdxl") -> BackendTarget | str:
    """The backend's target, or a sentence saying why it cannot be benchmarked here."""
    if extras is None:
        return ("gives no BackendExtras (the bf_backend_extras hook, docs/plugins.md), so the "
                "benchmark cannot build its pipeline")
    call_kwargs = extras.call_kwargs or (lambda identity, images: default_call_kwargs(
        backend, identity, images))
    prompt = extras.scene_prompt or unchanged_prompt
    if tiny:
        return BackendTarget(backend.name, lambda checkpoint: extras.tiny_setup(seed=0, host=host),
                             call_kwargs, prompt)
    if extras.load_pipeline is None:
        return "gives no load_pipeline in its BackendExtras, so it cannot be built from files"
    if not base_model:
        raise ConfigError("--base-model is required (a diffusers SDXL folder or hub id), or pass "
                          "--tiny for the offline tiny setup")
    return BackendTarget(
        backend.name,
        lambda checkpoint: extras.load_pipeline(base_model, checkpoint, torch_dtype=torch_dtype,
                                                device=device),
        call_kwargs, prompt)


def installed_target(name: str, **kwargs: Any) -> BackendTarget | str:
    """``resolve_target`` for the installed backend ``name`` and its plugin's extras."""
    from bf_core.plugins import get_registry

    registry = get_registry()
    return resolve_target(registry.get_backend(name), registry.extras(name), **kwargs)


def base_pipeline(*, tiny: bool, base_model: str | None, torch_dtype: Any = None,
                  device: str | None = None, host: str = "sdxl"):
    """The base model alone (no identity method): the FID reference images come from it."""
    if tiny and host == "flux":
        from bf_core.testing.tiny_flux import tiny_flux_pipeline

        return tiny_flux_pipeline(seed=0)
    if tiny:
        from bf_core.testing.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed=0)
    if not base_model:
        raise ConfigError("the FID reference set needs --base-model (or --fid-reference DIR)")
    from bf_core.hosts.flux import is_flux_model, load_flux_pipeline
    from bf_core.hosts.sdxl import load_sdxl_pipeline

    load = load_flux_pipeline if is_flux_model(base_model) else load_sdxl_pipeline
    return load(base_model, torch_dtype=torch_dtype, device=device)
