"""The InstantID backend: IdentityNet residuals + face IP attention as the ID line.

Lines (spec ``instantid.md``; decisions in ``docs/backends/instantid.md``):

* ID line (and the baseline): ``P_id`` (or, for the baseline, the user's prompt) as text,
  the 16 ID tokens in every cross-attention layer at the user's ``ip_adapter_scale``, and
  IdentityNet run on the ID tokens (never on text) with the keypoint image, its residuals
  scaled by ``controlnet_conditioning_scale`` and the start/end keep flag.
* Semantic line: every IP processor's scale at 0 and IdentityNet not called. diffusers'
  processors then skip the ID branch; the official ones multiply it by 0 (exact for finite
  values). ``BFConfig(semantic_adapters="on")`` keeps the ID attention on for the semantic
  line but still never runs IdentityNet there (its keypoints are the ID line's placement).
* ``T_id``: the 16 projected ID tokens (1, 16, D); negative: the projection of a zero
  embedding, the official negative branch.

Row batching (both lines in one UNet call, ``bf_core.hosts.sdxl.merge_row_batches``): the
processors run at the ID scale for the whole merged batch and the rows whose ID attention
is off get zero ID tokens; through the bias-free ``to_k_ip``/``to_v_ip`` these give zero keys and values, so
the ID branch adds exactly 0, the same as scale 0. IdentityNet runs on the ID rows only
(the very call the separate path makes) and the semantic rows get zero residuals
(x + 0 == x). The official form reads the ID tokens off the end of the context and cannot
take a padding mask, so it batches only when both lines' contexts have the same length.

Every processor scale and the UNet's projection slot are captured when the session opens
and put back when it closes, also after an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bf_backends.instantid.control import (
    check_kps_option,
    control_image_tensor,
    placed_keypoint_image,
    placed_keypoint_images,
    reference_keypoint_image,
    region_face_box,
)
from bf_backends.instantid.encoder import InstantIDEncoder, ReferenceFace
from bf_backends.instantid.keypoints import draw_kps
from bf_backends.instantid.loader import ID_TOKEN_COUNT, FaceAnalyzerCache, find_instantid_parts
from bf_backends.instantid.state import preserved_attention_state
from bf_core.config import BFConfig
from bf_core.errors import ConfigError, UnsupportedPipelineError
from bf_core.hosts.sdxl import HOST_NAME, ID_LINE_OPTIONS, SDXLSession, is_sdxl_pipeline
from bf_core.records import Identity, Line, LineConditioning, SemanticPreview
from bf_core.regions import region_bounds

if TYPE_CHECKING:
    from bf_core.hosts.sdxl import RowBatch, SDXLCall, SDXLModel

logger = logging.getLogger(__name__)

DEFAULT_CONDITIONING_SCALE = 0.8  # IdentityNet strength of infer.py and the demo

OPTIONS = {
    "kps": "'auto' (default), 'reference', 'none', (5, 2) keypoints or a keypoint image",
    "image": "the official pipeline's keypoint-image argument (same as kps=<image>)",
    "controlnet_conditioning_scale": "IdentityNet strength (default 0.8)",
    "control_guidance_start": "fraction of steps before IdentityNet starts (default 0)",
    "control_guidance_end": "fraction of steps after which IdentityNet stops (default 1)",
    "ip_adapter_scale": "ID attention strength for this call (default: the pipeline's)",
    "face_embeds": "(N, 512) raw antelopev2 embeddings instead of analysing id_images",
    "image_embeds": "the official pipeline's name for face_embeds",
    "face_analyzer": "a bf_core.faces.FaceAnalyzer (or any object with detect/embed)",
    "face_model": "insightface pack name or folder (default 'antelopev2')",
    "face_model_root": "insightface root folder",
    "face_providers": "onnxruntime execution providers",
    "face_policy": "'largest' (default), 'highest_score' or 'error' for several faces",
    **ID_LINE_OPTIONS,
}
_ALIASES = {"image": "kps", "image_embeds": "face_embeds"}


def normalise_options(options: dict[str, Any]) -> dict[str, Any]:
    """Map the official pipeline's option names to ours (the wrapper has already refused
    keywords that are no option at all)."""
    normalised = dict(options)
    for alias, name in _ALIASES.items():
        if alias in normalised:
            if name in normalised:
                raise ConfigError(f"give either {alias}= or {name}=, not both (they are the same).")
            normalised[name] = normalised.pop(alias)
    return normalised


class _PrecomputedImageTokens(torch.nn.Module):
    """Stands in for ``unet.encoder_hid_proj`` during a call: passes the tokens through.

    The backend projects the face embedding once per call (the tokens IdentityNet reads
    too) and hands the UNet the result as ``image_embeds``; diffusers' processors receive
    exactly those tokens instead of a second, batch-dependent projection.
    """

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        return image_embeds


class InstantIDSession(SDXLSession):
    """One call on an InstantID pipeline: lines, IdentityNet, keypoints, restore.

    Each person's identity reaches the session through ``conditioning`` and is kept per
    line (``line_identities``) for ``predict``: ID line j's rows get person j's tokens in
    the ID attention and IdentityNet, and person j's keypoints in their region.
    """

    def __init__(self, backend: InstantIDBackend, call: SDXLCall, config: BFConfig):
        super().__init__(backend, call, config)
        parts = find_instantid_parts(self.pipe)
        if parts is None:
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} is not set up for "
                                           f"InstantID: {backend.recognizes_description}")
        self.parts = parts
        self.options = normalise_options(self.request.backend_options)
        self.kps = check_kps_option(self.options.get("kps", "auto"))
        self.conditioning_scale = float(self.options.get("controlnet_conditioning_scale",
                                                         DEFAULT_CONDITIONING_SCALE))
        self.guidance_window = (float(self.options.get("control_guidance_start", 0.0)),
                                float(self.options.get("control_guidance_end", 1.0)))
        if not 0.0 <= self.guidance_window[0] < self.guidance_window[1] <= 1.0:
            raise ConfigError("control_guidance_start/end must satisfy 0 <= start < end <= 1, got "
                              f"{self.guidance_window}.")
        self.encoder = InstantIDEncoder(self)
        self.id_scales: list = []
        self._control_cache: dict[Any, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._preview: SemanticPreview | None = None

    # -- state -----------------------------------------------------------------------------
    def open(self, restore: ExitStack) -> None:
        unet = self.pipe.unet
        restore.enter_context(preserved_attention_state(unet))
        given = self.options.get("ip_adapter_scale")
        for proc in self.parts.ip_processors:
            if given is None:
                self.id_scales.append(list(proc.scale) if isinstance(proc.scale, list) else proc.scale)
            else:
                self.id_scales.append([float(given)] * len(proc.scale)
                                      if isinstance(proc.scale, list) else float(given))
        if self.parts.form == "native":
            unet.encoder_hid_proj = _PrecomputedImageTokens()

    def _set_scales(self, identity_on: bool) -> None:
        for proc, scale in zip(self.parts.ip_processors, self.id_scales, strict=True):
            if identity_on:
                proc.scale = list(scale) if isinstance(scale, list) else scale
            else:
                proc.scale = [0.0] * len(scale) if isinstance(scale, list) else 0.0

    def _attention_on(self, line: Line) -> bool:
        return line is not Line.SEMANTIC or self.config.semantic_adapters == "on"

    def supports_row_batching(self, batch: RowBatch) -> bool:
        """Native form: always (padding is masked). Official form: only for equal context
        lengths, since its processors take the last 16 context tokens as ID tokens and apply
        the attention mask to the whole context, so a padding mask cannot be made exact.
        """
        if self.parts.form == "native":
            return True
        return len({part.encoder_hidden_states.shape[1] for part in batch.parts}) == 1

    # -- identity ----------------------------------------------------------------------------
    def reference_analyzer(self):
        return self.backend.face_analyzer(self.options)

    def preview_face_analyzer(self):
        """The detector the step-M1 preview is searched with by default: the reference one."""
        return self.reference_analyzer()

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        self.line_identities.note(line, identity)
        needs_kps = isinstance(self.kps, str) and self.kps == "auto" and line is not Line.BASELINE
        if needs_kps and identity.state["reference"].kps is None:
            raise ConfigError("kps='auto' moves the reference face's keypoints, but only "
                              "face_embeds were given: pass id_images too, or choose "
                              "kps='none' or your own (5, 2) keypoints.")
        return super().conditioning(line, identity)

    def observe_preview(self, preview: SemanticPreview) -> None:
        """Kept for the ID lines' keypoint images (kps='auto', and 'reference' with regions)."""
        self._preview = preview

    def _tokens(self, batch: RowBatch, identity_on: bool) -> torch.Tensor:
        """ID tokens for the batch's rows, blocked like the text: [neg x R; pos x R]."""
        unet = self.pipe.unet
        if not identity_on:
            return torch.zeros(batch.rows, ID_TOKEN_COUNT, unet.config.cross_attention_dim,
                               dtype=batch.encoder_hidden_states.dtype,
                               device=batch.encoder_hidden_states.device)
        identity = self.line_identities.of(batch)
        blocks = []
        for branch in batch.branches:
            tokens = identity.negative_tokens if branch == "uncond" else identity.tokens
            blocks.append(tokens.expand(batch.rows_per_branch, -1, -1))
        return torch.cat(blocks).to(batch.encoder_hidden_states.device)

    # -- IdentityNet ---------------------------------------------------------------------------
    def _keep(self, step: int) -> float:
        """The official start/end keep flag of step ``step`` (0 or 1)."""
        total = self.pipe.num_timesteps
        start, end = self.guidance_window
        return 0.0 if step / total < start or (step + 1) / total > end else 1.0

    def _fixed_control(self, key: str, image) -> tuple[torch.Tensor, None]:
        if key not in self._control_cache:
            tensor = control_image_tensor(self.pipe, image, self.request.height, self.request.width)
            self._control_cache[key] = (tensor, None)
        return self._control_cache[key]

    def _row_control(self, key: Any, make_images: Callable[[], Sequence[Any]]):
        """Per-row keypoint images (made by ``make_images``, once per key) -> (R, 3, H, W) and
        an (R,) keep mask (None when every row has one), or (None, None) when none has one."""
        if key not in self._control_cache:
            images = make_images()
            if all(image is None for image in images):
                self._control_cache[key] = (None, None)
            else:
                height, width = self.request.height, self.request.width
                tensors = [torch.zeros(1, 3, height, width) if image is None
                           else control_image_tensor(self.pipe, image, height, width)
                           for image in images]
                keep = [image is not None for image in images]  # decided in Python: no host read
                mask = None if all(keep) else torch.tensor(keep, dtype=torch.float32)
                self._control_cache[key] = (torch.cat(tensors), mask)
        return self._control_cache[key]

    def _auto_images(self, person: int, reference: ReferenceFace, step: int) -> list:
        """kps='auto': person ``person``'s keypoints in their face of the step-M1 preview."""
        rows, size = self.request.num_rows, (self.request.width, self.request.height)
        faces = None if self._preview is None else self._preview.person_faces()
        if faces is None:
            logger.warning("kps='auto': no x0 estimate of step %d is available (scheduler "
                           "without alphas_cumprod?); IdentityNet is off for this call.", step - 1)
            return [None] * rows
        many = len(faces[0]) > 1
        return placed_keypoint_images(reference, [row[person] for row in faces], size,
                                      self._preview.step, person if many else None)

    def _reference_images(self, person: int, reference: ReferenceFace) -> list:
        """kps='reference': the official drawing, or with a region the reference keypoints
        in the face that region implies (``region_face_box``), per output image."""
        regions = self._preview.regions if self._preview is not None else []
        region = regions[person] if person < len(regions) else None
        if region is None:
            return [reference_keypoint_image(reference)]  # the same for every row
        size = (self.request.width, self.request.height)
        return [placed_keypoint_image(reference, region_face_box(
            region_bounds(region, row), size, self.config.auto_region_scale), size)
            for row in range(self.request.num_rows)]

    def _control(self, batch: RowBatch):
        """The batch's keypoint image per row (R, 3, H, W) and row mask, or (None, None)."""
        mode = self.kps
        if isinstance(mode, str) and mode == "auto" and batch.line is Line.BASELINE:
            mode = "reference"  # the baseline is the official method
        if isinstance(mode, str):
            if mode == "none":
                return None, None
            person = max(batch.line_index - 1, 0) if batch.line is Line.ID else 0
            reference = self.line_identities.of(batch).state["reference"]
            if reference.kps is None:
                reference_keypoint_image(reference)  # names the missing keypoints
            if mode == "reference":
                return self._row_control(("reference", person),
                                         lambda: self._reference_images(person, reference))
            return self._row_control(("auto", person), lambda: self._auto_images(
                person, reference, batch.step_index))
        if hasattr(mode, "convert"):
            return self._row_control("image", lambda: [mode])
        return self._row_control("points", lambda: [draw_kps(
            (self.request.width, self.request.height), mode)])

    def _identitynet_residuals(self, batch: RowBatch, tokens: torch.Tensor) -> dict[str, Any]:
        """IdentityNet on the ID tokens and the keypoint image; {} when it is off."""
        scale = self.conditioning_scale * self._keep(batch.step_index)
        if scale == 0.0:
            return {}
        control, mask = self._control(batch)
        if control is None:
            return {}
        per_branch = batch.rows_per_branch
        controlnet = self.parts.controlnet
        if control.shape[0] != per_branch:
            control = control.expand(per_branch, -1, -1, -1)
        control = torch.cat([control] * len(batch.branches)).to(batch.sample.device,
                                                                 controlnet.dtype)
        down, mid = controlnet(
            batch.sample, batch.timestep, encoder_hidden_states=tokens, controlnet_cond=control,
            conditioning_scale=scale, guess_mode=False,
            added_cond_kwargs={"text_embeds": batch.text_embeds, "time_ids": batch.time_ids},
            return_dict=False)
        if mask is not None:  # images whose preview showed no face get no residuals
            rows = torch.cat([mask] * len(batch.branches)).to(mid.device, mid.dtype)
            down = [residual * rows.view(-1, 1, 1, 1) for residual in down]
            mid = mid * rows.view(-1, 1, 1, 1)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # -- the UNet call ---------------------------------------------------------------------------
    def _merged_residuals(self, parts: Sequence[RowBatch],
                          tokens: Sequence[torch.Tensor]) -> dict[str, Any]:
        """IdentityNet residuals for the rows of ``parts``, in order; {} when no part has any.

        Each ID part's residuals come from its own IdentityNet call (exactly what a separate
        call computes); every other part gets zeros, which the UNet adds as x + 0 == x.
        """
        per_part = [{} if part.line is Line.SEMANTIC
                    else self._identitynet_residuals(part, part_tokens)
                    for part, part_tokens in zip(parts, tokens, strict=True)]
        template = next((residuals for residuals in per_part if residuals), None)
        if template is None:
            return {}
        if len(parts) == 1:
            return template

        def zeros_like_rows(residual: torch.Tensor, rows: int) -> torch.Tensor:
            return residual.new_zeros(rows, *residual.shape[1:])

        filled = [residuals or {
            "down_block_additional_residuals": [
                zeros_like_rows(r, part.rows) for r in template["down_block_additional_residuals"]],
            "mid_block_additional_residual": zeros_like_rows(
                template["mid_block_additional_residual"], part.rows),
        } for part, residuals in zip(parts, per_part, strict=True)]
        down = [torch.cat(level) for level in zip(
            *(r["down_block_additional_residuals"] for r in filled), strict=True)]
        mid = torch.cat([r["mid_block_additional_residual"] for r in filled])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def predict(self, batch: RowBatch, model: SDXLModel) -> torch.Tensor:
        """One UNet call for a line's batch or a merged batch (``batch.parts``, one per line).

        The processors run at the ID scale when any row needs the ID attention; the off rows
        are switched by their zero ID tokens, IdentityNet by zero residuals. Scales are plain
        state restored when the session closes, also after an exception.
        """
        parts = batch.parts or (batch,)
        self._set_scales(any(self._attention_on(line) for line in batch.lines))
        part_tokens = [self._tokens(part, self._attention_on(part.line)) for part in parts]
        residuals = self._merged_residuals(parts, part_tokens)
        tokens = torch.cat(part_tokens) if len(part_tokens) > 1 else part_tokens[0]
        if self.parts.form == "native":
            return model(batch, added_cond={"image_embeds": [tokens[:, None]]}, **residuals)
        # The official processors read the last 16 context tokens as ID tokens; a merged
        # batch has no padding mask here (supports_row_batching).
        context = batch.encoder_hidden_states
        return model(batch, context=torch.cat([context, tokens.to(context.dtype)], dim=1),
                     **residuals)


class InstantIDBackend:
    """InstantID: antelopev2 face embedding -> 16 ID tokens, IP attention and IdentityNet."""

    name = "instantid"
    recognizes_description = (
        "a diffusers SDXL ControlNet pipeline with IdentityNet as its ControlNet and the "
        "InstantID ip-adapter.bin loaded (load_instantid_pipeline), or an official "
        "StableDiffusionXLInstantIDPipeline after load_ip_adapter_instantid")
    priority = 30  # above IP-Adapter: an InstantID UNet also carries IP-Adapter processors
    default_id_prompt = "a person"
    hosts = (HOST_NAME,)
    options = OPTIONS
    max_people = 4

    def __init__(self) -> None:
        self._analyzers = FaceAnalyzerCache()

    def recognizes(self, pipe: Any) -> bool:
        if not is_sdxl_pipeline(pipe):
            return False
        try:
            return find_instantid_parts(pipe) is not None
        except ConfigError:  # InstantID-shaped but with extra ControlNets: say so at call time
            return True

    def open_session(self, call: SDXLCall, config: BFConfig) -> InstantIDSession:
        return InstantIDSession(self, call, config)

    def face_analyzer(self, options: dict[str, Any]):
        """The reference-photo analyser for these options, built once per backend."""
        if options.get("face_analyzer") is not None:
            return options["face_analyzer"]
        return self._analyzers.get(options)

    def refine_options(self, crop: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The face-refine pass's IdentityNet input: the keypoints found again in the
        upscaled crop (``crop``, a PIL image); none found: ``kps="none"``, the ID adapter
        alone, and a log line saying so."""
        faces = self.face_analyzer(options).detect(crop)
        if not faces:
            logger.warning("face refine: no face found in the upscaled crop; IdentityNet is off "
                           "for this face (the ID adapter alone)")
            return {"kps": "none"}
        largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        return {"kps": np.asarray(largest.kps, dtype=np.float32)}


# -- the benchmark's view (BackendExtras) ------------------------------------------------------
def benchmark_call_kwargs(identity: Any, images: list) -> dict[str, Any]:
    """The photos, and ``id_prompt`` when the identity sets one (its InstantID option, else
    its shared one). A pipeline's own face analyser comes with its set-up's options."""
    kwargs: dict[str, Any] = {"id_images": images}
    id_prompt = identity.option(InstantIDBackend.name, "id_prompt", identity.id_prompt)
    if id_prompt:
        kwargs["id_prompt"] = id_prompt
    return kwargs
