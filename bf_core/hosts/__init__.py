"""Hosts: the base-model families the one loop runs on, behind a small contract.

A host (``Host``) recognises a pipeline object and opens a ``HostCall`` for one wrapped
call. The call owns everything specific to the base model: the pipeline's call keywords,
text encoding, latents and their layout, the model call for a batch of rows, guidance,
the scheduler, callbacks, the progress bar and decoding. ``bf_core.loop`` asks it for
exactly the members of ``HostCall`` below and nothing else.

Hosts are found like backends, through the pluggy hook ``bf_register_hosts``; the SDXL
host (``bf_core.hosts.sdxl``) registers through the same entry-point group a third-party
host family would use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from bf_core.records import GenerationRequest, Line, LineConditioning, LoopRecord


@dataclass(frozen=True)
class Step:
    """One denoising step: its index ``i`` (0 = noisiest) and the scheduler's timestep."""

    index: int
    timestep: torch.Tensor


class LineInputs(Protocol):
    """A host's CFG-stacked model inputs of one line, fixed before the first step; opaque
    to the loop, which only hands them back to the host."""


class RowBatchLike(Protocol):
    """A host's rows of one model call (one line's, or several lines' merged)."""

    @property
    def rows(self) -> int: ...


@dataclass
class MaskedImg2Img:
    """A masked img2img start for a host call (the face-refine pass): the loop starts from
    ``image_latents`` noised to the step ``strength`` gives, and after every step the host
    puts back, outside ``mask``, the image latents noised to the next step (the blend of
    diffusers' inpaint pipelines for a plain denoiser).

    image_latents and mask are in the host's latent layout (mask 1 where the pass may
    change the latents); noise is drawn by the host once, from the call's generator.
    """

    image_latents: torch.Tensor
    mask: torch.Tensor
    strength: float
    noise: torch.Tensor | None = None


class RowsOfLines:
    """What every host's row batch answers from its ``line``, ``sample`` (rows first),
    ``branches`` and ``parts`` (the one-line batches a merged batch holds, in row order)."""

    line: Line | None
    sample: torch.Tensor
    branches: tuple
    parts: tuple

    @property
    def rows(self) -> int:
        return self.sample.shape[0]

    @property
    def rows_per_branch(self) -> int:
        return self.rows // len(self.branches)

    @property
    def row_lines(self) -> tuple[Line, ...]:
        """The line of each row."""
        if self.parts:
            return tuple(line for part in self.parts for line in part.row_lines)
        return (self.line,) * self.rows

    @property
    def lines(self) -> tuple[Line, ...]:
        """The lines whose rows the batch holds, in order."""
        return tuple(part.line for part in self.parts) if self.parts else (self.line,)

    @property
    def row_branches(self) -> tuple:
        """The CFG branch of each row (a line's rows are blocked negative first)."""
        if self.parts:
            return tuple(branch for part in self.parts for branch in part.row_branches)
        return tuple(branch for branch in self.branches for _ in range(self.rows_per_branch))


#: The host's model call for a batch of rows: ``model(batch, **extra) -> output``; a backend
#: session wraps it with its machinery (see ``BackendSession.predict``).
ModelCall = Callable[..., torch.Tensor]


def size_or_native(size: Any, native: int) -> Any:
    """A call's height or width: the caller's, else (None) the host's native size. Only None
    means "not given": a 0 goes on to the call's size check and its named error."""
    return native if size is None else size


@runtime_checkable
class HostCall(Protocol):
    """One wrapped call on one pipeline, from the host's side."""

    pipe: Any
    request: GenerationRequest
    #: the side in pixels the pipeline draws when the caller gives no height or width
    native_size: int

    # -- set-up ----------------------------------------------------------------------------
    def prepare(self, semantic: LineConditioning) -> int:
        """Schedule and initial latents for the call; returns the number of steps T that the
        thresholds M1 and M2 refer to."""
        ...

    def line_inputs(self, conditioning: LineConditioning) -> LineInputs:
        """A line's model inputs, CFG-stacked as the stock pipeline stacks them."""
        ...

    def same_negative(self, a: LineInputs, b: LineInputs) -> bool:
        """True when two lines' negative rows are identical tensors."""
        ...

    def initial_latents(self) -> torch.Tensor: ...

    # -- the loop --------------------------------------------------------------------------
    def progress(self) -> AbstractContextManager[Any]:
        """The pipeline's progress bar over the steps."""
        ...

    def steps(self) -> Iterable[Step]: ...

    def interrupted(self) -> bool:
        """True when the caller interrupted the call (the rest of the steps are skipped)."""
        ...

    def cfg_active(self) -> bool:
        """Whether this step runs classifier-free guidance (a callback may switch it off)."""
        ...

    def model_input(self, latents: torch.Tensor, step: Step, cfg: bool) -> torch.Tensor:
        """The scheduler-scaled sample of every branch, (2R or R, ...)."""
        ...

    def rows(self, line: Line, inputs: LineInputs, sample: torch.Tensor, step: Step, cfg: bool,
             shares_negative: bool, line_index: int = 0) -> RowBatchLike:
        """The rows a line evaluates at ``step``: both CFG branches, or only the positive one
        when CFG is off or the line shares the semantic line's negative rows. ``line_index``:
        the line's place in the call (0 the semantic line, j person j's ID line), kept on the
        rows so that a backend can give each person's rows that person's identity state."""
        ...

    def merge(self, batches: list[RowBatchLike]) -> RowBatchLike | None:
        """One batch holding every row of ``batches``, in order, tagged per row by line; None
        when one model call cannot hold them (then each runs on its own)."""
        ...

    def split(self, output: torch.Tensor, merged: RowBatchLike) -> list[torch.Tensor]:
        """Undo ``merge`` on the model output: one tensor per original batch."""
        ...

    @property
    def model(self) -> ModelCall: ...

    def cfg_branches(self, output: torch.Tensor, cfg: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(uncond, cond) halves of a line's output; uncond is None without CFG."""
        ...

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """Guided prediction: CFG and its rescale as the stock pipeline; ``cond`` without CFG."""
        ...

    @property
    def guidance_scale(self) -> float: ...

    def fusion_layout(self, prediction: torch.Tensor) -> torch.Tensor:
        """A prediction in the (N, C, H, W) latent-grid layout that IdAF reads."""
        ...

    def from_fusion_layout(self, prediction: torch.Tensor) -> torch.Tensor: ...

    def x0_estimate(self, batch: RowBatchLike, guided: torch.Tensor) -> torch.Tensor | None:
        """The clean-latent estimate (fusion layout) of a line's guided prediction, or None
        when the scheduler gives none."""
        ...

    def preview_images(self, x0: torch.Tensor) -> list[Any]:
        """Decode a clean-latent estimate to PIL images."""
        ...

    def scheduler_step(self, noise: torch.Tensor, step: Step, latents: torch.Tensor) -> torch.Tensor:
        ...

    def end_of_step(self, step: Step, latents: torch.Tensor, progress: Any) -> torch.Tensor:
        """Callbacks and progress after ``step``; returns the (maybe replaced) latents."""
        ...

    # -- the end ---------------------------------------------------------------------------
    def finish(self, latents: torch.Tensor, record: LoopRecord, backend: str) -> Any:
        """Check and decode the final latents; the pipeline's output object (or tuple)."""
        ...


@runtime_checkable
class Host(Protocol):
    """A base-model family: recognises its pipelines and opens calls on them."""

    name: str
    #: one line saying which pipelines it serves, shown when ``wrap`` finds no host
    recognizes_description: str

    def recognizes(self, pipe: Any) -> bool:
        """Duck-typed, from the pipeline's components; never from its class name."""
        ...

    def call_keywords(self, pipe: Any) -> frozenset[str]:
        """The keywords the pipeline's own call accepts (for naming a misspelt one)."""
        ...

    def open_call(self, pipe: Any, args: tuple, kwargs: Mapping[str, Any]) -> HostCall:
        """Parse the pipeline's call arguments; keywords the pipeline does not take become
        ``request.backend_options``. Sets the pipeline's per-call properties."""
        ...
