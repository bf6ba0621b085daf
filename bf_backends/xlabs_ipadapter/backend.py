"""The XLabs FLUX IP-Adapter backend, on diffusers' own FLUX IP-Adapter
(``pipe.load_ip_adapter`` of ``XLabs-AI/flux-ip-adapter``).

Lines (decisions in ``docs/backends/xlabs_ipadapter.md``):

* Baseline (method off): the caller's prompt with the image embeds exactly as
  ``pipe(prompt, ip_adapter_image=...)`` passes them, and with true CFG the stock order of
  calls, the conditional one (the image embeds) then the unconditional one (the negative
  embeds, a black image by default): the stock call bit for bit.
* ID line: ``P_id`` as text, the IP attention on at the caller's scales, with true CFG its
  own negative pass on the black-image negative embeds.
* Semantic line: the scene prompt, the IP output of every double block multiplied by 0
  for its rows (``state.RowMaskedIPProcessor``): bit for bit the plain transformer.
  ``BFConfig(semantic_adapters="on")`` keeps it on.
* ``T_id``: the image tokens the IP attention reads, 4 per image of width 4096; IdAP
  prepends their aggregate to the scene prompt's T5 tokens.

Every line active at a step runs in one transformer call, each row with its own line's
switch and its own person's image embeds (``LineIdentities``); a line whose positive and
negative embeds differ in image count (several photos, one black negative) runs its two
branches as two calls. The masked processors are installed when the session opens and the
original processor objects are put back when the call ends, also after an exception.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from bf_core.config import BFConfig
from bf_core.errors import ConfigError, UnsupportedPipelineError
from bf_core.hosts import flux
from bf_core.hosts.flux import FluxCall, FluxModel, FluxRowBatch, FluxSession
from bf_core.records import Branch, Identity, Line, LineConditioning
from bf_core.switching import row_mask

from .encoder import XLabsIdentityEncoder
from .state import RowSwitch, has_flux_ip_adapter, masked_processors

#: the lines whose rows run with the IP attention on (the semantic line's too when "on")
IDENTITY_LINES = (Line.ID, Line.BASELINE)


class XLabsIPAdapterSession(FluxSession):
    """One call on a FLUX pipeline with diffusers' IP-Adapter loaded."""

    def __init__(self, backend: Any, call: FluxCall, config: BFConfig):
        super().__init__(backend, call, config)
        if not has_flux_ip_adapter(self.pipe.transformer):
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} has no FLUX IP-Adapter "
                                           f"loaded: {backend.recognizes_description}")
        self.encoder = XLabsIdentityEncoder(self)
        self.switch: RowSwitch | None = None
        self._off = torch.zeros((), dtype=torch.bool)

    # -- state ---------------------------------------------------------------------------------
    def open(self, restore: ExitStack) -> None:
        self.switch = restore.enter_context(masked_processors(self.pipe.transformer))
        self._off = self._off.to(self.request.device)

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        # Every line's call reads image embeds: the semantic line's (the first person's) are
        # masked off, ID line j reads person j's (``line_identities``).
        self.line_identities.note(line, identity)
        return super().conditioning(line, identity)

    def _ip_on(self, line: Line) -> bool:
        return line in IDENTITY_LINES or self.config.semantic_adapters == "on"

    def negative_shareable(self) -> bool:
        # With the IP attention on for every line, all negative rows run the same model.
        return self.config.semantic_adapters == "on"

    def ip_rows(self, batch: FluxRowBatch) -> torch.Tensor | None:
        """The rows of ``batch`` that get the IP output: None for every row, a 0-dim False
        for none (one line off, any number of rows), else a (R,) bool mask."""
        lines = batch.lines
        if all(self._ip_on(line) for line in lines):
            return None
        if not any(self._ip_on(line) for line in lines):
            return self._off
        return row_mask(batch, IDENTITY_LINES) > 0

    # -- the image embeds of each row -----------------------------------------------------------
    def branch_embeds(self, part: FluxRowBatch, branch: Branch) -> list[torch.Tensor]:
        """Per adapter, the (R, m, E) embeds of one branch of a one-line batch: its person's
        negative embeds on the negative branch of a line with the IP on, else the positive
        ones (a line with the IP off reads them masked, so any of its shape does)."""
        identity = self.line_identities.of(part)
        if identity is None:
            raise ConfigError("no identity was encoded for this call; give id_images, "
                              "ip_adapter_image or ip_adapter_image_embeds.")
        state = identity.state
        if branch is Branch.UNCOND and self._ip_on(part.line):
            return state["negative_image_embeds"]
        return state["image_embeds"]

    def row_embeds(self, batch: FluxRowBatch) -> list[torch.Tensor] | None:
        """Per adapter, the embeds of every row of ``batch`` in row order, (rows, m, E); None
        when the rows' image counts m differ (one call cannot hold them)."""
        pieces = [self.branch_embeds(part, branch) for part in (batch.parts or (batch,))
                  for branch in part.branches]
        if any(len({tuple(p[a].shape) for p in pieces}) != 1 for a in range(len(pieces[0]))):
            return None
        return [torch.cat(rows) if len(rows) > 1 else rows[0] for rows in zip(*pieces, strict=True)]

    # -- one or several lines in one call --------------------------------------------------------
    def supports_row_batching(self, batch: FluxRowBatch) -> bool:
        """True when every row's embeds have the same image count (the IP attention of one
        call reads one token count); the IP output is switched per row exactly."""
        return self.row_embeds(batch) is not None

    def predict(self, batch: FluxRowBatch, model: FluxModel) -> torch.Tensor:
        with self.switch.rows(self.ip_rows(batch)):
            embeds = None if batch.line is Line.BASELINE else self.row_embeds(batch)
            if embeds is None and len(batch.branches) == 1:
                embeds = self.branch_embeds(batch, batch.branches[0])
            if embeds is not None:
                return model.run(batch, 0, batch.rows, joint={"ip_adapter_image_embeds": embeds})
            # The baseline with true CFG as the stock call runs it, and a line whose branches
            # differ in image count: the conditional call, then the unconditional one.
            return model.per_branch(batch, lambda branch: {
                "joint": {"ip_adapter_image_embeds": self.branch_embeds(batch, branch)}})


class XLabsIPAdapterBackend:
    """Identity from the XLabs FLUX IP-Adapter (CLIP image embeddings of reference photos)."""

    name = "xlabs_ipadapter"
    recognizes_description = (
        "a diffusers FluxPipeline with the XLabs IP-Adapter (XLabs-AI/flux-ip-adapter) loaded by "
        "pipe.load_ip_adapter; identity from id_images, ip_adapter_image or "
        "ip_adapter_image_embeds")
    priority = 20  # above DreamBooth, which serves FLUX pipelines without identity machinery
    default_id_prompt = "a person"
    hosts = (flux.HOST_NAME,)
    options = dict(flux.ID_LINE_OPTIONS)
    #: each ID line's rows read their own person's image embeds in the shared call
    max_people = 4

    def recognizes(self, pipe: Any) -> bool:
        return flux.is_flux_pipeline(pipe) and has_flux_ip_adapter(pipe.transformer)

    def open_session(self, call: FluxCall, config: BFConfig) -> XLabsIPAdapterSession:
        return XLabsIPAdapterSession(self, call, config)
