"""What the demo, the CLI and the benchmarks need from a backend, beyond generation.

A backend's plugin answers the ``bf_backend_extras`` hook with one ``BackendExtras``
record. Its factories are named ``"module:function"`` (``named``) and imported only when
called, so that finding a backend never imports its test support: the tiny pipelines live
in each backend's ``testing`` module and reach the demo through here. ``folder_extras``
names them where the usual folder shape keeps them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bf_core.errors import ConfigError


@dataclass
class PipelineSetup:
    """A pipeline the backend serves, with what a call on it needs.

    identity: the call keywords of one identity (the demo's: ``id_images``, ``id_prompt``);
    options: backend options every call on this pipeline needs (e.g. the face analyser of
    a tiny face pack), whatever the identity.
    """

    pipe: Any
    identity: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpeedSetup:
    """The speed script's pipeline: the backend's ID modules at the pipeline's size, with
    random weights, and the call keywords of its identity.

    prompt: the scene prompt to time with (None: the script's default); stock_is_pipeline:
    time the pipeline's own call as "stock" (DreamBooth, whose baseline is that call).
    """

    pipe: Any
    identity: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    stock_is_pipeline: bool = False


@dataclass(frozen=True)
class BackendExtras:
    """What a backend offers the demo, the CLI and the benchmarks.

    prompt, id_prompt: a default scene prompt and P_id for the demo.
    tiny_pipeline(seed) -> PipelineSetup: an offline tiny pipeline with random weights; a
        backend serving FLUX takes ``host="flux"`` too (``tiny_setup``).
    load_pipeline(base_model, checkpoint, *, torch_dtype, device) -> PipelineSetup: the
        pipeline from a base model and the method's checkpoint (a file or folder).
    speed_setup(pipe, real, resolution, seed) -> SpeedSetup: the backend's ID modules added
        to a base SDXL pipeline (``real``: at real size).
    call_kwargs(identity, images) -> dict: the keywords that give one benchmark identity
        (``images``: its reference photos); None: ``id_images`` plus its ``id_prompt``.
    scene_prompt(prompt) -> str: the prompt this backend is called with for a scene prompt
        of the benchmark (PhotoMaker adds its trigger word); None: unchanged.
    """

    prompt: str
    id_prompt: str
    tiny_pipeline: Callable[..., PipelineSetup]
    load_pipeline: Callable[..., PipelineSetup] | None = None
    speed_setup: Callable[..., SpeedSetup] | None = None
    call_kwargs: Callable[[Any, list], dict[str, Any]] | None = None
    scene_prompt: Callable[[str], str] | None = None

    def tiny_setup(self, seed: int = 0, host: str = "sdxl") -> PipelineSetup:
        """The tiny pipeline set-up on ``host``: ``tiny_pipeline(seed)`` for SDXL, and
        ``tiny_pipeline(seed, host=host)`` for another host (a backend serving several)."""
        if host == "sdxl":
            return self.tiny_pipeline(seed=seed)
        return self.tiny_pipeline(seed=seed, host=host)


class NamedFunction:
    """A function named ``"package.module:function"``, imported on its first call."""

    def __init__(self, target: str):
        module, _, name = target.partition(":")
        if not module or not name:
            raise ConfigError(f"a function is named 'package.module:function', got {target!r}")
        self.target, self._module, self._name = target, module, name
        self._function: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._function is None:
            self._function = getattr(importlib.import_module(self._module), self._name)
        return self._function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"NamedFunction({self.target!r})"


def named(target: str) -> NamedFunction:
    """``NamedFunction(target)``: a lazily imported function for a ``BackendExtras`` field."""
    return NamedFunction(target)


#: Where a backend folder keeps each factory (docs/plugins.md, "One folder shape").
FOLDER_FACTORIES = {
    "tiny_pipeline": "testing:tiny_setup",
    "load_pipeline": "loader:load_pipeline_setup",
    "speed_setup": "testing:speed_setup",
    "call_kwargs": "backend:benchmark_call_kwargs",
    "scene_prompt": "backend:benchmark_prompt",
}


def folder_extras(package: str, prompt: str, id_prompt: str,
                  without: tuple[str, ...] = ("scene_prompt",)) -> BackendExtras:
    """``BackendExtras`` of a backend folder of the usual shape: each factory named in the
    module that plays its role (``FOLDER_FACTORIES``), except those listed in ``without``."""
    factories = {field: named(f"{package}.{where}") for field, where in FOLDER_FACTORIES.items()
                 if field not in without}
    return BackendExtras(prompt=prompt, id_prompt=id_prompt, **factories)
