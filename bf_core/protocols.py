"""The contract between the core and the backends, and the data that passes between them.

The core (``bf_core.dli``) knows *lines*, never methods. A backend knows one method
(PhotoMaker, InstantID, ...) and supplies, per call, a ``BackendSession`` that:

- encodes the identity (``IdentityEncoder.encode``: reference images + ``P_id`` -> ``Identity``);
- builds each line's text conditioning (``LineConditioning``);
- evaluates the UNet for a batch of rows tagged by line (``RowBatch``), with that line's
  adapters, ControlNet residuals and attention-processor state;
- restores every piece of pipeline state it touched when the call ends, also on error.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


class Line(str, enum.Enum):
    """Which line a UNet row belongs to."""

    ID = "id"  # identity machinery on, the ID placeholder prompt P_id
    SEMANTIC = "semantic"  # the user's scene prompt, identity machinery off by default
    BASELINE = "baseline"  # method off: the backend's stock single-line algorithm


@dataclass
class Identity:
    """What an ``IdentityEncoder`` returns.

    tokens: T_id, (B_id, N, D) identity tokens in the UNet's cross-attention space
        (D = 2048 for SDXL); B_id is 1 (one identity for the whole batch) or the prompt batch.
    negative_tokens: the ID line's negative counterpart of ``tokens`` (same shape) for the
        IdAP ``"aggregate"`` negative policy, or None.
    state: backend-private data its ID line needs (face embeddings, keypoint image, ...).
    """

    tokens: torch.Tensor
    negative_tokens: torch.Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class LineConditioning:
    """One line's text conditioning, before CFG concatenation.

    prompt_embeds / negative_prompt_embeds: (R, L, D), R = batch_size * num_images_per_prompt.
    pooled / negative_pooled: (R, P). Negatives are None when CFG is off.
    extra: backend-private per-line data (image embeds, ControlNet images, ...).
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    """What the caller asked for, in diffusers' terms, plus the identity inputs."""

    prompt: str | list[str] | None
    prompt_2: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    id_images: list[Any] | None = None
    id_prompt: str | None = None
    batch_size: int = 1
    num_images_per_prompt: int = 1
    height: int = 1024
    width: int = 1024
    do_cfg: bool = True
    clip_skip: int | None = None
    lora_scale: float | None = None
    device: torch.device | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        """Images generated: batch_size * num_images_per_prompt."""
        return self.batch_size * self.num_images_per_prompt


@dataclass
class RowBatch:
    """Rows of one UNet evaluation, tagged by line and CFG branch.

    line: the line of every row, or None for a merged batch of several lines, whose
        ``row_lines`` tags each row and whose ``parts`` are the batches it merges.
    sample: (R, C, H, W), already ``scale_model_input``-scaled.
    branches: the branch of each block of rows, in order, e.g. ("uncond", "cond"); each
        block holds ``sample.shape[0] // len(branches)`` rows.
    encoder_hidden_states, text_embeds, time_ids: the concatenated conditioning.
    encoder_attention_mask: (R, L) 1/0 when rows of different context lengths were padded.
    """

    line: Line | None
    step_index: int
    timestep: torch.Tensor
    sample: torch.Tensor
    branches: tuple[str, ...]
    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    timestep_cond: torch.Tensor | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    conditioning: LineConditioning | None = None
    row_lines: tuple[Line, ...] | None = None
    parts: tuple[RowBatch, ...] = ()
    encoder_attention_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.sample.shape[0]


@runtime_checkable
class IdentityEncoder(Protocol):
    """Reference images + the ID placeholder prompt -> identity tokens and private state."""

    def encode(self, id_images: Sequence[Any] | None, id_prompt: str,
               request: GenerationRequest) -> Identity:
        """Return ``Identity`` with ``tokens`` (B_id, N, D) in the UNet's cross-attention space."""
        ...


@runtime_checkable
class BackendSession(Protocol):
    """Everything one generation call needs from a backend; a context manager.

    ``__exit__`` restores every piece of pipeline state the session touched.
    """

    encoder: IdentityEncoder

    def __enter__(self) -> BackendSession: ...

    def __exit__(self, *exc_info) -> None: ...

    def conditioning(self, line: Line, identity: Identity | None) -> LineConditioning:
        """The text conditioning of ``line`` (semantic: the scene prompt, IdAP excluded)."""
        ...

    def predict_noise(self, batches: Sequence[RowBatch]) -> list[torch.Tensor]:
        """Raw noise predictions, one (R, C, H, W) tensor per batch, in the same order."""
        ...

    def negative_shareable(self) -> bool:
        """True when the ID and semantic lines' negative rows run under identical model state."""
        ...

    def supports_row_batching(self, batches: Sequence[RowBatch]) -> bool:
        """True when ``batches`` (several lines) may run as one merged, row-masked UNet call."""
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

    def recognizes(self, pipe: Any) -> bool:
        """Duck-typed check; never imports the method's own package."""
        ...

    def open_session(self, pipe: Any, request: GenerationRequest, config: Any) -> BackendSession:
        """A session for one call; nothing is changed on ``pipe`` before ``__enter__``."""
        ...
