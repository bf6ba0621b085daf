"""The InfiniteYou backend on FLUX.1: InfuseNet residuals are the ID line's machinery.

Lines (spec ``flux.md`` 4 and 8; ``docs/backends/infiniteyou.md``):

* ID line: ``P_id`` as the base transformer's text; InfuseNet run on the positive rows
  with the person's T_id as its only context (8 tokens, zero text ids), the control image,
  the rows' pooled text and its own guidance embedding; its residuals, times the
  conditioning scale, go to the base transformer (``controlnet_blocks_repeat=False``).
  InfuseNet runs only where the ID line runs (steps i > M1) and the user's window
  (``infusenet_guidance_start/end``) keeps it on.
* Semantic line: the plain transformer; in a merged call its rows get zero residuals,
  and x + 0 == x, so they are exactly the plain transformer's rows.
* Negative rows (true CFG): no InfuseNet residuals, the official negative pass.
* Baseline (method off): the official ``InfUFluxPipeline`` algorithm: InfuseNet on every
  step with the scale times the window's keep flag, the user's prompt as text.

Nothing on the pipeline is changed by a call; the parts live at ``pipe.infiniteyou``
(``loader.attach_infiniteyou``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bf_backends.infiniteyou.control import (
    black_canvas,
    encode_control_images,
    pose_keypoint_image,
    reference_keypoint_image,
)
from bf_backends.infiniteyou.encoder import InfiniteYouEncoder
from bf_backends.infiniteyou.loader import build_face_analyzer, find_infiniteyou_parts
from bf_backends.instantid.control import check_kps_option, placed_keypoint_image, region_face_box
from bf_backends.instantid.keypoints import draw_kps
from bf_backends.instantid.loader import FaceAnalyzerCache
from bf_core.config import BFConfig
from bf_core.errors import ConfigError, UnsupportedPipelineError
from bf_core.hosts.flux import HOST_NAME, ID_LINE_OPTIONS, FluxSession, is_flux_pipeline
from bf_core.records import Branch, Identity, Line, LineConditioning, SemanticPreview
from bf_core.regions import region_bounds

if TYPE_CHECKING:
    from bf_core.hosts.flux import FluxCall, FluxModel, FluxRowBatch

logger = logging.getLogger(__name__)

OPTIONS = {
    "kps": "'none' (default: the official black control image), 'reference', 'auto', (5, 2) "
           "keypoints in output pixels or a keypoint image",
    "control_image": "the official pose photo: its largest face's keypoints are drawn after "
                     "resizing and padding it to the output size",
    "infusenet_conditioning_scale": "InfuseNet strength (default 1.0)",
    "infusenet_guidance_start": "fraction of steps before InfuseNet starts (default 0)",
    "infusenet_guidance_end": "fraction of steps after which InfuseNet stops (default 1)",
    "infusenet_guidance_scale": "InfuseNet's own guidance embedding (default 1.0)",
    "face_embeds": "(N, 512) ArcFace embeddings instead of analysing id_images",
    "face_recognizer": "the recogniser of the aligned face: (1, 3, 112, 112) BGR in [-1, 1] "
                       "-> (1, 512), e.g. facexlib's ArcFace as the official pipeline uses",
    "face_analyzer": "a bf_core.faces.FaceAnalyzer (or any object with detect/embed)",
    "face_model": "insightface pack name or folder (default 'antelopev2')",
    "face_model_root": "insightface root folder",
    "face_providers": "onnxruntime execution providers",
    "face_policy": "'largest' (default), 'highest_score' or 'error' for several faces",
    **ID_LINE_OPTIONS,
}


@dataclass(frozen=True)
class InfuseNetSettings:
    """InfuseNet's strength, window and guidance, the official pipeline's defaults.

    conditioning_scale multiplies the residuals; guidance_start/end are fractions of the
    steps (the official keep flag); guidance_scale is InfuseNet's own guidance embedding.
    """

    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guidance_scale: float = 1.0

    def __post_init__(self):
        for name in ("conditioning_scale", "guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ConfigError(f"infusenet_{name} must be a finite number, got {value!r}")
        start, end = self.guidance_start, self.guidance_end
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float))
                and 0.0 <= start < end <= 1.0):
            raise ConfigError("infusenet_guidance_start/end must satisfy 0 <= start < end <= 1, "
                              f"got ({start!r}, {end!r})")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> InfuseNetSettings:
        fields = ("conditioning_scale", "guidance_start", "guidance_end", "guidance_scale")
        return cls(**{name: options[f"infusenet_{name}"] for name in fields
                      if f"infusenet_{name}" in options})

    def keep(self, step: int, total: int) -> float:
        """The official keep flag of step ``step`` of ``total``: 0 outside the window."""
        outside = step / total < self.guidance_start or (step + 1) / total > self.guidance_end
        return 0.0 if outside else 1.0


@dataclass
class Residuals:
    """InfuseNet's outputs for some rows: one tensor (rows, N, W) per double-block sample
    and per single-block sample (None when InfuseNet has no such blocks)."""

    block: list[torch.Tensor] | None
    single: list[torch.Tensor] | None

    def keywords(self) -> dict[str, Any]:
        """The base transformer's keywords; InfuseNet is InstantX-style (no hint block)."""
        return {"controlnet_block_samples": self.block,
                "controlnet_single_block_samples": self.single,
                "controlnet_blocks_repeat": False}


def rows_residuals(parts: Sequence[FluxRowBatch], found: Sequence[Residuals | None]
                   ) -> Residuals:
    """Residuals for every row of ``parts``, in order: each part's own where it has some
    (they cover its positive rows, the last ones), zeros for every other row, which the
    transformer adds as x + 0 == x."""
    template = next(residuals for residuals in found if residuals is not None)

    def column(samples_of, index: int) -> torch.Tensor:
        like = samples_of(template)[index]
        pieces = []
        for part, residuals in zip(parts, found, strict=True):
            sample = None if residuals is None else samples_of(residuals)[index]
            zeros = part.rows - (0 if sample is None else sample.shape[0])
            if zeros:
                pieces.append(like.new_zeros(zeros, *like.shape[1:]))
            if sample is not None:
                pieces.append(sample)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def all_columns(samples_of):
        samples = samples_of(template)
        return None if samples is None else [column(samples_of, i) for i in range(len(samples))]

    return Residuals(all_columns(lambda r: r.block), all_columns(lambda r: r.single))


class InfiniteYouSession(FluxSession):
    """One call on an InfiniteYou pipeline: InfuseNet per row, control images, identities.

    Each person's identity reaches the session through ``conditioning`` and is kept per
    line (``line_identities``): ID line j's InfuseNet reads person j's T_id and control
    image.
    """

    def __init__(self, backend: InfiniteYouBackend, call: FluxCall, config: BFConfig):
        super().__init__(backend, call, config)
        parts = find_infiniteyou_parts(self.pipe)
        if parts is None:
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} is not set up for "
                                           f"InfiniteYou: {backend.recognizes_description}")
        self.parts = parts
        self.options = dict(self.request.backend_options)
        self.settings = InfuseNetSettings.from_options(self.options)
        self.kps = check_kps_option(self.options.get("kps", "none"))
        self.pose = self.options.get("control_image")
        if self.pose is not None and not (isinstance(self.kps, str) and self.kps == "none"):
            raise ConfigError("give either control_image= (the official pose photo) or kps=, "
                              "not both.")
        self.encoder = InfiniteYouEncoder(self)
        self.size = (self.request.width, self.request.height)
        self._control: dict[Any, torch.Tensor] = {}
        self._preview: SemanticPreview | None = None

    # -- state -----------------------------------------------------------------------------
    def open(self, restore: ExitStack) -> None:
        """Nothing on the pipeline changes; the parts (not a pipeline component, so
        ``pipe.to`` leaves them) go to the call's device when they are elsewhere."""
        device = self.request.device
        current = next(self.parts.parameters()).device
        if device is not None and torch.device(device) != current:
            logger.info("moving pipe.infiniteyou from %s to the call's device %s", current, device)
            self.parts.to(device)

    # -- identity ----------------------------------------------------------------------------
    def reference_analyzer(self):
        return self.backend.face_analyzer(self.options, self.parts)

    def preview_face_analyzer(self):
        """The detector the step-M1 preview is searched with by default: the reference one."""
        return self.reference_analyzer()

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        self.line_identities.note(line, identity)
        draws = isinstance(self.kps, str) and self.kps in ("auto", "reference")
        if draws and identity.state["reference"].kps is None:
            raise ConfigError(f"kps={self.kps!r} draws the reference face's keypoints, but only "
                              "face_embeds were given: pass id_images too, or choose kps='none' "
                              "or your own (5, 2) keypoints.")
        return super().conditioning(line, identity)

    def negative_shareable(self) -> bool:
        """Negative rows never get InfuseNet residuals, so both lines' negative rows run the
        plain transformer."""
        return True

    def supports_row_batching(self, batch: FluxRowBatch) -> bool:
        """Always: InfuseNet switches per row by zero residuals."""
        return True

    def observe_preview(self, preview: SemanticPreview) -> None:
        """Kept for the ID lines' control images (kps='auto', and 'reference' with regions)."""
        self._preview = preview

    # -- control images -----------------------------------------------------------------------
    def _control_images(self, line: Line, person: int, reference) -> list:
        """The control image of a line's rows: one for every row, or one per row."""
        if self.pose is not None:
            return [pose_keypoint_image(self.pose, self.size, self.reference_analyzer(),
                                        self.options.get("face_policy", "largest"))]
        mode = self.kps
        if isinstance(mode, str):
            if mode == "auto" and line is not Line.ID:
                # The baseline is the official method; the semantic line is what "auto" reads.
                mode = "reference" if line is Line.BASELINE else "none"
            if mode == "none":
                return [black_canvas(self.size)]
            if mode == "reference":
                return self._reference_images(person, reference)
            return self._auto_images(person, reference)
        if hasattr(mode, "convert"):
            return [mode]
        return [draw_kps(self.size, mode)]

    def _reference_images(self, person: int, reference) -> list:
        """kps='reference': the official placement, or with a region the reference keypoints
        in the face that region implies (``region_face_box``), per output image."""
        regions = self._preview.regions if self._preview is not None else []
        region = regions[person] if person < len(regions) else None
        if region is None:
            return [reference_keypoint_image(reference, self.size)]
        return [placed_keypoint_image(reference, region_face_box(
            region_bounds(region, row), self.size, self.config.auto_region_scale), self.size)
            for row in range(self.request.num_rows)]

    def _auto_images(self, person: int, reference) -> list:
        """kps='auto': per output image, the reference keypoints in the person's face of the
        step-M1 preview, or the black canvas where that preview shows no face."""
        faces = None if self._preview is None else self._preview.person_faces()
        if faces is None:
            logger.warning("kps='auto': no step-M1 preview is available; InfuseNet gets the "
                           "black canvas.")
            return [black_canvas(self.size)]
        images = []
        for row, found in enumerate(faces):
            box = found[person]
            if box is None:
                logger.info("kps='auto': no face for person %d in the step-%d preview of image "
                            "%d; InfuseNet gets the black canvas there.", person,
                            self._preview.step, row)
                images.append(black_canvas(self.size))
            else:
                logger.info("kps='auto': image %d, person %d, face box %s in the step-%d "
                            "preview.", row, person, [round(float(v), 1) for v in box],
                            self._preview.step)
                images.append(placed_keypoint_image(reference, box, self.size))
        return images

    def _control_latents(self, part: FluxRowBatch, identity: Identity) -> torch.Tensor:
        """The packed control latents (R, N, 64) of a line's rows, encoded once per call.

        The VAE posterior sample is drawn from the call's generator when first needed,
        after the latents: the latents stay those of the stock FluxPipeline.
        """
        person = part.line_index - 1 if part.line is Line.ID else 0
        key = (part.line is Line.ID, person)
        if key not in self._control:
            images = self._control_images(part.line, person, identity.state["reference"])
            self._control[key] = encode_control_images(
                self.pipe, images, self.size, self.request.num_rows,
                self.call.arguments.generator, part.sample.device)
        return self._control[key]

    # -- InfuseNet ---------------------------------------------------------------------------
    def _runs_infusenet(self, line: Line) -> bool:
        return line is not Line.SEMANTIC or self.config.semantic_adapters == "on"

    def _residuals(self, part: FluxRowBatch) -> Residuals | None:
        """InfuseNet on a one-line batch's positive rows, or None where it does not run:
        the semantic line, and outside the window (the baseline runs it there at scale 0,
        as the official pipeline does)."""
        if not self._runs_infusenet(part.line):
            return None
        keep = self.settings.keep(part.step_index, len(self.call.timesteps))
        scale = self.settings.conditioning_scale * keep
        if scale == 0.0 and part.line is not Line.BASELINE:
            return None
        identity = self.line_identities.of(part)
        control = self._control_latents(part, identity)
        return self.infusenet(part, identity.tokens, control, scale)

    def infusenet(self, part: FluxRowBatch, tokens: torch.Tensor, control: torch.Tensor,
                  scale: float) -> Residuals:
        """InfuseNet on the positive rows of ``part`` (the last R): T_id (1, Q, D) as its
        only context with zero text ids, the packed control latents (R, N, 64), the rows'
        pooled text, its own guidance; residuals scaled by ``scale``."""
        net = self.parts.infusenet
        rows = part.rows_per_branch
        sample, pooled = part.sample[-rows:], part.pooled[-rows:]
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full([1], self.settings.guidance_scale, device=sample.device,
                                  dtype=torch.float32).expand(rows)
        timestep = part.timestep.expand(rows).to(sample.dtype)
        tokens = tokens.to(sample.device).expand(rows, -1, -1)
        block, single = net(
            hidden_states=sample, controlnet_cond=control.to(net.dtype),
            conditioning_scale=scale, timestep=timestep / 1000, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=tokens,
            txt_ids=self.call.text_ids(tokens.shape[1]), img_ids=self.call.latent_image_ids,
            joint_attention_kwargs=dict(self.pipe.joint_attention_kwargs or {}),
            return_dict=False)
        return Residuals(None if block is None else list(block),
                         None if single is None else list(single))

    def predict(self, batch: FluxRowBatch, model: FluxModel) -> torch.Tensor:
        """One transformer call for a line's batch or a merged one (``batch.parts``).

        Rows without InfuseNet (semantic, negative, outside the window) get zero
        residuals; a batch where no row has any is the plain transformer call. The
        baseline with true CFG runs as the official pipeline: InfuseNet, the conditional
        call with its residuals, then the unconditional call without.
        """
        parts = batch.parts or (batch,)
        found = [self._residuals(part) for part in parts]
        if all(residuals is None for residuals in found):
            return model(batch)
        if batch.line is Line.BASELINE and len(batch.branches) == 2:
            return model.per_branch(batch, lambda branch: found[0].keywords()
                                    if branch is Branch.COND else {})
        if len(parts) == 1 and batch.branches == (Branch.COND,):
            return model(batch, **found[0].keywords())
        return model(batch, **rows_residuals(parts, found).keywords())


class InfiniteYouBackend:
    """InfiniteYou: ArcFace embedding -> 8 ID tokens -> InfuseNet residuals in FLUX.1."""

    name = "infiniteyou"
    recognizes_description = (
        "a diffusers FluxPipeline with InfiniteYou attached (bf_backends.infiniteyou.loader."
        "attach_infiniteyou: InfuseNetModel/ and image_proj_model.bin)")
    priority = 30  # above the DreamBooth fallback, which also serves plain FLUX pipelines
    default_id_prompt = "a person"
    hosts = (HOST_NAME,)
    options = OPTIONS
    #: each ID line's InfuseNet reads its own person's T_id and control image
    max_people = 4

    def __init__(self) -> None:
        self._analyzers = FaceAnalyzerCache(build_face_analyzer)

    def recognizes(self, pipe: Any) -> bool:
        return is_flux_pipeline(pipe) and find_infiniteyou_parts(pipe) is not None

    def open_session(self, call: FluxCall, config: BFConfig) -> InfiniteYouSession:
        return InfiniteYouSession(self, call, config)

    def face_analyzer(self, options: dict[str, Any], parts: Any = None):
        """The reference-photo analyser: the call's, else the one attached with the parts,
        else antelopev2 built once per backend for these options."""
        if options.get("face_analyzer") is not None:
            return options["face_analyzer"]
        if parts is not None and parts.face_analyzer is not None \
                and not any(key in options for key in ("face_model", "face_model_root",
                                                       "face_providers")):
            return parts.face_analyzer
        return self._analyzers.get(options)
