"""The data that passes between the loop, the host and the backends in one call.

Plain records, no behaviour beyond small derived properties: the kinds of lines and CFG
branches, what the caller gives about a person, what an identity encoder returns, a line's
text conditioning, the request in the pipeline's terms, the semantic line's preview, and
what the loop reports to the host at the end.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import BaseOutput

from bf_core.errors import ConfigError


class Line(str, enum.Enum):
    """The kind of a line, i.e. of the model rows it owns."""

    ID = "id"  # identity machinery on, the person's placeholder prompt P_id
    SEMANTIC = "semantic"  # the user's scene prompt, identity machinery off by default
    BASELINE = "baseline"  # method off: the backend's stock single-line algorithm


class Branch(str, enum.Enum):
    """A classifier-free-guidance branch. A line's rows are blocked negative first."""

    UNCOND = "uncond"
    COND = "cond"


#: The rows of a line under CFG, and without it (or with the negative shared).
BOTH_BRANCHES = (Branch.UNCOND, Branch.COND)
POSITIVE_ONLY = (Branch.COND,)


@dataclass(frozen=True)
class Person:
    """What the caller gives about one person: reference images and/or a placeholder prompt.

    id_images: reference photos (paths, PIL images or arrays), or None for methods whose
        identity lives in a prompt trigger or in backend options.
    id_prompt: the person's placeholder prompt P_id; None takes the backend's default.
    region: where this person's ID line may win in the fusion (``bf_core.regions``): a box
        ``(x0, y0, x1, y1)`` in fractions of the image, a mask, ``"auto"`` (around the face
        found in the step-M1 preview) or None for the whole frame.
    """

    id_images: Sequence[Any] | None = None
    id_prompt: str | None = None
    region: Any = None


@dataclass
class Identity:
    """What an ``IdentityEncoder`` returns for one person.

    id_prompt: the P_id in use (the caller's, else the backend's default).
    tokens: T_id, (B_id, N, D) identity tokens in the model's text-token space (D = 2048
        for SDXL); B_id is 1 (one identity for the whole batch) or the number of rows.
    negative_tokens: the ID line's negative counterpart of ``tokens`` (same shape) for the
        IdAP ``"aggregate"`` negative policy, or None.
    state: backend-private data its lines need (face embeddings, keypoints, ...).
    """

    id_prompt: str
    tokens: torch.Tensor
    negative_tokens: torch.Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class LineConditioning:
    """One line's text conditioning, before CFG stacking.

    prompt_embeds / negative_prompt_embeds: (R, L, D), R = prompts x images per prompt.
    pooled / negative_pooled: (R, P). Negatives are None when CFG is off.
    trailing_padding: how many of the last tokens are padding in every row of both
        branches, when the host knows (FLUX's T5 text); None when unknown.
    prepended_tokens: how many tokens IdAP put in front (N*K), 0 for plain text.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    trailing_padding: int | None = None
    prepended_tokens: int = 0


@dataclass
class GenerationRequest:
    """What the caller asked for, in the pipeline's terms; identity inputs are ``Person``s."""

    prompt: str | list[str] | None
    prompt_2: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
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


class SemanticPreview:
    """The semantic line's clean-latent estimate at step M1, the last step before any ID
    line runs; what placement decisions (``region="auto"``, InstantID's ``kps="auto"``)
    look at.

    Nothing is computed until asked: ``x0()`` gives the (R, C, H, W) estimate in the host's
    fusion layout, or None when the scheduler gives none; ``images()`` decodes it once to
    PIL images; ``faces()`` runs the call's preview face detector on them once. So a call
    that places nothing pays nothing for it. ``regions``: each person's region in use once
    the loop has resolved the ``"auto"`` ones (``bf_core.regions``).
    """

    def __init__(self, step: int, estimate: Callable[[], torch.Tensor | None],
                 decode: Callable[[torch.Tensor], list[Any]],
                 detector: Callable[[], Any] | None = None):
        self.step = step
        self._estimate, self._decode, self._detector = estimate, decode, detector
        self._x0: torch.Tensor | None = None
        self._images: list[Any] | None = None
        self._faces: list[list[Any]] | None = None
        self._estimated = False
        self.regions: list[Any] = []
        #: per image per person the face an ``"auto"`` region was found around (or None)
        self.auto_faces: list[list[Any]] = []

    def x0(self) -> torch.Tensor | None:
        if not self._estimated:
            self._x0, self._estimated = self._estimate(), True
        return self._x0

    def images(self) -> list[Any] | None:
        if self._images is None and self.x0() is not None:
            self._images = self._decode(self._x0)
        return self._images

    def faces(self) -> list[list[Any]] | None:
        """Per preview image, the faces the detector finds (objects with ``bbox`` (x0, y0,
        x1, y1) pixels and ``area``), or None when there is no preview."""
        if self._faces is None and self.images() is not None:
            if self._detector is None:
                raise ConfigError("this preview was made without a face detector")
            detector = self._detector()
            self._faces = [list(detector.detect(image)) for image in self._images]
        return self._faces

    def person_faces(self) -> list[list[Any]] | None:
        """Per image, per person: the face box (x0, y0, x1, y1 pixels of the preview) the
        person is drawn at (``bf_core.regions.person_face_boxes``), or None when there is no
        preview."""
        from bf_core.regions import person_face_boxes

        faces = self.faces()
        if faces is None:
            return None
        return person_face_boxes(self.regions, [[face.bbox for face in found] for found in faces],
                                 self.auto_faces, self._images[0].size)


@dataclass
class LoopRecord:
    """What the loop reports: decision maps per fused step, model-call counts, settings.

    fusion_maps: with ``keep_maps``, one bool (N, 1, h, w) map per fused step of where an
    ID line won; fusion_lines: the same steps' int8 maps of which line won (0 semantic, j
    person j); fusion_steps: their step indices. regions: each person's (h, w) bool region
    on the latent grid, None for the whole frame.
    """

    keep_maps: bool
    fusion_maps: list[torch.Tensor] = field(default_factory=list)
    fusion_lines: list[torch.Tensor] = field(default_factory=list)
    regions: list[torch.Tensor | None] = field(default_factory=list)
    fusion_steps: list[int] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class BeyondFacialPipelineOutput(BaseOutput):
    """Output of a wrapped call.

    images: as the stock pipeline returns them (PIL list, numpy, torch or latents).
    fusion_maps: with ``return_fusion_maps=True``, a bool tensor (S, N, 1, h, w) of where the
        ID line won at each of the S fused steps (latent resolution), else None.
    fusion_steps: the step indices of ``fusion_maps``.
    fusion_lines: with ``return_fusion_maps=True``, an int8 tensor (S, N, 1, h, w) of which
        line won (0 the semantic line, j person j), else None.
    regions: each person's region in use, an (N, h, w) bool tensor on the latent grid (one
        per image: ``"auto"`` regions differ between images), or None for the whole frame;
        one entry per person.
    diagnostics: backend, thresholds, model-call counts, IdAP token selections.
    unrefined_images: with ``refine_faces=True``, the images before the face-refine pass
        (same type as ``images``), else None.
    refine_boxes: with ``refine_faces=True``, per image the face boxes refined, in pixels
        (x0, y0, x1, y1).
    """

    images: Any
    fusion_maps: torch.Tensor | None = None
    fusion_steps: list[int] | None = None
    fusion_lines: torch.Tensor | None = None
    regions: list[torch.Tensor | None] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    unrefined_images: Any = None
    refine_boxes: list[list[tuple[int, int, int, int]]] | None = None
