"""The one denoising loop of the project: a list of lines, fused by IdAF, over any host.

The lines are the semantic line (the scene prompt; the baseline line with the method off)
and one ID line per person. Per step ``i``:

1. every active line's rows are evaluated, in one merged model call where the backend can
   switch its machinery per row, else one call per line; ID lines are active at ``i > M1``
   only, and the semantic line carries the IdAP tokens at ``i > M2``;
2. each line's prediction is guided (CFG); with ID lines active, IdAF fuses them;
3. the host's scheduler takes one step on the result.

The loop knows lines, not base models or identity methods: the host (``bf_core.hosts``)
owns the model call, guidance, the scheduler and decoding, and the backend session owns
each line's conditioning and machinery.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from bf_core.aggregation import (
    idap_aggregate,
    idap_prepend,
    idap_query,
    idap_selection,
    load_idap_query,
)
from bf_core.config import BFConfig, IdAFConfig
from bf_core.errors import ConfigError
from bf_core.finite import FiniteWatch
from bf_core.fusion import cfg_delta_saliency, fuse_lines
from bf_core.hosts import HostCall, LineInputs, RowBatchLike, Step
from bf_core.protocols import BackendSession, idap_applicable, preview_face_detector
from bf_core.records import (
    Identity,
    Line,
    LineConditioning,
    LoopRecord,
    Person,
    SemanticPreview,
)
from bf_core.regions import auto_regions, latent_regions


@dataclass(frozen=True)
class NegativeSharing:
    """Whether an ID line reuses the semantic line's negative rows, before and after IdAP."""

    before_idap: bool = False
    after_idap: bool = False


@dataclass
class PlannedLine:
    """One line of the call, with its conditioning fixed before the first step.

    inputs: the host's CFG-stacked model inputs; inputs_with_idap: the semantic line's with
    the IdAP tokens prepended (None when IdAP is off); after_step: the line runs at steps
    ``i > after_step`` (-1: every step); negative: the ID lines' negative sharing.
    """

    line: Line
    inputs: LineInputs
    inputs_with_idap: LineInputs | None = None
    after_step: int = -1
    negative: NegativeSharing = NegativeSharing()


@dataclass
class LinePlan:
    """Every line of the call, semantic line first, and the thresholds M1 and M2."""

    lines: list[PlannedLine]
    idaf_start: int = 0
    idap_start: int = 0
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: each person's region as given (``bf_core.regions``), one per ID line
    regions: list[Any] = field(default_factory=list)
    _grid_regions: dict[tuple, list[torch.Tensor | None] | None] = field(default_factory=dict)

    def region_masks(self, height: int, width: int, device: torch.device
                     ) -> list[torch.Tensor | None] | None:
        """The ID lines' regions on the (height, width) latent grid, made once per call;
        None when every region is the whole frame."""
        key = (height, width, str(device))
        if key not in self._grid_regions:
            masks = latent_regions(self.regions, height, width)
            self._grid_regions[key] = None if masks is None else [
                None if mask is None else mask.to(device) for mask in masks]
        return self._grid_regions[key]

    @property
    def has_auto_regions(self) -> bool:
        return any(isinstance(region, str) for region in self.regions)

    def resolve_auto_regions(self, preview: SemanticPreview, config: BFConfig) -> list:
        """Replace each ``"auto"`` region by the one found in ``preview`` (once, at step
        M1); returns per image per person the face box used (pixels) or None."""
        faces = preview.faces()
        images = preview.images()
        size = images[0].size if images else (1, 1)
        boxes = None if faces is None else [[face.bbox for face in found] for found in faces]
        self.regions, used = auto_regions(self.regions, boxes, size, config.auto_region_scale,
                                          config.auto_region_fallback, preview.step)
        self._grid_regions.clear()
        return used

    def drop_unresolved_auto_regions(self) -> None:
        """An ``"auto"`` region still unresolved at the end (no ID line ran) is reported as
        None: nothing was looked for."""
        if self.has_auto_regions:
            self.regions = [None if isinstance(r, str) else r for r in self.regions]
            self._grid_regions.clear()

    @property
    def semantic(self) -> PlannedLine:
        return self.lines[0]

    @property
    def has_id_lines(self) -> bool:
        return len(self.lines) > 1

    @property
    def line_names(self) -> list[str]:
        """How each line is named in messages: "semantic line", "ID line" (2, 3 ... when
        there are several)."""
        ids = len(self.lines) - 1
        return [f"{self.semantic.line.value} line"] + [
            "ID line" if ids == 1 else f"ID line {j}" for j in range(1, ids + 1)]

    def idap_on(self, i: int) -> bool:
        return self.semantic.inputs_with_idap is not None and i > self.idap_start


@dataclass(frozen=True)
class ActiveLine:
    """A line as it runs at one step: its inputs then, and whether it reuses the semantic
    line's negative rows (then only its positive rows are evaluated)."""

    line: Line
    inputs: LineInputs
    shares_negative: bool = False
    index: int = 0  # its place in the plan's lines


@dataclass
class Guided:
    """A line's predictions at one step: the guided one, and the CFG branches it came from
    (``uncond`` is None without CFG)."""

    noise: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None


# -- IdAP ---------------------------------------------------------------------------------------
def match_rows(tokens: torch.Tensor, rows: int, num_images_per_prompt: int, what: str) -> torch.Tensor:
    """Broadcast (B_id, N, D) identity tokens to the R = B * n rows of the batch."""
    if tokens.shape[0] == rows:
        return tokens
    if tokens.shape[0] == 1:
        return tokens.expand(rows, *tokens.shape[1:])
    if tokens.shape[0] * num_images_per_prompt == rows:
        return tokens.repeat_interleave(num_images_per_prompt, dim=0)
    raise ConfigError(f"{what} has batch {tokens.shape[0]}; expected 1, the number of prompts, "
                      f"or {rows} (prompts x images per prompt)")


def idap_conditioning(cond: LineConditioning, identities: Sequence[Identity], config: BFConfig,
                      rows: int, num_images_per_prompt: int) -> tuple[LineConditioning, torch.Tensor]:
    """The semantic line's conditioning with every person's K aggregated ID tokens
    prepended, in the order the people were given (eq. 12): N*K + L tokens.

    Returns the new conditioning and the IdAP token selection (R, N*K) for diagnostics.
    """
    idap = config.idap
    dim = identities[0].tokens.shape[-1]
    if any(identity.tokens.shape[-1] != cond.prompt_embeds.shape[-1] for identity in identities):
        raise ConfigError(f"IdAP: the backend's ID tokens have width D={dim} but the scene prompt's "
                          f"tokens have D={cond.prompt_embeds.shape[-1]}; T_id must live in the "
                          "model's text-token space")
    query = (load_idap_query(idap.query_file, idap.num_tokens, dim) if idap.query_file
             else idap_query(idap.num_tokens, dim, idap.seed))
    t_ids = [match_rows(identity.tokens, rows, num_images_per_prompt, "Identity.tokens")
             for identity in identities]
    pooled = [idap_aggregate(t_id, query, idap.temperature) for t_id in t_ids]
    positive = idap_prepend(torch.cat(pooled, dim=1), cond.prompt_embeds)
    negative = None
    if cond.negative_prompt_embeds is not None:
        negatives = [idap_negative_tokens(identity, query, config, rows, num_images_per_prompt,
                                          tokens) for identity, tokens in zip(identities, pooled,
                                                                              strict=True)]
        negative = idap_prepend(torch.cat(negatives, dim=1), cond.negative_prompt_embeds)
    selection = torch.cat([idap_selection(t_id, query, idap.temperature) for t_id in t_ids], dim=1)
    prepended = positive.shape[1] - cond.prompt_embeds.shape[1]
    return LineConditioning(positive, cond.pooled, negative, cond.negative_pooled,
                            trailing_padding=cond.trailing_padding,
                            prepended_tokens=prepended), selection


def idap_negative_tokens(identity: Identity, query: torch.Tensor, config: BFConfig, rows: int,
                         num_images_per_prompt: int, positive: torch.Tensor) -> torch.Tensor:
    """The K tokens the negative branch gets: the aggregation of the ID line's negative
    tokens (``"aggregate"``) or zeros."""
    idap = config.idap
    if idap.negative == "aggregate" and identity.negative_tokens is not None:
        t_neg = match_rows(identity.negative_tokens, rows, num_images_per_prompt,
                           "Identity.negative_tokens")
        return idap_aggregate(t_neg, query, idap.temperature)
    if idap.negative == "aggregate":
        warnings.warn("the backend gave no negative ID tokens; IdAP pads the negative "
                      "branch with K zero tokens", stacklevel=4)
    return torch.zeros_like(positive[:, : idap.num_tokens])


# -- the plan -----------------------------------------------------------------------------------
_IDAP_WARNED: set[str] = set()


def warn_idap_not_applicable(backend: str) -> None:
    """Once per backend and process: IdAP is skipped because the backend's ID tokens do not
    live in the model's text-token space."""
    if backend not in _IDAP_WARNED:
        _IDAP_WARNED.add(backend)
        warnings.warn(f"IdAP does not apply to the {backend} backend (its ID tokens are not in "
                      "the model's text-token space); the semantic line runs without it. "
                      "BFConfig(use_idap=False) says so explicitly.", stacklevel=4)


def plan_lines(host: HostCall, session: BackendSession, identities: Sequence[Identity],
               config: BFConfig) -> LinePlan:
    """Every line's model inputs, fixed once: the semantic line (with its IdAP variant) and
    one ID line per person, and which negatives may be shared."""
    semantic_line = Line.SEMANTIC if config.enabled else Line.BASELINE
    semantic_cond = session.conditioning(semantic_line, identities[0])
    num_steps = host.prepare(semantic_cond)
    plan = LinePlan([PlannedLine(semantic_line, host.line_inputs(semantic_cond))])
    if not config.enabled:
        return plan
    rounding = getattr(host, "threshold_rounding", "nearest")
    plan.idaf_start, plan.idap_start = config.thresholds(num_steps, rounding)
    plan.diagnostics.update(idaf_start=plan.idaf_start, idap_start=plan.idap_start)
    if config.use_idap and not idap_applicable(session.backend):
        warn_idap_not_applicable(session.backend.name)
        plan.diagnostics["idap"] = "not applicable"
    elif config.use_idap and config.idap_people == "all":
        request = host.request
        with_idap, selection = idap_conditioning(semantic_cond, identities, config,
                                                 request.num_rows, request.num_images_per_prompt)
        plan.semantic.inputs_with_idap = host.line_inputs(with_idap)
        plan.diagnostics["idap_selection"] = selection.cpu()
    if config.use_idaf:
        shareable = (config.share_negative and host.request.do_cfg
                     and session.negative_shareable())
        for identity in identities:
            plan.lines.append(id_line(host, session, plan, identity, shareable))
    return plan


def id_line(host: HostCall, session: BackendSession, plan: LinePlan, identity: Identity,
            shareable: bool) -> PlannedLine:
    """One person's ID line, running at steps i > M1."""
    inputs = host.line_inputs(session.conditioning(Line.ID, identity))
    semantic = plan.semantic
    negative = NegativeSharing(
        before_idap=shareable and host.same_negative(semantic.inputs, inputs),
        after_idap=(shareable and semantic.inputs_with_idap is not None
                    and host.same_negative(semantic.inputs_with_idap, inputs)))
    return PlannedLine(Line.ID, inputs, after_step=plan.idaf_start, negative=negative)


def active_lines(plan: LinePlan, i: int, cfg: bool) -> list[ActiveLine]:
    """The lines that run at step ``i``, semantic line first."""
    idap_on = plan.idap_on(i)
    semantic = plan.semantic
    active = [ActiveLine(semantic.line,
                         semantic.inputs_with_idap if idap_on else semantic.inputs)]
    for index, planned in enumerate(plan.lines[1:], start=1):
        if i > planned.after_step:
            shares = cfg and (planned.negative.after_idap if idap_on
                              else planned.negative.before_idap)
            active.append(ActiveLine(planned.line, planned.inputs, shares, index))
    return active


# -- one step -----------------------------------------------------------------------------------
def evaluate(host: HostCall, session: BackendSession, batches: list[RowBatchLike],
             batch_lines: bool) -> tuple[list[torch.Tensor], int]:
    """Each batch's raw model output, and the number of model calls that made them: one
    merged, row-masked call when the backend can switch its machinery per row."""
    if batch_lines and len(batches) > 1:
        merged = host.merge(batches)  # None: the host cannot hold these rows in one call
        if merged is not None and session.supports_row_batching(merged):
            return host.split(session.predict(merged, host.model), merged), 1
    return [session.predict(batch, host.model) for batch in batches], len(batches)


def guide_lines(host: HostCall, lines: Sequence[ActiveLine], outputs: Sequence[torch.Tensor],
                cfg: bool) -> list[Guided]:
    """Every line's guided prediction; a line sharing the negative uses the semantic one's."""
    guided: list[Guided] = []
    for active, output in zip(lines, outputs, strict=True):
        if active.shares_negative:
            uncond, cond = guided[0].uncond, output
        else:
            uncond, cond = host.cfg_branches(output, cfg)
        guided.append(Guided(host.guide(cond, uncond), cond, uncond))
    return guided


def fuse(host: HostCall, config: IdAFConfig, guided: Sequence[Guided], plan: LinePlan,
         batches: Sequence[RowBatchLike] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's noise: the semantic line's, fused by IdAF with the ID lines' when they run,
    each ID line competing only inside its person's region.
    Returns (noise, winner), winner (N, 1, H, W) int64 (0 semantic, j person j) or None."""
    if len(guided) == 1:
        return guided[0].noise, None
    layout = host.fusion_layout
    semantic = layout(guided[0].noise)
    regions = plan.region_masks(*semantic.shape[-2:], semantic.device)
    saliency: dict[str, Any] = {}
    if config.saliency == "cfg_delta":
        scale, reference = host.guidance_scale, guided[0].uncond
        deltas = [layout(cfg_delta_saliency(g.cond, reference, scale)) for g in guided]
        saliency = {"saliency_sem": deltas[0], "saliency_ids": deltas[1:]}
    elif config.saliency == "x0":
        saliency = x0_saliency(host, guided, batches)
    fused, winner = fuse_lines(semantic, [layout(g.noise) for g in guided[1:]],
                               config, regions=regions, **saliency)
    return host.from_fusion_layout(fused), winner


def x0_saliency(host: HostCall, guided: Sequence[Guided], batches: Sequence[RowBatchLike]
                ) -> dict[str, Any]:
    """The ``"x0"`` saliency source: each line's clean-latent estimate (fusion layout)."""
    estimates = [host.x0_estimate(batch, line.noise)
                 for batch, line in zip(batches, guided, strict=True)]
    if any(estimate is None for estimate in estimates):
        raise ConfigError("IdAFConfig(saliency='x0') needs a scheduler that gives an x0 "
                          "estimate (one with alphas_cumprod, or FLUX's flow matching); use "
                          "saliency='guided'")
    return {"saliency_sem": estimates[0].to(guided[0].noise.dtype),
            "saliency_ids": [e.to(guided[0].noise.dtype) for e in estimates[1:]]}


def observe_preview(session: BackendSession, plan: LinePlan, config: BFConfig,
                    preview: SemanticPreview, record: LoopRecord) -> None:
    """At step M1: resolve the ``"auto"`` regions from the preview's faces, then show the
    preview (with the regions in use) to the backend session."""
    if plan.has_auto_regions:
        preview.auto_faces = plan.resolve_auto_regions(preview, config)
        record.diagnostics["auto_faces"] = preview.auto_faces
    preview.regions = list(plan.regions)
    session.observe_preview(preview)


def step_noise(host: HostCall, session: BackendSession, plan: LinePlan, config: BFConfig,
               step: Step, latents: torch.Tensor, record: LoopRecord,
               watch: FiniteWatch, detector: Any = None) -> torch.Tensor:
    """Evaluate, guide and fuse the lines active at ``step``; every line's guided prediction
    goes to the finiteness watch."""
    cfg = host.cfg_active()  # a callback may switch CFG off mid-run
    lines = active_lines(plan, step.index, cfg)
    sample = host.model_input(latents, step, cfg)
    batches = [host.rows(active.line, active.inputs, sample, step, cfg,
                         shares_negative=active.shares_negative, line_index=active.index)
               for active in lines]
    outputs, calls = evaluate(host, session, batches, config.batch_lines)
    record.diagnostics["model_calls"] += calls
    record.diagnostics["model_rows"] += sum(batch.rows for batch in batches)
    guided = guide_lines(host, lines, outputs, cfg)
    for active, prediction in zip(lines, guided, strict=True):
        watch.observe(step.index, active.index, prediction.noise)
    noise, winner = fuse(host, config.idaf, guided, plan, batches)
    if winner is not None and record.keep_maps:
        record.fusion_maps.append((winner > 0).cpu())
        record.fusion_lines.append(winner.to(torch.int8).cpu())
        record.fusion_steps.append(step.index)
    if plan.has_id_lines and step.index == plan.idaf_start:
        semantic_rows = batches[0]
        preview = SemanticPreview(step.index, lambda: host.x0_estimate(semantic_rows, noise),
                                  host.preview_images, detector)
        observe_preview(session, plan, config, preview, record)
    return noise


def denoise(host: HostCall, session: BackendSession, plan: LinePlan, config: BFConfig,
            record: LoopRecord, detector: Any = None) -> torch.Tensor:
    """The loop over the host's steps; returns the final latents, checked for finiteness."""
    latents = host.initial_latents()
    if plan.has_id_lines and not plan.has_auto_regions:
        # Given boxes and masks go on the grid now: a bad one is named before the first
        # step, and the loop builds (and checks) no grid on the host.
        grid = host.fusion_layout(latents)
        plan.region_masks(*grid.shape[-2:], grid.device)
    watch = FiniteWatch(plan.line_names)
    last = -1
    with host.progress() as progress:
        for step in host.steps():
            if host.interrupted():
                continue
            noise = step_noise(host, session, plan, config, step, latents, record, watch,
                               detector)
            latents = host.scheduler_step(noise, step, latents)
            latents = host.end_of_step(step, latents, progress)
            watch.check(step.index)
            last = step.index
    watch.finish(last, latents)
    return latents


def run(host: HostCall, session: BackendSession, config: BFConfig, people: Sequence[Person],
        keep_maps: bool = False, preview_face_analyzer: Any = None
        ) -> tuple[torch.Tensor, LoopRecord]:
    """One wrapped generation: the session opens (registering its restores), encodes each
    person, the lines are planned and denoised. Returns the final latents and the record;
    every piece of pipeline state the session touched is back when it returns or raises.

    preview_face_analyzer: the detector ``region="auto"`` and placement options run on the
    step-M1 preview; None takes the session's (``protocols.preview_face_detector``)."""
    record = LoopRecord(keep_maps, diagnostics={"enabled": config.enabled, "model_calls": 0,
                                                "model_rows": 0})
    with ExitStack() as restore:
        session.open(restore)
        identities = [session.encoder.encode(person) for person in people]
        plan = plan_lines(host, session, identities, config)
        plan.regions = [person.region for person in people]
        record.diagnostics.update(plan.diagnostics)
        detector = preview_face_detector(session, preview_face_analyzer)
        latents = denoise(host, session, plan, config, record, detector)
    if keep_maps:
        record.diagnostics["fusion_steps"] = record.fusion_steps
    record.regions = regions_in_use(plan, host.fusion_layout(latents))
    return latents, record


def regions_in_use(plan: LinePlan, latents: torch.Tensor) -> list[torch.Tensor | None]:
    """Each person's region as the fusion used it, (R, h, w) bool on CPU, or None for the
    whole frame (and for an ``"auto"`` region no ID line ever ran to resolve). ``latents``:
    the final latents in the fusion layout (R, C, h, w)."""
    plan.drop_unresolved_auto_regions()
    rows = latents.shape[0]
    masks = plan.region_masks(*latents.shape[-2:], latents.device)  # the fusion's, cached
    return [None if mask is None else mask[:, 0].expand(rows, -1, -1).cpu()
            for mask in (masks or [None] * len(plan.regions))]
