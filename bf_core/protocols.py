"""The contract between the loop, the host and the backends, and the data they pass.

One wrapped call involves three parties, each varying on its own:

- the **loop** (``bf_core.loop``): the lines, their schedule, IdAP and IdAF; it knows no
  base model and no identity method;
- the **host** (``bf_core.hosts``): the base-model family (SDXL, ...): the pipeline's call
  keywords, text encoding, latents, the model call, CFG, the scheduler and decoding;
- the **backend** (``bf_backends.<method>``): one identity method. Per call it opens a
  ``BackendSession`` that encodes each person (``IdentityEncoder``), gives each line its
  conditioning and evaluates the model for a batch of rows with each row's machinery on or
  off. Everything it changes on the pipeline it registers for restore when it opens.

The Protocols below are exactly what the loop and the host call on a backend; nothing
else is looked up on a backend object.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any, Protocol, runtime_checkable

import torch

from bf_core.config import BFConfig
from bf_core.hosts import HostCall, ModelCall, RowBatchLike
from bf_core.records import (
    Identity,
    Line,
    LineConditioning,
    Person,
    SemanticPreview,
)


@runtime_checkable
class IdentityEncoder(Protocol):
    """One person's inputs -> identity tokens T_id and the private state of their ID line.

    The only reader of the reference images and of P_id.
    """

    def encode(self, person: Person) -> Identity:
        """``Identity`` with ``tokens`` (B_id, N, D) in the model's text-token space."""
        ...


@runtime_checkable
class BackendSession(Protocol):
    """Everything one generation call needs from a backend.

    ``batch`` arguments are the host's row batches (``bf_core.hosts.sdxl.RowBatch`` on
    SDXL): the rows of one line, or of several lines merged into one model call
    (``batch.parts``); ``model`` is the host's model call for such a batch.
    """

    encoder: IdentityEncoder

    def open(self, restore: ExitStack) -> None:
        """Change what the call needs on the pipeline, registering every restore on
        ``restore`` (it unwinds when the call ends, also after an exception)."""
        ...

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        """The text conditioning of ``line`` (semantic: the scene prompt, IdAP excluded)."""
        ...

    def negative_shareable(self) -> bool:
        """True when the ID and semantic lines' negative rows run under identical model state."""
        ...

    def supports_row_batching(self, batch: RowBatchLike) -> bool:
        """True when ``batch`` (rows of several lines) may run as one row-masked model call."""
        ...

    def observe_preview(self, preview: SemanticPreview) -> None:
        """Called once, at step M1 when ID lines will run, with the semantic line's preview
        (its ``regions`` resolved). A session may also have ``preview_face_analyzer()``, the
        detector that preview is searched with by default (``preview_face_detector``)."""
        ...

    def predict(self, batch: RowBatchLike, model: ModelCall) -> torch.Tensor:
        """The raw model output for ``batch``, each row under its own line's machinery."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A method's plug-in: recognises pipelines and opens sessions on them."""

    name: str
    #: one line saying which pipelines it serves, shown when ``wrap`` finds no backend
    recognizes_description: str
    #: higher wins when several backends recognise the same pipeline
    priority: int
    #: the ID placeholder prompt P_id used when the caller gives none
    default_id_prompt: str
    #: the host families it serves (``bf_core.hosts``), e.g. ("sdxl",)
    hosts: tuple[str, ...]
    #: its own per-call keywords, each with a line of help
    options: Mapping[str, str]
    #: how many people one call may have (one ID line each); optional, 1 when absent
    max_people: int
    #: False when the backend's T_id is not in the model's text-token space, so IdAP (which
    #: prepends aggregated ID tokens to the scene prompt) does not apply; optional, True
    idap_applicable: bool

    def recognizes(self, pipe: Any) -> bool:
        """Duck-typed check; never imports the method's own package."""
        ...

    def open_session(self, call: HostCall, config: BFConfig) -> BackendSession:
        """A session for one call; nothing is changed on the pipeline before ``open``."""
        ...


#: the number of people a backend serves when it does not declare ``max_people``
DEFAULT_MAX_PEOPLE = 1


def max_people(backend: Any) -> int:
    """How many people ``backend`` serves in one call (``DEFAULT_MAX_PEOPLE`` when it does
    not say: a backend written for one person is never handed two)."""
    return int(getattr(backend, "max_people", DEFAULT_MAX_PEOPLE))


def idap_applicable(backend: Any) -> bool:
    """Whether IdAP applies to ``backend`` (``Backend.idap_applicable``, True when absent)."""
    return bool(getattr(backend, "idap_applicable", True))


def preview_face_detector(session: Any, given: Any = None):
    """A function giving the face detector the step-M1 preview is searched with: ``given``
    (the call's ``preview_face_analyzer``), else the session's own (an optional
    ``preview_face_analyzer()`` method: its reference-face analyser, or None), else the
    library's default ``FaceAnalyzer()``. Nothing is built until the function is called."""
    def detector():
        if given is not None:
            return given
        own = getattr(session, "preview_face_analyzer", None)
        analyzer = own() if own is not None else None
        if analyzer is not None:
            return analyzer
        from bf_core.faces import FaceAnalyzer

        return FaceAnalyzer()
    return detector
