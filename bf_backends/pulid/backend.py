"""The PuLID backend: a diffusers SDXL pipeline with PuLID's ID attention attached.

Set-up: :func:`attach_pulid` loads an official PuLID file (v1 or v1.1) into our ID
encoder and ID attention processors and leaves a :class:`PuLIDAdapter` at ``pipe.pulid``;
that attribute is how the backend recognises a pipeline. With no ID tokens set, the
processors hand every call to the processors they replaced, so the pipeline's own
``pipe(...)`` still draws plain SDXL, and ``pipe(..., cross_attention_kwargs={"id_embedding":
[E_neg ; E], "id_scale": s})`` is the official PuLID v1 call.

Lines (docs/backends/pulid.md):
- ID line: ID attention on with E (E_neg on the negative branch), prompt ``P_id``;
- semantic line: ID attention off (each processor calls the one it replaced: base SDXL,
  with the user's LoRA and attention processors as they are); ``semantic_adapters="on"``
  keeps the ID on;
- baseline (method off): the official v1 fidelity call, ID on for the user's prompt.

Both lines in one UNet call (``BFConfig.batch_lines``): the semantic and ID rows share one
call, the ID attention switched per row (``PuLIDAttentionState.enabled_rows``); each
line keeps its own text conditioning. See :meth:`PuLIDSession.supports_row_batching`.
T_id = E: (1, 10, 2048) for v1 (5 or 10 more per supplementary image), (1, 32, 2048) for v1.1.

Per-call options (keywords of the wrapped call): ``pulid_mode`` ("fidelity",
"extremely_style", "v1.1_default", "plain"), ``id_scale``, ``num_zero``, ``ortho``
("off" / "ortho" / "ortho_v2"), ``id_mix`` (v1: all 10 tokens of supplementary images).
Unset, they are the attached configuration (fidelity, 0.8 by default).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from bf_backends.pulid.attention import (
    PuLIDAttentionConfig,
    PuLIDAttentionInstallation,
    PuLIDAttentionState,
    exact_text_fallback,
)
from bf_backends.pulid.encoder import EncoderConfig, IDEncoder, IDFormer
from bf_backends.pulid.features import FaceFeatures
from bf_backends.pulid.identity import (
    broadcast_rows,
    cfg_rows_embedding,
    encode_identity,
    guidance_off_sequence,
)
from bf_backends.pulid.loader import load_pulid
from bf_core.errors import ConfigError
from bf_core.images import load_images
from bf_core.protocols import GenerationRequest, Identity, Line, LineConditioning, RowBatch
from bf_core.sdxl import SDXLSession, encode_line_text, encode_user_prompt, is_sdxl_pipeline

#: The pipeline attribute that holds the attached :class:`PuLIDAdapter`.
PULID_ATTRIBUTE = "pulid"

FeatureExtractor = Callable[[Any, int], FaceFeatures]


@dataclass
class PuLIDAdapter:
    """Everything PuLID adds to a pipeline.

    version: "v1" or "v1.1". encoder: the ID encoder (float32). attention: the installed
    ID processors, whose ``state`` the backend sets per line. features: reference image
    (and its index) -> :class:`FaceFeatures` (see ``PuLIDFaceFeatures``).
    """

    version: str
    encoder: IDEncoder | IDFormer
    attention: PuLIDAttentionInstallation
    features: FeatureExtractor

    @property
    def state(self) -> PuLIDAttentionState:
        return self.attention.state


def attach_pulid(pipe: Any, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
                 features: FeatureExtractor, *, version: str | None = None,
                 encoder_config: EncoderConfig | None = None, mode: str = "fidelity",
                 id_scale: float = 0.8) -> PuLIDAdapter:
    """Load ``checkpoint`` into ``pipe.unet`` and attach PuLID to ``pipe`` (``pipe.pulid``).

    checkpoint: ``pulid_v1.bin`` / ``pulid_v1.1.safetensors`` or their flat state dict.
    mode, id_scale: the default ID attention settings ("fidelity" = the paper's baseline).
    Undo with :func:`detach_pulid`.
    """
    if not is_sdxl_pipeline(pipe):
        raise ConfigError(f"PuLID attaches to a diffusers StableDiffusionXLPipeline; got a "
                          f"{type(pipe).__name__}.")
    if getattr(pipe, PULID_ATTRIBUTE, None) is not None:
        raise ConfigError("PuLID is already attached to this pipeline; call detach_pulid(pipe) "
                          "first to load another checkpoint.")
    state = PuLIDAttentionState(PuLIDAttentionConfig.from_mode(mode, id_scale))
    loaded = load_pulid(checkpoint, pipe.unet, version=version, encoder_config=encoder_config,
                        state=state)
    adapter = PuLIDAdapter(loaded.version, loaded.encoder, loaded.attention, features)
    setattr(pipe, PULID_ATTRIBUTE, adapter)
    return adapter


def detach_pulid(pipe: Any) -> None:
    """Put back the UNet's original processors and remove ``pipe.pulid``."""
    adapter = getattr(pipe, PULID_ATTRIBUTE, None)
    if adapter is not None:
        adapter.attention.uninstall()
        setattr(pipe, PULID_ATTRIBUTE, None)


def lightning_scheduler(base_scheduler_config: Mapping[str, Any]):
    """PuLID v1's sampler: DPM-Solver++ from SDXL's scheduler config, trailing spacing.

    ``final_sigmas_type="sigma_min"`` reproduces diffusers 0.25 (the official pin), whose
    last update did not go to sigma 0; newer defaults change the final latent.
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        dict(base_scheduler_config), timestep_spacing="trailing", final_sigmas_type="sigma_min")


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


class PuLIDIdentityEncoder:
    """Reference images -> ``Identity(tokens=E, negative_tokens=E_neg)`` for one call."""

    def __init__(self, session: PuLIDSession) -> None:
        self.session = session

    def encode(self, id_images: Sequence[Any] | None, id_prompt: str,
               request: GenerationRequest) -> Identity:
        embeddings = self.session.id_embeddings()
        if embeddings is None:
            raise ConfigError("PuLID needs at least one reference photo: pass id_images=[...] "
                              "(a path, PIL image or array with one clearly visible face).")
        positive, negative = embeddings
        # T_id joins the text tokens in IdAP, so it takes the text embeddings' dtype/device.
        dtype = self.session.pipe.unet.dtype
        return Identity(tokens=positive.to(request.device, dtype),
                        negative_tokens=negative.to(request.device, dtype),
                        state={"id_embedding": positive, "negative_id_embedding": negative})


class PuLIDSession(SDXLSession):
    """One call: the ID embeddings, and the ID attention state of each line's UNet rows."""

    def __init__(self, backend: Any, pipe: Any, request: GenerationRequest, config: Any):
        super().__init__(backend, pipe, request, config)
        self.adapter: PuLIDAdapter = getattr(pipe, PULID_ATTRIBUTE)
        options = request.backend_options
        self.attention_config = attention_config_for(self.adapter.state.config, options)
        self.id_mix = bool(options.get("id_mix", False))
        self.encoder = PuLIDIdentityEncoder(self)
        self._embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self._merged_cache: tuple[tuple[RowBatch, ...], Any] = ((), None)

    def setup(self) -> None:
        if not self.adapter.attention.installed:
            raise ConfigError("PuLID's processors were uninstalled from this pipeline's UNet; "
                              "attach PuLID again with attach_pulid(pipe, ...).")
        state = self.adapter.state
        saved = (state.id_embedding, state.config, state.enabled, state.enabled_rows)

        def restore() -> None:
            state.id_embedding, state.config, state.enabled, state.enabled_rows = saved

        self.restore_stack.callback(restore)
        if self.request.id_images:
            self.id_embeddings()  # bad photos fail before the first step

    def id_embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(E, E_neg), each (1, T, context width) float32, or None without reference photos."""
        if self._embeddings is None and self.request.id_images:
            images = load_images(self.request.id_images)
            features = [self.adapter.features(image, index) for index, image in enumerate(images)]
            self._embeddings = encode_identity(self.adapter.encoder, features, self.id_mix)
        return self._embeddings

    def _id_off(self, line: Line) -> bool:
        return line is Line.SEMANTIC and self.config.semantic_adapters == "off"

    # -- text: lines with ID attention encode a missing negative prompt as "" ---------------
    # The official pipeline always passes the negative prompt as a string (default ""), so
    # it is text-encoded, never SDXL's all-zero embedding. That matters: with a zero
    # negative embedding the text attention A is zero and ORTHO / ORTHO_v2 divide 0 by 0.
    def _negative_prompt(self, given: Any) -> Any:
        no_embeds = self.request.negative_prompt_embeds is None
        return "" if given is None and no_embeds else given

    def conditioning(self, line: Line, identity: Identity | None) -> LineConditioning:
        user_prompt_with_id = line is Line.BASELINE or (line is Line.SEMANTIC
                                                        and not self._id_off(line))
        if user_prompt_with_id and line not in self._conditioning_cache:
            request = dataclasses.replace(
                self.request, negative_prompt=self._negative_prompt(self.request.negative_prompt))
            with self.text_state(line):
                self._conditioning_cache[line] = encode_user_prompt(self.pipe, request)
        return super().conditioning(line, identity)

    def id_line_text(self) -> LineConditioning:
        options = self.request.backend_options
        negative = options.get("id_negative_prompt", self.request.negative_prompt)
        if isinstance(negative, list) and self.request.batch_size != len(negative):
            negative = negative[0]
        return encode_line_text(self.pipe, self.request, self.id_prompt,
                                negative_prompt=self._negative_prompt(negative),
                                negative_prompt_2=options.get("id_negative_prompt_2"))

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
        """``rows_embedding`` of a one-line batch, or None where its line has the ID off."""
        embeddings = None if self._id_off(batch.line) else self.id_embeddings()
        if embeddings is None:
            return None
        return self.rows_embedding(batch, *embeddings)

    def merged_rows_embedding(self, parts: Sequence[RowBatch]
                              ) -> tuple[torch.Tensor, PuLIDAttentionConfig, torch.Tensor] | None:
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

    def unet_forward(self, batch: RowBatch) -> torch.Tensor:
        with self.id_attention(batch):
            return super().unet_forward(batch)

    # -- both lines in one UNet call ---------------------------------------------------------
    def supports_row_batching(self, batches: Sequence[RowBatch]) -> bool:
        """Whether the semantic and ID rows may share one UNet call, each row exact.

        Refused (the loop then calls the UNet once per line, as before) when:
        - a batch is the baseline (one line only, by the method's definition);
        - the call passes the ID tokens itself through ``cross_attention_kwargs``
          (``id_embedding`` / ``id_scale``, the official route): one tensor for the whole
          call cannot be switched per row;
        - the semantic rows need the ID off while a replaced cross-attention processor is
          not diffusers' ``AttnProcessor2_0``: the off rows are our text attention, which is
          bit for bit that processor only;
        - the lines' ID settings or token counts differ (not produced by the loop today).
        """
        if any(batch.line not in (Line.SEMANTIC, Line.ID) for batch in batches):
            return False
        call_kwargs = batches[0].cross_attention_kwargs or {}
        if "id_embedding" in call_kwargs or "id_scale" in call_kwargs:
            return False
        off = [self._id_off(batch.line) for batch in batches]
        if any(off) and not all(off) and self.id_embeddings() is not None \
                and not exact_text_fallback(self.adapter.attention):
            return False
        try:
            self.merged_rows_embedding(batches)
        except ConfigError:
            return False
        return True

    @contextmanager
    def row_state(self, batch: RowBatch) -> Iterator[None]:
        # The per-row ID state depends on the rows' CFG branches, so it is set with the UNet
        # call itself (``id_attention`` in ``unet_forward``), for merged and single batches.
        yield

    def negative_shareable(self) -> bool:
        # Only with the ID kept on in the semantic line do both lines' negative rows see
        # the same model state (E_neg on both).
        return self.config.semantic_adapters == "on"


class PuLIDBackend:
    """PuLID v1 / v1.1 on a diffusers SDXL pipeline prepared with :func:`attach_pulid`."""

    name = "pulid"
    recognizes_description = (
        "a diffusers StableDiffusionXLPipeline with PuLID attached "
        "(bf_backends.pulid.backend.attach_pulid(pipe, 'pulid_v1.bin', features) sets pipe.pulid)")
    priority = 30
    default_id_prompt = "a person"

    def recognizes(self, pipe: Any) -> bool:
        adapter = getattr(pipe, PULID_ATTRIBUTE, None)
        return (is_sdxl_pipeline(pipe) and adapter is not None
                and all(hasattr(adapter, name) for name in ("encoder", "attention", "features"))
                and getattr(adapter.attention, "installed", False))

    def open_session(self, pipe: Any, request: GenerationRequest, config: Any) -> PuLIDSession:
        return PuLIDSession(self, pipe, request, config)

    # -- the benchmark protocol (docs/benchmark.md, "Backend protocol") ------------------------
    def benchmark_tiny_pipeline(self, seed: int = 0):
        """The tiny offline PuLID v1.1 pipeline; its tiny face models travel on ``pipe.pulid``."""
        from bf_backends.pulid.testing import tiny_pipeline

        return tiny_pipeline("v1.1", seed=seed)

    def benchmark_pipeline(self, base_model: str, checkpoint: str | None, *,
                           torch_dtype: Any = None, device: str | None = None):
        """``checkpoint`` is the PuLID file (``pulid_v1.bin`` or ``pulid_v1.1.safetensors``);
        the face models lie beside it: ``antelopev2/`` (the insightface pack),
        ``parsing_bisenet.pth`` and ``EVA02_CLIP_L_336_psz14_s6B.pt``; and, when present,
        ``sdxl_lightning_4step_unet.safetensors`` replaces the base UNet (the v1 set-up)."""
        from pathlib import Path

        from bf_backends.pulid.eva import load_eva_features
        from bf_backends.pulid.features import PuLIDFaceFeatures, load_bisenet_parser
        from bf_core.faces import FaceAnalyzer

        path = Path(checkpoint) if checkpoint else None
        if path is None or not path.is_file():
            raise ConfigError(f"PuLID's benchmark checkpoint must be the PuLID file, got "
                              f"{checkpoint!r}; pass --checkpoint pulid=<folder>/pulid_v1.bin")
        folder = path.parent
        needed = [folder / "antelopev2", folder / "parsing_bisenet.pth",
                  folder / "EVA02_CLIP_L_336_psz14_s6B.pt"]
        missing = [p.name for p in needed if not p.exists()]
        if missing:
            raise ConfigError(f"PuLID's face models {missing} are not beside {path.name} in "
                              f"{folder}; put the antelopev2/ pack, parsing_bisenet.pth and "
                              "EVA02_CLIP_L_336_psz14_s6B.pt there (docs/backends/pulid.md)")
        features = PuLIDFaceFeatures(FaceAnalyzer(str(needed[0])),
                                     load_bisenet_parser(needed[1], device=device),
                                     load_eva_features(str(needed[2]), device=device))
        lightning = folder / "sdxl_lightning_4step_unet.safetensors"
        return load_pulid_pipeline(base_model, path, features, torch_dtype=torch_dtype,
                                   device=device,
                                   unet_weights=lightning if lightning.is_file() else None)


def load_pulid_pipeline(base_model: str, checkpoint: str | os.PathLike, features: FeatureExtractor,
                        *, unet_weights: str | os.PathLike | None = None, torch_dtype=None,
                        device: str | None = None, mode: str = "fidelity",
                        id_scale: float = 0.8, local_files_only: bool = True):
    """The official v1 set-up from local files: SDXL base, optional full UNet weights
    (``sdxl_lightning_4step_unet.safetensors``), DPM-Solver trailing, PuLID attached.

    The ID encoder and ID projections stay float32 whatever ``torch_dtype`` is, as in the
    official code.
    """
    from bf_core.checkpoints import load_state_dict_file, load_strict
    from bf_core.sdxl import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(base_model, torch_dtype=torch_dtype,
                              local_files_only=local_files_only)
    if unet_weights is not None:
        state_dict = load_state_dict_file(unet_weights)
        load_strict(pipe.unet, {k: v.to(pipe.unet.dtype) for k, v in state_dict.items()},
                    f"SDXL UNet ({unet_weights})")
    pipe.scheduler = lightning_scheduler(pipe.scheduler.config)
    pipe.watermark = None
    if device:
        pipe.to(device)
    attach_pulid(pipe, checkpoint, features, mode=mode, id_scale=id_scale)
    return pipe


__all__ = ["PULID_ATTRIBUTE", "PuLIDAdapter", "PuLIDBackend", "PuLIDIdentityEncoder",
           "PuLIDSession", "attach_pulid", "attention_config_for", "detach_pulid",
           "lightning_scheduler", "load_pulid_pipeline"]
