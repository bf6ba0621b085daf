"""``wrap(pipe)``: the user's diffusers pipeline, drawing whole people in whole scenes.

The wrapper changes nothing on the pipeline when it is created. Each call opens a host
call (the base model's side) and a backend session, which switches adapters and
processors per line and registers their restore; all of it is put back when the call
returns or raises, so ``wrapper.pipe`` is always the user's pipeline, as it was.

A call switches state on the pipeline itself, so two calls on one pipeline at the same
time would see each other's switches. Calls are therefore serialised per pipeline: one
lock is shared by every wrapper of that pipeline (``with_config`` copies, wrapping it
again), and a second thread waits for the first (``concurrency="wait"``, the default) or
is refused with ``ConcurrentCallError`` (``concurrency="refuse"``).
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bf_core.config import BFConfig
from bf_core.errors import (
    ConcurrentCallError,
    ConfigError,
    DeviceOutOfMemoryError,
    UnsupportedPipelineError,
)

CONCURRENCY_POLICIES = ("wait", "refuse")
#: the keywords of the method itself, beside the pipeline's and the backend's own
METHOD_KEYWORDS = ("config", "id_images", "id_prompt", "people", "preview_face_analyzer",
                   "return_fusion_maps", "refine_faces", "refine_boxes", "refine_face_analyzer")


class PipelineLock:
    """One pipeline's call lock, which knows the thread holding it: a call made from inside
    a running call on the same pipeline (a callback, say) is refused, not deadlocked."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, wait: bool, pipe: Any) -> None:
        if self.owner == threading.get_ident():
            raise ConcurrentCallError(
                f"this {type(pipe).__name__} was called again from inside a running call on it "
                "(a callback?); one call at a time per pipeline.")
        if not self._lock.acquire(blocking=wait):
            raise ConcurrentCallError(
                f"another call is running on this {type(pipe).__name__}; calls on one pipeline "
                "run one at a time (wrap(pipe, concurrency='wait') queues them).")
        self.owner = threading.get_ident()

    def release(self) -> None:
        self.owner = None
        self._lock.release()


_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_by_id: dict[int, PipelineLock] = {}  # pipelines that cannot be weakly referenced
_locks_guard = threading.Lock()


def pipeline_lock(pipe: Any) -> PipelineLock:
    """The one lock of ``pipe``, shared by every wrapper of it; made on first use."""
    with _locks_guard:
        try:
            return _locks.setdefault(pipe, PipelineLock())
        except TypeError:  # not hashable or not weakly referable: keyed by identity
            return _locks_by_id.setdefault(id(pipe), PipelineLock())


def unknown_keyword_error(unknown: Iterable[str], valid: Iterable[str], where: str) -> ConfigError:
    """A ``ConfigError`` naming each unknown keyword and the closest valid one."""
    valid = sorted(set(valid))
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"unknown keyword(s) for {where}: {', '.join(parts)}. Valid keywords: "
                       f"{', '.join(valid)}")


def check_refine(refine_faces: Any, refine_boxes: Any, analyzer: Any) -> dict[str, Any] | None:
    """The face-refine request of a call, or None when ``refine_faces`` is off."""
    if not isinstance(refine_faces, bool):
        raise ConfigError(f"refine_faces must be True or False, got {refine_faces!r}")
    if not refine_faces:
        if refine_boxes is not None or analyzer is not None:
            raise ConfigError("refine_boxes and refine_face_analyzer take effect with "
                              "refine_faces=True; add it")
        return None
    if analyzer is not None and not callable(getattr(analyzer, "detect", None)):
        raise ConfigError("refine_face_analyzer must have a detect(image) method returning "
                          f"faces (a bf_core.faces.FaceAnalyzer), got {type(analyzer).__name__}")
    return {"boxes": refine_boxes, "detector": analyzer}


def call_people(people: Sequence[Any] | None, id_images: Any, id_prompt: str | None,
                backend: Any) -> list[Any]:
    """The call's people: ``people=`` as given, or the one person of ``id_images`` /
    ``id_prompt`` (the whole frame). Checked against what the backend serves."""
    from bf_core.protocols import max_people
    from bf_core.records import Person
    from bf_core.regions import check_region

    if people is None:
        return [Person(id_images, id_prompt)]
    if id_images is not None or id_prompt is not None:
        raise ConfigError("give either people=[Person(...), ...] or id_images=/id_prompt= (one "
                          "person), not both; put each person's images and prompt in its Person")
    if isinstance(people, (str, bytes)) or not isinstance(people, Sequence) or not people:
        raise ConfigError(f"people must be a non-empty list of bf_core.Person, got {people!r:.60}")
    for index, person in enumerate(people):
        if not isinstance(person, Person):
            raise ConfigError(f"people[{index}] must be a bf_core.Person, got "
                              f"{type(person).__name__}")
        if person.id_prompt is not None and not isinstance(person.id_prompt, str):
            raise ConfigError(f"people[{index}].id_prompt must be a string or None")
        check_region(person.region, index)
    limit = max_people(backend)
    if len(people) > limit:
        raise ConfigError(f"the {backend.name} backend serves at most {limit} "
                          f"{'person' if limit == 1 else 'people'} per call; got {len(people)}")
    return list(people)


def out_of_memory_error(exc: BaseException, batch_lines: bool) -> DeviceOutOfMemoryError:
    """What to lower when the device ran out of memory inside a call."""
    lines = ("BFConfig(batch_lines=False), which evaluates the lines one call each and so "
             "halves the largest UNet batch; " if batch_lines else "")
    return DeviceOutOfMemoryError(
        f"the device ran out of memory inside the call ({exc}). Every piece of pipeline state "
        f"is restored. To fit: {lines}pipe.enable_model_cpu_offload(); a smaller height and "
        "width; fewer images per prompt.")


class BeyondFacialPipeline:
    """A wrapped pipeline with the stock call contract plus identity inputs.

    Call it like the pipeline (``prompt``, ``num_inference_steps``, ``guidance_scale``,
    ``generator``, ``num_images_per_prompt``, ``output_type``, ``return_dict``,
    ``callback_on_step_end``, ...), adding ``id_images``, ``id_prompt`` (one person) or
    ``people`` (``bf_core.Person`` list), ``return_fusion_maps``, ``preview_face_analyzer``
    (the detector ``region="auto"`` and InstantID's ``kps="auto"`` search the step-M1
    preview with; default the backend's face analyser) and the backend's own options. ``config=`` per call overrides
    the wrapper's config for that call only. A keyword that is none of these is refused,
    naming the closest valid one.
    """

    def __init__(self, pipe: Any, backend: Any, config: BFConfig, host: Any,
                 concurrency: str = "wait"):
        self.pipe = pipe
        self.backend = backend
        self.config = config
        self.host = host
        self.concurrency = concurrency

    def __call__(self, *args: Any, config: BFConfig | None = None, id_images: Any = None,
                 id_prompt: str | None = None, people: Sequence[Any] | None = None,
                 return_fusion_maps: bool = False, preview_face_analyzer: Any = None,
                 refine_faces: bool = False, refine_boxes: Any = None,
                 refine_face_analyzer: Any = None, **kwargs: Any):
        config = self.config if config is None else config
        if not isinstance(config, BFConfig):
            raise ConfigError(f"config must be a BFConfig, got {type(config).__name__}")
        self._check_keywords(kwargs)
        if id_prompt is not None and not isinstance(id_prompt, str):
            raise ConfigError(f"id_prompt must be a string (the person's placeholder prompt "
                              f"P_id), or None or '' for the backend's default, got "
                              f"{type(id_prompt).__name__} {id_prompt!r:.60}")
        if not isinstance(return_fusion_maps, bool):
            raise ConfigError(f"return_fusion_maps must be True or False, got {return_fusion_maps!r}")
        if preview_face_analyzer is not None and not callable(
                getattr(preview_face_analyzer, "detect", None)):
            raise ConfigError("preview_face_analyzer must have a detect(image) method returning "
                              "faces (a bf_core.faces.FaceAnalyzer), got "
                              f"{type(preview_face_analyzer).__name__}")
        persons = call_people(people, id_images, id_prompt, self.backend)
        refine = check_refine(refine_faces, refine_boxes, refine_face_analyzer)
        lock = pipeline_lock(self.pipe)
        lock.acquire(wait=self.concurrency == "wait", pipe=self.pipe)
        try:
            return self._run(args, kwargs, config, persons, return_fusion_maps,
                             preview_face_analyzer, refine)
        finally:
            lock.release()

    def _run(self, args: tuple, kwargs: dict[str, Any], config: BFConfig, persons: list,
             return_fusion_maps: bool, preview_face_analyzer: Any,
             refine: dict[str, Any] | None = None):
        import torch

        from bf_core import loop

        try:
            with torch.no_grad():  # as the stock __call__
                call = self.host.open_call(self.pipe, args, kwargs)
                if refine is not None and call.arguments.output_type == "latent":
                    raise ConfigError("refine_faces works on decoded images; output_type="
                                      "'latent' gives none. Ask for 'pil', 'np' or 'pt'")
                session = self.backend.open_session(call, config)
                latents, record = loop.run(call, session, config, persons,
                                           keep_maps=return_fusion_maps,
                                           preview_face_analyzer=preview_face_analyzer)
                if refine is None:
                    return call.finish(latents, record, self.backend.name)
                return self._refined(call, latents, record, config, persons, kwargs, refine)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory_error(exc, config.batch_lines) from exc

    def _refined(self, call: Any, latents: Any, record: Any, config: BFConfig, persons: list,
                 kwargs: dict[str, Any], refine: dict[str, Any]):
        """The face-refine pass after the main call (bf_core.refine)."""
        from bf_core import refine as refining

        images = call.decode(latents, "np")
        refined, boxes, passes = refining.refine_images(
            self, call, images, persons, config, dict(kwargs), refine["boxes"],
            refine["detector"], record.regions)
        record.diagnostics["refine"] = passes
        output_type = call.arguments.output_type
        return call.finish(latents, record, self.backend.name,
                           images=refining.to_output(refined, output_type, self.pipe),
                           refined={"unrefined_images": refining.to_output(images, output_type,
                                                                           self.pipe),
                                    "refine_boxes": boxes})

    def _check_keywords(self, kwargs: Mapping[str, Any]) -> None:
        valid = (set(self.host.call_keywords(self.pipe)) | set(METHOD_KEYWORDS)
                 | set(self.backend.options))
        unknown = set(kwargs) - valid
        if unknown:
            raise unknown_keyword_error(unknown, valid,
                                        f"a {self.backend.name} call on {self.host.name}")

    def with_config(self, **changes: Any) -> BeyondFacialPipeline:
        """A new wrapper of the same pipeline with some BFConfig fields changed."""
        return BeyondFacialPipeline(self.pipe, self.backend,
                                    dataclasses.replace(self.config, **changes), self.host,
                                    self.concurrency)

    def unwrap(self) -> Any:
        """The original pipeline (nothing to undo: every call restores what it touched)."""
        return self.pipe

    def to(self, *args: Any, **kwargs: Any) -> BeyondFacialPipeline:
        """Move the pipeline (and the backend's modules that follow it) like ``pipe.to``."""
        self.pipe.to(*args, **kwargs)
        return self

    def __getattr__(self, name: str) -> Any:
        # Everything else (progress-bar config, offload switches, components) is the pipeline's.
        if name in ("pipe", "backend", "config", "host", "concurrency"):
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __repr__(self) -> str:
        return (f"BeyondFacialPipeline(backend={self.backend.name!r}, host={self.host.name!r}, "
                f"pipe={type(self.pipe).__name__}, config={self.config!r})")


def wrap(pipe: Any, backend: str | None = None, config: BFConfig | None = None,
         concurrency: str = "wait") -> BeyondFacialPipeline:
    """Wrap a diffusers pipeline with BeyondFacial.

    backend: a backend name (``beyondfacial backends`` lists them); None asks the
        installed plugins which one serves ``pipe``.
    config: the method's settings; ``BFConfig()`` (the paper's defaults) if None.
    concurrency: ``"wait"`` (a call waits for one running on the same pipeline in another
        thread) or ``"refuse"`` (it raises ``ConcurrentCallError``).
    A wrapper given as ``pipe`` is unwrapped: the new wrapper wraps its pipeline.
    """
    from bf_core.plugins import get_registry

    if isinstance(pipe, BeyondFacialPipeline):
        pipe = pipe.pipe
    config = config if config is not None else BFConfig()
    if not isinstance(config, BFConfig):
        raise ConfigError(f"config must be a BFConfig, got {type(config).__name__}")
    if concurrency not in CONCURRENCY_POLICIES:
        raise ConfigError(f"concurrency must be one of {CONCURRENCY_POLICIES}, got {concurrency!r}")
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
    return BeyondFacialPipeline(pipe, chosen, config, host, concurrency)
