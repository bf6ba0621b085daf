"""The PuLID-FLUX backend: a diffusers FluxPipeline with PuLID-FLUX attached.

Set-up: ``bf_backends.pulid_flux.loader.attach_pulid_flux`` (also importable from here)
loads the official ``pulid_flux_v0.9.1.safetensors`` into our modules and leaves a
``PuLIDFluxAdapter`` at ``pipe.pulid_flux``; that attribute is how the backend recognises a
pipeline. The identity step is PuLID's own (``bf_backends.pulid``): its face features and
its IDFormer give T_id (1, 32, 2048), and the IDFormer on all-zero inputs the uncond ID.

Lines (docs/backends/pulid_flux.md), each row of a transformer call with its own ID weight:
- ID line: the ID cross-attention on, T_id on the conditional rows and the uncond ID on the
  negative rows with true CFG, prompt ``P_id``;
- semantic line: ID weight 0, so every hooked block returns its plain output for those rows
  (``semantic_adapters="on"`` keeps the ID on);
- baseline (method off): the official algorithm, the stock FluxPipeline call with the ID
  injected at steps i >= ``start_step``; without reference photos, plain FLUX.

IdAP does not apply (``idap_applicable = False``): T_id is 2048 wide and only ever read by
the cross-attention modules, never by the T5 text path. Both lines share one transformer
call per step (the rows' ID state is set per row).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch

from bf_backends.pulid.encoder import PuLIDIdentityEncoder, identity_embeddings
from bf_backends.pulid_flux.hooks import IdentityRun, PuLIDFluxState, install_block_hooks
from bf_backends.pulid_flux.loader import (
    PULID_FLUX_ATTRIBUTE,
    PuLIDFluxAdapter,
    attach_pulid_flux,
    detach_pulid_flux,
    load_pulid_flux,
    settings_for,
)
from bf_core.config import BFConfig
from bf_core.hosts import flux
from bf_core.hosts.flux import FluxCall, FluxModel, FluxRowBatch
from bf_core.records import Branch, Identity, Line, LineConditioning

#: Per-call keywords this backend understands (besides the pipeline's and the method's).
OPTIONS = {
    "id_weight": "weight w of the ID cross-attention, img + w CA(T_id, img) (default: the "
                 "attached one, 1.0)",
    "start_step": "first step index with the ID, the official start_step (default: the "
                  "attached one, 0); the ID line itself starts after M1",
    **flux.ID_LINE_OPTIONS,
}

#: T_id for the conditional rows and the uncond ID for the negative rows, (1, 32, 2048) each.
BranchTokens = dict[Branch, torch.Tensor]


class PuLIDFluxSession(flux.FluxSession):
    """One call: each person's T_id and uncond ID, and which rows of each transformer call
    get which. The semantic (or baseline) line has the first person's; ID line j person j's."""

    def __init__(self, backend: Any, call: FluxCall, config: BFConfig):
        super().__init__(backend, call, config)
        self.adapter: PuLIDFluxAdapter = getattr(self.pipe, PULID_FLUX_ATTRIBUTE)
        self.settings = settings_for(self.adapter.settings, self.request.backend_options)
        self.encoder = PuLIDIdentityEncoder(
            self.adapter, default_id_prompt=backend.default_id_prompt, id_mix=False,
            photos_required=config.enabled, device=self.request.device,
            dtype=self.pipe.transformer.dtype)
        self.state = PuLIDFluxState()
        self._tokens: dict[int, BranchTokens | None] = {}
        self._runs: dict[tuple, tuple[IdentityRun, ...]] = {}

    def open(self, restore: ExitStack) -> None:
        # Hooked once per call; between the calls of a step the hooks only read the state.
        hooks = install_block_hooks(self.pipe.transformer, self.adapter.cross_attention,
                                    self.adapter.positions, self.state)
        restore.callback(hooks.remove)

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        self.line_identities.note(line, identity)
        return super().conditioning(line, identity)

    def _id_off(self, line: Line) -> bool:
        return line is Line.SEMANTIC and self.config.semantic_adapters == "off"

    # -- the ID state of the rows of one transformer call ------------------------------------
    def branch_tokens(self, batch: FluxRowBatch) -> BranchTokens | None:
        """The tokens of a one-line batch's rows per CFG branch (its person's), in the
        cross-attention's dtype and device; None where its line has the ID off or its person
        has no photos."""
        if self._id_off(batch.line):
            return None
        identity = self.line_identities.of(batch)
        if identity is None:
            return None
        key = id(identity)
        if key not in self._tokens:
            embeddings = identity_embeddings(identity)
            like = self.adapter.cross_attention[0].to_q.weight
            self._tokens[key] = None if embeddings is None else {
                Branch.COND: embeddings[0].to(like), Branch.UNCOND: embeddings[1].to(like)}
        return self._tokens[key]

    def row_runs(self, batch: FluxRowBatch) -> tuple[IdentityRun, ...]:
        """The ID rows of ``batch`` (one line's, or several merged): per part, its rows of
        each branch, negative first, with that branch's tokens. Made once per row layout."""
        if not self.settings.injects_at(batch.step_index):
            return ()
        parts = batch.parts or (batch,)
        layout = tuple((part.line, part.line_index, part.branches, part.rows) for part in parts)
        if layout not in self._runs:
            self._runs[layout] = tuple(self._layout_runs(parts))
        return self._runs[layout]

    def _layout_runs(self, parts: tuple[FluxRowBatch, ...]) -> Iterator[IdentityRun]:
        start = 0
        for part in parts:
            tokens, size = self.branch_tokens(part), part.rows_per_branch
            for branch in part.branches:
                if tokens is not None:
                    yield IdentityRun(start, start + size, tokens[branch])
                start += size

    def predict(self, batch: FluxRowBatch, model: FluxModel) -> torch.Tensor:
        if batch.line is Line.BASELINE and len(batch.branches) == 2:
            return self._baseline_per_branch(batch, model)
        with self.state.using(self.row_runs(batch), self.settings.id_weight):
            return model(batch)

    def _baseline_per_branch(self, batch: FluxRowBatch, model: FluxModel) -> torch.Tensor:
        """The baseline with true CFG as the stock pipeline runs it, one call per branch,
        the conditional one first; each call's rows get their branch's tokens.
        ``per_branch`` asks for a call's keywords right before making it, so the state is
        set there."""
        tokens = (self.branch_tokens(batch) if self.settings.injects_at(batch.step_index)
                  else None)
        rows = batch.rows_per_branch

        def inputs_of(branch: Branch) -> dict[str, Any]:
            self.state.runs = () if tokens is None else (IdentityRun(0, rows, tokens[branch]),)
            return {}

        with self.state.using((), self.settings.id_weight):
            return model.per_branch(batch, inputs_of)

    # -- both lines in one transformer call ----------------------------------------------------
    def supports_row_batching(self, batch: FluxRowBatch) -> bool:
        """Semantic and ID rows share a call (each row's ID set by its run); the baseline is
        one line by definition."""
        return all(line in (Line.SEMANTIC, Line.ID) for line in batch.lines)

    def negative_shareable(self) -> bool:
        # Only with the ID kept on in the semantic line do both lines' negative rows run the
        # same model: the uncond ID is a constant of the checkpoint, the same for everyone.
        return self.config.semantic_adapters == "on"

    def preview_face_analyzer(self):
        """The face analyser of PuLID's features (antelopev2): ``region="auto"``'s detector;
        None (the library's default) for features without one."""
        return getattr(self.adapter.features, "analyzer", None)


class PuLIDFluxBackend:
    """PuLID-FLUX (v0.9.x) on a diffusers FluxPipeline prepared with ``attach_pulid_flux``."""

    name = "pulid_flux"
    recognizes_description = (
        "a diffusers FluxPipeline with PuLID-FLUX attached (bf_backends.pulid_flux.backend."
        "attach_pulid_flux(pipe, 'pulid_flux_v0.9.1.safetensors', features) sets "
        "pipe.pulid_flux)")
    priority = 30
    default_id_prompt = "a person"
    hosts = (flux.HOST_NAME,)
    options = OPTIONS
    #: each person's T_id goes to its own ID line's rows
    max_people = 4
    #: T_id (2048 wide) is read only by the ID cross-attention, never by the T5 text path
    idap_applicable = False

    def recognizes(self, pipe: Any) -> bool:
        adapter = getattr(pipe, PULID_FLUX_ATTRIBUTE, None)
        return flux.is_flux_pipeline(pipe) and isinstance(adapter, PuLIDFluxAdapter)

    def open_session(self, call: FluxCall, config: BFConfig) -> PuLIDFluxSession:
        return PuLIDFluxSession(self, call, config)


__all__ = ["OPTIONS", "PULID_FLUX_ATTRIBUTE", "PuLIDFluxAdapter", "PuLIDFluxBackend",
           "PuLIDFluxSession", "attach_pulid_flux",
           "detach_pulid_flux", "load_pulid_flux"]
