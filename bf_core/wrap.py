"""``wrap(pipe)``: the user's diffusers pipeline, drawing whole people in whole scenes.

The wrapper changes nothing on the pipeline when it is created. Each call opens a host
call (the base model's side) and a backend session, which switches adapters and
processors per line and registers their restore; all of it is put back when the call
returns or raises, so ``wrapper.pipe`` is always the user's pipeline, as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bf_core.config import BFConfig
from bf_core.errors import ConfigError, UnsupportedPipelineError


class BeyondFacialPipeline:
    """A wrapped pipeline with the stock call contract plus identity inputs.

    Call it like the pipeline (``prompt``, ``num_inference_steps``, ``guidance_scale``,
    ``generator``, ``num_images_per_prompt``, ``output_type``, ``return_dict``,
    ``callback_on_step_end``, ...), adding ``id_images``, ``id_prompt``,
    ``return_fusion_maps`` and the backend's own options. ``config=`` per call overrides
    the wrapper's config for that call only.
    """

    def __init__(self, pipe: Any, backend: Any, config: BFConfig, host: Any):
        self.pipe = pipe
        self.backend = backend
        self.config = config
        self.host = host

    def __call__(self, *args: Any, config: BFConfig | None = None, id_images: Any = None,
                 id_prompt: str | None = None, return_fusion_maps: bool = False, **kwargs: Any):
        import torch

        from bf_core import loop
        from bf_core.records import Person

        config = config or self.config
        if not isinstance(config, BFConfig):
            raise ConfigError(f"config must be a BFConfig, got {type(config).__name__}")
        with torch.no_grad():  # as the stock __call__
            call = self.host.open_call(self.pipe, args, kwargs)
            session = self.backend.open_session(call, config)
            latents, record = loop.run(call, session, config, [Person(id_images, id_prompt)],
                                       keep_maps=return_fusion_maps)
            return call.finish(latents, record, self.backend.name)

    def with_config(self, **changes: Any) -> BeyondFacialPipeline:
        """A new wrapper of the same pipeline with some BFConfig fields changed."""
        return BeyondFacialPipeline(self.pipe, self.backend,
                                    dataclasses.replace(self.config, **changes), self.host)

    def unwrap(self) -> Any:
        """The original pipeline (nothing to undo: every call restores what it touched)."""
        return self.pipe

    def to(self, *args: Any, **kwargs: Any) -> BeyondFacialPipeline:
        """Move the pipeline (and the backend's modules that follow it) like ``pipe.to``."""
        self.pipe.to(*args, **kwargs)
        return self

    def __getattr__(self, name: str) -> Any:
        # Everything else (progress-bar config, offload switches, components) is the pipeline's.
        if name in ("pipe", "backend", "config", "host"):
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __repr__(self) -> str:
        return (f"BeyondFacialPipeline(backend={self.backend.name!r}, host={self.host.name!r}, "
                f"pipe={type(self.pipe).__name__}, config={self.config!r})")


def wrap(pipe: Any, backend: str | None = None, config: BFConfig | None = None) -> BeyondFacialPipeline:
    """Wrap a diffusers pipeline with BeyondFacial.

    backend: a backend name (``beyondfacial backends`` lists them); None asks the
        installed plugins which one serves ``pipe``.
    config: the method's settings; ``BFConfig()`` (the paper's defaults) if None.
    """
    from bf_core.plugins import get_registry

    config = config if config is not None else BFConfig()
    if not isinstance(config, BFConfig):
        raise ConfigError(f"config must be a BFConfig, got {type(config).__name__}")
    registry = get_registry()
    host = registry.host_for_pipeline(pipe) if backend is None else None
    chosen = (registry.get_backend(backend) if backend
              else registry.backend_for_pipeline(pipe, host))
    if backend and not chosen.recognizes(pipe):
        raise UnsupportedPipelineError(
            f"backend {backend!r} cannot serve a {type(pipe).__name__}: it needs "
            f"{chosen.recognizes_description}")
    host = host or registry.host_for_pipeline(pipe)
    if host.name not in chosen.hosts:
        raise UnsupportedPipelineError(
            f"backend {chosen.name!r} serves {', '.join(chosen.hosts)} pipelines, but this "
            f"{type(pipe).__name__} is a {host.name} pipeline")
    return BeyondFacialPipeline(pipe, chosen, config, host)
