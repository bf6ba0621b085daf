"""The PuLID backend: a diffusers SDXL pipeline with PuLID's ID attention attached.

Set-up: ``bf_backends.pulid.loader.attach_pulid`` (also importable from here) loads an
official PuLID file (v1 or v1.1) into our ID encoder and ID attention processors and
leaves a ``PuLIDAdapter`` at ``pipe.pulid``; that attribute is how the backend recognises
a pipeline.

Lines (docs/backends/pulid.md):
- ID line: ID attention on with E (E_neg on the negative branch), prompt ``P_id``;
- semantic line: ID attention off (each processor calls the one it replaced: base SDXL,
  with the user's LoRA and attention processors as they are); ``semantic_adapters="on"``
  keeps the ID on;
- baseline (method off): the official v1 fidelity call, ID on for the user's prompt; with
  no reference photos, plain SDXL (the ID attention stays off).

Both lines in one UNet call (``BFConfig.batch_lines``): the semantic and ID rows share one
call, the ID attention switched per row (``PuLIDAttentionState.enabled_rows``); each
line keeps its own text conditioning. See :meth:`PuLIDSession.supports_row_batching`.
T_id = E: (1, 10, 2048) for v1 (5 or 10 more per supplementary image), (1, 32, 2048) for v1.1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from bf_backends.pulid.attention import (
    PuLIDAttentionConfig,
    exact_text_fallback,
)
from bf_backends.pulid.encoder import (
    PuLIDIdentityEncoder,
    broadcast_rows,
    cfg_rows_embedding,
    guidance_off_sequence,
    identity_embeddings,
)
from bf_backends.pulid.loader import (
    PULID_ATTRIBUTE,
    PuLIDAdapter,
    attach_pulid,
    detach_pulid,
    lightning_scheduler,
    load_pulid_pipeline,
)
from bf_core.config import BFConfig
from bf_core.errors import ConfigError
from bf_core.hosts import HostCall, ModelCall
from bf_core.hosts.sdxl import (
    HOST_NAME,
    ID_LINE_OPTIONS,
    RowBatch,
    SDXLSession,
    encode_line_text,
    encode_user_prompt,
    id_negative_prompt,
    is_sdxl_pipeline,
)
from bf_core.records import Identity, Line, LineConditioning

#: Per-call keywords this backend understands (besides the pipeline's and the method's).
#: Unset, they are the attached configuration (fidelity, 0.8 by default).
OPTIONS = {
    "pulid_mode": "'fidelity' (default), 'extremely_style', 'v1.1_default' or 'plain'",
    "id_scale": "weight of the ID attention (default: the attached one, 0.8)",
    "num_zero": "zero tokens appended to the ID tokens (default: the mode's)",
    "ortho": "'off', 'ortho' or 'ortho_v2' (default: the mode's)",
    "id_mix": "v1: all 10 tokens of supplementary images, not only their first 5",
    **ID_LINE_OPTIONS,
}

#: E and E_neg of a call, each (1, T, D) float32.
Embeddings = tuple[torch.Tensor, torch.Tensor]
#: The ID state of a merged call: embedding (R, L, D), config, enabled rows (R,) or None.
MergedEmbedding = tuple[torch.Tensor, PuLIDAttentionConfig, torch.Tensor | None]


def attention_config_for(base: PuLIDAttentionConfig,
                         options: Mapping[str, Any]) -> PuLIDAttentionConfig:
    """The attached config with the call's ``pulid_mode`` / ``num_zero`` / ``ortho`` /
    ``id_scale`` applied (a mode first, then the single fields)."""
    config = base
    if options.get("pulid_mode") is not None:
        config = PuLIDAttentionConfig.from_mode(options["pulid_mode"], config.id_scale)
    changes = {name: options[name] for name in ("num_zero", "ortho", "id_scale")
               if options.get(name) is not None}
    return dataclasses.replace(config, **changes) if changes else config


class PuLIDSession(SDXLSession):
    """One call: the ID embeddings of its people, and the ID attention state of each line's
    UNet rows. The semantic (or baseline) line has the first person's; ID line j person j's."""

    def __init__(self, backend: Any, call: HostCall, config: BFConfig):
        super().__init__(backend, call, config)
        self.adapter: PuLIDAdapter = getattr(self.pipe, PULID_ATTRIBUTE)
        options = self.request.backend_options
        self.attention_config = attention_config_for(self.adapter.state.config, options)
        self.id_mix = bool(options.get("id_mix", False))
        self.encoder = PuLIDIdentityEncoder(
            self.adapter, default_id_prompt=backend.default_id_prompt, id_mix=self.id_mix,
            photos_required=config.enabled, device=self.request.device,
            dtype=self.pipe.unet.dtype)
        self._scene_with_id: LineConditioning | None = None
        self._merged_cache: tuple[tuple[RowBatch, ...], MergedEmbedding | None] = ((), None)

    def open(self, restore: ExitStack) -> None:
        if not self.adapter.attention.installed:
            raise ConfigError("PuLID's processors were uninstalled from this pipeline's UNet; "
                              "attach PuLID again with attach_pulid(pipe, ...).")
        state = self.adapter.state
        saved = (state.id_embedding, state.config, state.enabled, state.enabled_rows)

        def put_back() -> None:
            state.id_embedding, state.config, state.enabled, state.enabled_rows = saved

        restore.callback(put_back)

    def id_embeddings(self, batch: RowBatch | None = None) -> Embeddings | None:
        """(E, E_neg), each (1, T, context width) float32: of the person whose rows ``batch``
        holds (``line_identities``), or of the semantic line's (the first person) without a
        batch; None without reference photos."""
        identity = (self.line_identities.first if batch is None
                    else self.line_identities.of(batch))
        return None if identity is None else identity_embeddings(identity)

    def _id_off(self, line: Line) -> bool:
        return line is Line.SEMANTIC and self.config.semantic_adapters == "off"

    # -- text: lines with ID attention encode a missing negative prompt as "" ---------------
    # The official pipeline always passes the negative prompt as a string (default ""), so
    # it is text-encoded, never SDXL's all-zero embedding. That matters: with a zero
    # negative embedding the text attention A is zero and ORTHO / ORTHO_v2 divide 0 by 0.
    def _negative_prompt(self, given: Any) -> Any:
        no_embeds = self.request.negative_prompt_embeds is None
        return "" if given is None and no_embeds else given

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        self.line_identities.note(line, identity)
        if line is Line.ID:
            return self.id_text(identity.id_prompt)
        if self._id_off(line):
            return self.scene_text()
        return self.scene_text_with_id()

    def id_text(self, id_prompt: str) -> LineConditioning:
        """``P_id`` with the ID line's negative prompt ("" when none is given), encoded once."""
        key = (Line.ID, id_prompt)
        if key not in self._texts:
            request = self.request
            self._texts[key] = encode_line_text(
                self.pipe, request, id_prompt,
                negative_prompt=self._negative_prompt(id_negative_prompt(request)),
                negative_prompt_2=request.backend_options.get("id_negative_prompt_2"))
        return self._texts[key]

    def scene_text_with_id(self) -> LineConditioning:
        """The caller's prompt for a line with ID attention (the baseline, or the semantic
        line with the ID kept on): a missing negative prompt is encoded as ""."""
        if self._scene_with_id is None:
            request = dataclasses.replace(
                self.request, negative_prompt=self._negative_prompt(self.request.negative_prompt))
            self._scene_with_id = encode_user_prompt(self.pipe, request)
        return self._scene_with_id

    # -- the ID state of the rows of one UNet call ------------------------------------------
    def rows_embedding(self, batch: RowBatch, positive: torch.Tensor, negative: torch.Tensor
                       ) -> tuple[torch.Tensor, PuLIDAttentionConfig]:
        """The ID tensor for ``batch``'s rows and the attention config to use with it.

        CFG rows [neg, pos] get [E_neg ; E]; positive-only rows of a CFG call (negatives
        shared with the other line) get E; a call without CFG gets the official guidance-1
        sequence [E_neg ; 0 ; E ; 0] for every sample.
        """
        config = self.attention_config
        per_branch = batch.rows // len(batch.branches)
        if batch.branches == ("uncond", "cond"):
            return cfg_rows_embedding(positive, negative, per_branch), config
        if self.pipe.do_classifier_free_guidance:
            return broadcast_rows(positive, per_branch), config
        sequence = guidance_off_sequence(positive, negative, config.num_zero)
        return sequence, dataclasses.replace(config, num_zero=0)

    def line_rows_embedding(self, batch: RowBatch
                            ) -> tuple[torch.Tensor, PuLIDAttentionConfig] | None:
        """``rows_embedding`` of a one-line batch (its person's ID embeddings), or None where
        its line has the ID off."""
        embeddings = None if self._id_off(batch.line) else self.id_embeddings(batch)
        if embeddings is None:
            return None
        return self.rows_embedding(batch, *embeddings)

    def merged_rows_embedding(self, parts: Sequence[RowBatch]) -> MergedEmbedding | None:
        """The ID state of one call holding the rows of ``parts``, in order.

        Returns (embedding (R, L, D), config, enabled rows (R,) bool or None when every row
        has ID attention), or None when no row has it. Off rows get zero tokens of the on
        rows' length: their ID term is computed and then discarded per row, so its value
        does not matter. The enabled rows are filled on the device (no host-to-device copy,
        so no sync in the loop).
        Raises ConfigError when the on parts need different configs or token counts.
        """
        cached_parts, cached = self._merged_cache
        if len(cached_parts) == len(parts) and all(
                a is b for a, b in zip(cached_parts, parts, strict=True)):
            return cached  # supports_row_batching built it for these very batches
        plans = [self.line_rows_embedding(part) for part in parts]
        on = [plan for plan in plans if plan is not None]
        if not on:
            return None
        configs = {config for _, config in on}
        lengths = {embedding.shape[1:] for embedding, _ in on}
        if len(configs) > 1 or len(lengths) > 1:
            raise ConfigError("the lines of one merged UNet call need different PuLID ID "
                              "attention settings; run them separately with "
                              "BFConfig(batch_lines=False).")
        tokens, config = on[0]
        device = parts[0].sample.device
        embeddings, enabled = [], []
        for part, plan in zip(parts, plans, strict=True):
            if plan is None:
                embeddings.append(torch.zeros(part.rows, *tokens.shape[1:], dtype=tokens.dtype,
                                              device=device))
            else:
                embeddings.append(broadcast_rows(plan[0], part.rows).to(device))
            enabled.append(torch.full((part.rows,), plan is not None, dtype=torch.bool,
                                      device=device))
        every_row_on = len(on) == len(plans)
        merged = torch.cat(embeddings), config, None if every_row_on else torch.cat(enabled)
        # Holding the parts keeps their ids from being reused by the next step's batches.
        self._merged_cache = (tuple(parts), merged)
        return merged

    @contextmanager
    def id_attention(self, batch: RowBatch) -> Iterator[None]:
        """ID attention on (with this batch's embedding) or off for the UNet call; per row
        for a merged batch of several lines."""
        state = self.adapter.state
        if batch.parts:
            merged = self.merged_rows_embedding(batch.parts)
            if merged is None:
                with state.disabled():
                    yield
                return
            embedding, config, enabled_rows = merged
            with state.using(embedding, config, enabled_rows=enabled_rows):
                yield
            return
        plan = self.line_rows_embedding(batch)
        if plan is None:
            with state.disabled():
                yield
        else:
            with state.using(*plan):
                yield

    def predict(self, batch: RowBatch, model: ModelCall) -> torch.Tensor:
        # The per-row ID state depends on the rows' CFG branches, so it is set around the
        # UNet call itself, for merged and single batches alike.
        with self.id_attention(batch):
            return model(batch)

    # -- both lines in one UNet call ---------------------------------------------------------
    def preview_face_analyzer(self):
        """The face analyser of PuLID's features (antelopev2): ``region="auto"``'s detector;
        None (the library's default) for features without one."""
        return getattr(self.adapter.features, "analyzer", None)

    def supports_row_batching(self, batch: RowBatch) -> bool:
        """Whether the semantic and ID rows of ``batch`` (merged) may share one UNet call,
        each row exact.

        Refused (the loop then calls the UNet once per line, as before) when:
        - a part is the baseline (one line only, by the method's definition);
        - the call passes the ID tokens itself through ``cross_attention_kwargs``
          (``id_embedding`` / ``id_scale``, the official route): one tensor for the whole
          call cannot be switched per row;
        - the semantic rows need the ID off while a replaced cross-attention processor is
          not diffusers' ``AttnProcessor2_0``: the off rows are our text attention, which is
          bit for bit that processor only;
        - the lines' ID settings or token counts differ (not produced by the loop today).
        """
        if any(line not in (Line.SEMANTIC, Line.ID) for line in batch.lines):
            return False
        call_kwargs = batch.cross_attention_kwargs or {}
        if "id_embedding" in call_kwargs or "id_scale" in call_kwargs:
            return False
        off = [self._id_off(line) for line in batch.lines]
        if any(off) and not all(off) and self.id_embeddings() is not None \
                and not exact_text_fallback(self.adapter.attention):
            return False
        try:
            self.merged_rows_embedding(batch.parts)
        except ConfigError:
            return False
        return True

    def negative_shareable(self) -> bool:
        # Only with the ID kept on in the semantic line do both lines' negative rows see
        # the same model state (E_neg on both).
        return self.config.semantic_adapters == "on"


class PuLIDBackend:
    """PuLID v1 / v1.1 on a diffusers SDXL pipeline prepared with ``attach_pulid``."""

    name = "pulid"
    recognizes_description = (
        "a diffusers StableDiffusionXLPipeline with PuLID attached "
        "(bf_backends.pulid.backend.attach_pulid(pipe, 'pulid_v1.bin', features) sets pipe.pulid)")
    priority = 30
    default_id_prompt = "a person"
    hosts = (HOST_NAME,)
    options = OPTIONS
    #: each person's ID embeddings go to its own ID line's rows
    max_people = 4

    def recognizes(self, pipe: Any) -> bool:
        adapter = getattr(pipe, PULID_ATTRIBUTE, None)
        return (is_sdxl_pipeline(pipe) and adapter is not None
                and all(hasattr(adapter, name) for name in ("encoder", "attention", "features"))
                and getattr(adapter.attention, "installed", False))

    def open_session(self, call: HostCall, config: BFConfig) -> PuLIDSession:
        return PuLIDSession(self, call, config)


# -- the benchmark's view (BackendExtras) ------------------------------------------------------
def benchmark_call_kwargs(identity: Any, images: list) -> dict[str, Any]:
    """The photos, and ``P_id`` when the identity sets one (its PuLID option, else its
    shared ``id_prompt``)."""
    kwargs: dict[str, Any] = {"id_images": images}
    id_prompt = identity.option(PuLIDBackend.name, "id_prompt", identity.id_prompt)
    if id_prompt:
        kwargs["id_prompt"] = id_prompt
    return kwargs


__all__ = ["OPTIONS", "PULID_ATTRIBUTE", "PuLIDAdapter", "PuLIDBackend", "PuLIDSession",
           "attach_pulid", "attention_config_for", "benchmark_call_kwargs", "detach_pulid",
           "lightning_scheduler", "load_pulid_pipeline"]
