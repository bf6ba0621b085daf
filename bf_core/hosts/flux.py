"""The FLUX.1 host: diffusers' ``FluxPipeline`` (a ``FluxTransformer2DModel`` predicting a
flow-matching velocity on 2x2-packed latents, distilled guidance, optional true CFG).

``FluxCall`` mirrors ``FluxPipeline.__call__`` piece for piece, so that the one loop with
the method off reproduces the stock pipeline bit for bit: the same text encoding (CLIP
pooled + T5), packed latents and image ids, the dynamic shift ``mu`` of the schedule, the
guidance embedding, the conditional call then the unconditional one when true CFG is on,
scheduler steps, callbacks, progress bar and decoding.

What differs from SDXL, for the loop: predictions are velocities ``v ~ noise - x0`` in the
packed (R, N, 64) layout; IdAF reads them unpacked on the (R, 16, h, w) latent grid
(``fusion_layout``) and scores ``|v|``, what the scheduler consumes. All rows of one
transformer call share one text length (the text ids are shared), so IdAP's prepended
tokens replace as many trailing T5 padding tokens when the prompt leaves that many; else
the semantic line runs in a call of its own (``merge`` gives None).

For backends: ``FluxRowBatch``, ``FluxModel`` (the stock transformer call for such a
batch) and ``FluxSession`` (a ``BackendSession`` with the FLUX defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from bf_core.errors import ConfigError
from bf_core.finite import check_decoded
from bf_core.hookspecs import hookimpl
from bf_core.hosts import MaskedImg2Img, RowsOfLines, Step, size_or_native
from bf_core.hosts.session import HostSession
from bf_core.records import (
    BOTH_BRANCHES,
    POSITIVE_ONLY,
    BeyondFacialPipelineOutput,
    Branch,
    GenerationRequest,
    Line,
    LineConditioning,
    LoopRecord,
)

HOST_NAME = "flux"
_FLUX_ATTRIBUTES = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2",
                    "tokenizer_2", "encode_prompt", "prepare_latents", "_pack_latents",
                    "_unpack_latents", "image_processor")
#: Options every FLUX backend takes for its ID line's text (used with true CFG only).
ID_LINE_OPTIONS = {
    "id_negative_prompt": "the ID line's negative prompt for true CFG (default: the caller's)",
    "id_negative_prompt_2": "the ID line's second negative prompt for true CFG",
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEQUENCE_LENGTH = 512  # T5's limit in FluxPipeline


# -- recognising FLUX pipelines ----------------------------------------------------------------------
def is_flux_pipeline(pipe: Any) -> bool:
    """Duck-typed: a pipeline with FluxPipeline's pieces and a FLUX transformer (joint text
    attention, rotary axes), never judged by its class name."""
    if not all(hasattr(pipe, name) for name in _FLUX_ATTRIBUTES):
        return False
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    return all(hasattr(config, key) for key in ("joint_attention_dim", "axes_dims_rope",
                                                 "pooled_projection_dim"))


def has_identity_machinery(pipe: Any) -> bool:
    """True when an identity method is attached to a FLUX pipeline: diffusers' IP-Adapter
    (``transformer.encoder_hid_proj``), or one of ours (``pipe.pulid_flux``,
    ``pipe.infiniteyou``)."""
    transformer = getattr(pipe, "transformer", None)
    return (getattr(transformer, "encoder_hid_proj", None) is not None
            or getattr(pipe, "pulid_flux", None) is not None
            or getattr(pipe, "infiniteyou", None) is not None)


def flux_dev_transformer_config() -> dict[str, Any]:
    """FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json): what
    real-size speed runs build with random weights."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def is_flux_model(base_model: str) -> bool:
    """Whether a base model (a local diffusers folder or a hub id) is a FLUX.1 model: the
    folder's ``model_index.json`` names a Flux pipeline class; a hub id, read offline,
    has "flux" in its name (black-forest-labs/FLUX.1-dev, FLUX.1-schnell, ...)."""
    import json
    import os

    index = os.path.join(os.path.expanduser(base_model), "model_index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return "flux" in str(json.load(handle).get("_class_name", "")).lower()
    return "flux" in base_model.lower()


def load_flux_pipeline(base_model: str, torch_dtype=None, device: str | None = None,
                       local_files_only: bool = False):
    """``FluxPipeline.from_pretrained`` with a clear message when the folder is not there."""
    import os

    from diffusers import FluxPipeline

    from bf_core.errors import CheckpointError

    if base_model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(base_model)):
        raise CheckpointError(f"the FLUX base model folder {base_model!r} does not exist; give a "
                              "local diffusers FLUX.1 folder or a hub id")
    try:
        pipe = FluxPipeline.from_pretrained(base_model, torch_dtype=torch_dtype,
                                            local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not load the FLUX base model {base_model!r} ({exc}). Give a local folder in "
            "diffusers layout (model_index.json, transformer/, vae/, text_encoder/, "
            "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), or a hub id with network "
            "access (FLUX.1-dev is gated: accept its licence first).") from exc
    return pipe.to(device) if device else pipe


# -- the call's arguments -------------------------------------------------------------------------
@dataclass
class FluxCallArguments:
    """The keywords of ``FluxPipeline.__call__`` with the stock defaults (``prompt`` and
    ``prompt_2`` may also be given by position)."""

    prompt: str | list[str] | None = None
    prompt_2: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    true_cfg_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 28
    sigmas: list[float] | None = None
    guidance_scale: float = 3.5
    num_images_per_prompt: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    ip_adapter_image: Any = None
    ip_adapter_image_embeds: list[torch.Tensor] | None = None
    negative_ip_adapter_image: Any = None
    negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    output_type: str = "pil"
    return_dict: bool = True
    joint_attention_kwargs: dict[str, Any] | None = None
    callback_on_step_end: Any = None
    callback_on_step_end_tensor_inputs: list[str] | None = None
    max_sequence_length: int = MAX_SEQUENCE_LENGTH


CALL_KEYWORDS = frozenset(f.name for f in dataclasses.fields(FluxCallArguments))


def split_call_arguments(args: tuple, kwargs: Mapping[str, Any]
                         ) -> tuple[FluxCallArguments, dict[str, Any]]:
    """The pipeline's own arguments, and the keywords it does not take (backend options)."""
    if len(args) > 2:
        raise ConfigError(f"the wrapped call takes prompt and prompt_2 by position, got "
                          f"{len(args)} positional arguments; pass the others by keyword")
    known = {name: value for name, value in kwargs.items() if name in CALL_KEYWORDS}
    positional = dict(zip(("prompt", "prompt_2"), args, strict=False))
    clash = sorted(set(positional) & set(known))
    if clash:
        raise ConfigError(f"{clash} given both by position and by keyword")
    options = {name: value for name, value in kwargs.items() if name not in CALL_KEYWORDS}
    return FluxCallArguments(**positional, **known), options


def _check_call(pipe: Any, a: FluxCallArguments, height: int, width: int) -> None:
    """The call's arguments, refused with a named error before anything runs."""
    from bf_core.hosts.sdxl import _check_int, _check_number, _check_prompts

    _check_prompts(a)
    for name, value in (("height", height), ("width", width)):
        _check_int(name, value, 2 * pipe.vae_scale_factor)
    if a.sigmas is None:
        _check_int("num_inference_steps", a.num_inference_steps, 1)
    _check_int("num_images_per_prompt", a.num_images_per_prompt, 1)
    _check_number("guidance_scale", a.guidance_scale, 0.0, 1e3)
    _check_number("true_cfg_scale", a.true_cfg_scale, 0.0, 1e3)
    _check_int("max_sequence_length", a.max_sequence_length, 1)
    if a.max_sequence_length > MAX_SEQUENCE_LENGTH:
        raise ConfigError(f"max_sequence_length must be <= {MAX_SEQUENCE_LENGTH} (T5's limit in "
                          f"FluxPipeline), got {a.max_sequence_length}")
    if a.output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {OUTPUT_TYPES}, got {a.output_type!r}")
    allowed = set(getattr(pipe, "_callback_tensor_inputs", ()))
    unknown = [n for n in (a.callback_on_step_end_tensor_inputs or []) if n not in allowed]
    if unknown:
        raise ConfigError(f"callback_on_step_end_tensor_inputs has {unknown}; allowed: "
                          f"{sorted(allowed)}")


def _batch_size(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


# -- text ----------------------------------------------------------------------------------------
def t5_trailing_padding(pipe: Any, prompts: Sequence[str], max_sequence_length: int) -> int:
    """How many of the last T5 tokens are padding in every one of ``prompts`` (the fewest)."""
    tokens = pipe.tokenizer_2(list(prompts), padding="max_length", max_length=max_sequence_length,
                              truncation=True, return_tensors="pt")
    return int(max_sequence_length - tokens.attention_mask.sum(dim=1).max())


def _as_list(prompt: str | list[str], batch_size: int) -> list[str]:
    return [prompt] * batch_size if isinstance(prompt, str) else list(prompt)


def encode_flux_text(pipe: Any, request: GenerationRequest, prompt: str | list[str] | None, *,
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                     prompt_2: str | list[str] | None = None,
                     negative_prompt: str | list[str] | None = None,
                     negative_prompt_2: str | list[str] | None = None,
                     prompt_embeds: torch.Tensor | None = None,
                     pooled_prompt_embeds: torch.Tensor | None = None,
                     negative_prompt_embeds: torch.Tensor | None = None,
                     negative_pooled_prompt_embeds: torch.Tensor | None = None) -> LineConditioning:
    """One line's text exactly as ``FluxPipeline.__call__`` encodes it: the prompt, then
    (with true CFG) the negative prompt, each through ``encode_prompt``. A single string
    prompt is repeated to the request's batch size. Embeds have R = batch x images rows.

    trailing_padding is counted with the T5 tokenizer when every text came as a string.
    """
    length = max_sequence_length

    def encode(text, text_2, embeds, pooled):
        if isinstance(text, str) and request.batch_size > 1:
            text = [text] * request.batch_size
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=text, prompt_2=text_2, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
            device=request.device, num_images_per_prompt=request.num_images_per_prompt,
            max_sequence_length=length, lora_scale=request.lora_scale)
        return embeds, pooled

    embeds, pooled = encode(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds)
    texts = [prompt_2 or prompt] if prompt_embeds is None else None
    negative = negative_pooled = None
    if request.do_cfg:
        negative, negative_pooled = encode(negative_prompt, negative_prompt_2,
                                           negative_prompt_embeds, negative_pooled_prompt_embeds)
        texts = None if (texts is None or negative_prompt_embeds is not None) else (
            texts + [negative_prompt_2 or negative_prompt])
    padding = None
    if texts is not None:
        flat = [t for text in texts for t in _as_list(text, request.batch_size)]
        padding = t5_trailing_padding(pipe, flat, length)
    return LineConditioning(embeds, pooled, negative, negative_pooled, trailing_padding=padding)


# -- rows of one transformer call -----------------------------------------------------------------
@dataclass
class FluxLineTensors:
    """One line's transformer text inputs for all its rows (``HostCall.line_inputs``),
    negative rows first when true CFG is on."""

    embeds: torch.Tensor  # (2R or R, L, D) T5 tokens
    pooled: torch.Tensor  # (2R or R, P) CLIP pooled

    def cond_half(self) -> FluxLineTensors:
        half = self.embeds.shape[0] // 2
        return FluxLineTensors(self.embeds[half:], self.pooled[half:])


@dataclass
class FluxRowBatch(RowsOfLines):
    """The rows of one transformer evaluation: one line's, or several lines' merged.

    sample: (R, N, 64) packed latents; encoder_hidden_states (R, L, D) and pooled (R, P);
    every row has the same text length L (the text ids are shared). line_index: which line
    of the call the rows belong to (0 the semantic or baseline line, j person j's ID line).
    """

    line: Line | None
    step_index: int
    timestep: torch.Tensor
    sample: torch.Tensor
    branches: tuple[Branch, ...]
    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor
    parts: tuple[FluxRowBatch, ...] = ()
    line_index: int = 0


def merge_flux_batches(batches: Sequence[FluxRowBatch]) -> FluxRowBatch | None:
    """One batch of every row, in order; None when the text lengths differ (one call shares
    its text ids across rows, so they cannot be padded)."""
    length = batches[0].encoder_hidden_states.shape[1]
    if any(b.encoder_hidden_states.shape[1] != length for b in batches):
        return None
    first = batches[0]
    return FluxRowBatch(
        line=None, step_index=first.step_index, timestep=first.timestep,
        sample=torch.cat([b.sample for b in batches]),
        branches=tuple(branch for b in batches for branch in b.branches),
        encoder_hidden_states=torch.cat([b.encoder_hidden_states for b in batches]),
        pooled=torch.cat([b.pooled for b in batches]), parts=tuple(batches))


class FluxModel:
    """The stock transformer call for a ``FluxRowBatch``; a backend adds its own inputs.

    joint: entries added to ``joint_attention_kwargs`` (e.g. IP embeds); further keywords go
    to the transformer as they are (e.g. ControlNet residuals). A one-line baseline batch
    with true CFG runs as the stock pipeline runs it: the conditional call, then the
    unconditional one (``per_branch``); every other batch is one call.
    """

    def __init__(self, call: FluxCall):
        self.call = call

    def __call__(self, batch: FluxRowBatch, *, joint: dict[str, Any] | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if batch.line is Line.BASELINE and len(batch.branches) == 2:
            return self.per_branch(batch, lambda branch: dict(joint=joint, **kwargs))
        return self.run(batch, 0, batch.rows, joint=joint, **kwargs)

    def per_branch(self, batch: FluxRowBatch, inputs_of) -> torch.Tensor:
        """A one-line, two-branch batch as two calls in the stock order (conditional first);
        ``inputs_of(branch)`` gives each call's keywords for ``run``. It is called right
        before that branch's call (never earlier), so it may also set per-branch state that
        hooks read during the call. Returns the outputs in the batch's row order (negative
        rows first)."""
        rows = batch.rows_per_branch
        cond = self.run(batch, rows, 2 * rows, context="cond", **inputs_of(Branch.COND))
        uncond = self.run(batch, 0, rows, context="uncond", **inputs_of(Branch.UNCOND))
        return torch.cat([uncond, cond])

    def run(self, batch: FluxRowBatch, start: int, stop: int, *, context: str = "cond",
            joint: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        """The transformer on rows [start, stop) of ``batch``."""
        call, transformer = self.call, self.call.pipe.transformer
        sample = batch.sample[start:stop]
        rows = sample.shape[0]
        timestep = batch.timestep.expand(rows).to(sample.dtype)
        guidance = None if call.guidance is None else call.guidance.expand(rows)
        attention = dict(call.pipe.joint_attention_kwargs or {}, **(joint or {}))
        cache = getattr(transformer, "cache_context", None)
        with cache(context) if cache is not None else nullcontext():
            return transformer(
                hidden_states=sample, timestep=timestep / 1000, guidance=guidance,
                pooled_projections=batch.pooled[start:stop],
                encoder_hidden_states=batch.encoder_hidden_states[start:stop],
                txt_ids=call.text_ids(batch.encoder_hidden_states.shape[1]),
                img_ids=call.latent_image_ids, joint_attention_kwargs=attention,
                return_dict=False, **kwargs)[0]


# -- one call -------------------------------------------------------------------------------------
class FluxCall:
    """``HostCall`` for a FLUX pipeline: one wrapped call, as the stock ``__call__`` runs it."""

    #: M1/M2 given as fractions are floored on FLUX: 0.2 and 0.3 of its 28 default steps
    #: are steps 5 and 8
    threshold_rounding = "floor"

    def __init__(self, pipe: Any, arguments: FluxCallArguments, options: dict[str, Any]):
        self.pipe, self.arguments = pipe, arguments
        self.native_size = int(pipe.default_sample_size * pipe.vae_scale_factor)
        self.height = size_or_native(arguments.height, self.native_size)
        self.width = size_or_native(arguments.width, self.native_size)
        _check_call(pipe, arguments, self.height, self.width)
        self.tensor_inputs = list(arguments.callback_on_step_end_tensor_inputs or ["latents"])
        self._set_pipeline_properties()
        self.request = self._request(options)
        self.model = FluxModel(self)
        self.img2img: MaskedImg2Img | None = None  # set before ``prepare`` by the refine pass
        self._text_ids: dict[int, torch.Tensor] = {}
        self._latents: torch.Tensor | None = None
        self._semantic_embeds: torch.Tensor | None = None
        self._embeds_override: torch.Tensor | None = None

    def _set_pipeline_properties(self) -> None:
        pipe, a = self.pipe, self.arguments
        pipe._guidance_scale = a.guidance_scale
        pipe._joint_attention_kwargs = a.joint_attention_kwargs
        pipe._current_timestep = None
        pipe._interrupt = False

    def _request(self, options: dict[str, Any]) -> GenerationRequest:
        a = self.arguments
        has_negative = a.negative_prompt is not None or (
            a.negative_prompt_embeds is not None and a.negative_pooled_prompt_embeds is not None)
        joint = a.joint_attention_kwargs or {}
        return GenerationRequest(
            prompt=a.prompt, prompt_2=a.prompt_2, negative_prompt=a.negative_prompt,
            negative_prompt_2=a.negative_prompt_2, prompt_embeds=a.prompt_embeds,
            negative_prompt_embeds=a.negative_prompt_embeds,
            pooled_prompt_embeds=a.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=a.negative_pooled_prompt_embeds,
            batch_size=_batch_size(a.prompt, a.prompt_embeds),
            num_images_per_prompt=a.num_images_per_prompt, height=self.height, width=self.width,
            do_cfg=a.true_cfg_scale > 1 and has_negative, lora_scale=joint.get("scale"),
            device=self.pipe._execution_device, backend_options=options)

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self, semantic: LineConditioning) -> int:
        """Latents, image ids, the shifted schedule and the guidance, in the stock order."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        pipe, a, request = self.pipe, self.arguments, self.request
        channels = pipe.transformer.config.in_channels // 4
        self._latents, self.latent_image_ids = pipe.prepare_latents(
            request.num_rows, channels, self.height, self.width, semantic.prompt_embeds.dtype,
            request.device, a.generator, a.latents)
        steps = a.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps) if a.sigmas is None else a.sigmas
        config = pipe.scheduler.config
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(self._latents.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        self.timesteps, self.num_inference_steps = retrieve_timesteps(
            pipe.scheduler, steps, request.device, sigmas=sigmas, mu=mu)
        self.sigmas = pipe.scheduler.sigmas
        self.num_warmup_steps = max(len(self.timesteps)
                                    - self.num_inference_steps * pipe.scheduler.order, 0)
        pipe._num_timesteps = len(self.timesteps)
        self.guidance = None
        if pipe.transformer.config.guidance_embeds:
            self.guidance = torch.full([1], a.guidance_scale, device=request.device,
                                       dtype=torch.float32)
        if pipe._joint_attention_kwargs is None:
            pipe._joint_attention_kwargs = {}
        pipe.scheduler.set_begin_index(0)
        if self.img2img is not None:
            self._start_img2img(a.generator)
        return self.num_inference_steps

    # -- masked img2img (the face-refine pass) ----------------------------------------------------
    def _start_img2img(self, generator) -> None:
        """Keep the last ``effective_steps(T, strength)`` timesteps and start from the image
        latents noised to the first of them (``scale_noise``: sigma noise + (1 - sigma) x0)."""
        from diffusers.utils.torch_utils import randn_tensor

        from bf_core.config import effective_steps

        start, scheduler = self.img2img, self.pipe.scheduler
        skipped = self.num_inference_steps - effective_steps(self.num_inference_steps,
                                                             start.strength)
        begin = skipped * scheduler.order
        self.timesteps = self.timesteps[begin:]
        self.sigmas = self.sigmas[begin:]
        self.num_inference_steps -= skipped
        self.pipe._num_timesteps = len(self.timesteps)
        scheduler.set_begin_index(begin)
        image = start.image_latents.to(self._latents.device, self._latents.dtype)
        start.noise = randn_tensor(image.shape, generator=generator, device=image.device,
                                   dtype=image.dtype)
        self._latents = scheduler.scale_noise(image, self.timesteps[:1].repeat(image.shape[0]),
                                              start.noise)

    def _blend_outside_mask(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """Outside the mask, the image latents noised to the next step (the scheduler's step
        index already points at it), clean after the last step."""
        start = self.img2img
        image = start.image_latents.to(latents.device, latents.dtype)
        if step.index < len(self.timesteps) - 1:
            next_t = self.timesteps[step.index + 1: step.index + 2].repeat(image.shape[0])
            image = self.pipe.scheduler.scale_noise(image, next_t, start.noise)
        mask = start.mask.to(latents.device, latents.dtype)
        return (1 - mask) * image + mask * latents

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(R, 3, H, W) pixels in [-1, 1] -> packed (R, N, 64) latents, shifted and scaled as
        FLUX's img2img encodes them (the VAE's mode)."""
        vae = self.pipe.vae
        dtype = next(iter(vae.parameters())).dtype
        grid = vae.encode(images.to(self.request.device, dtype)).latent_dist.mode()
        grid = (grid - vae.config.shift_factor) * vae.config.scaling_factor
        return self.latent_layout(grid)

    def latent_layout(self, grid: torch.Tensor) -> torch.Tensor:
        """A (R, C, h, w) latent-grid tensor packed as the latents are; a one-channel mask
        is repeated to the 16 latent channels first."""
        channels = self.pipe.transformer.config.in_channels // 4
        if grid.shape[1] == 1:
            grid = grid.expand(-1, channels, -1, -1)
        rows, _, height, width = grid.shape
        return self.pipe._pack_latents(grid, rows, channels, height, width)

    def decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Final packed latents -> images, checked for NaN (the stock decode tail)."""
        grid = self.pipe._unpack_latents(latents, self.height, self.width,
                                         self.pipe.vae_scale_factor)
        return decode_flux_latents(self.pipe, grid, output_type, check=True)

    def text_ids(self, length: int) -> torch.Tensor:
        """The (L, 3) zero text ids of ``encode_prompt``, one tensor per text length."""
        if length not in self._text_ids:
            dtype = (self.pipe.text_encoder.dtype if self.pipe.text_encoder is not None
                     else self.pipe.transformer.dtype)
            self._text_ids[length] = torch.zeros(length, 3).to(device=self.request.device,
                                                              dtype=dtype)
        return self._text_ids[length]

    def line_inputs(self, conditioning: LineConditioning) -> FluxLineTensors:
        """A line's text, negative rows first with true CFG. IdAP's prepended tokens take the
        place of as many trailing T5 padding tokens when every row leaves that many."""
        embeds, negative = conditioning.prompt_embeds, conditioning.negative_prompt_embeds
        extra, padding = conditioning.prepended_tokens, conditioning.trailing_padding
        if extra and padding is not None and padding >= extra:
            embeds = embeds[:, : embeds.shape[1] - extra]
            negative = None if negative is None else negative[:, : negative.shape[1] - extra]
        pooled = conditioning.pooled
        if self.request.do_cfg:
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([conditioning.negative_pooled, pooled])
        device = self.request.device
        return FluxLineTensors(embeds.to(device), pooled.to(device))

    def same_negative(self, a: FluxLineTensors, b: FluxLineTensors) -> bool:
        rows = self.request.num_rows
        return (a.embeds.shape == b.embeds.shape and torch.equal(a.embeds[:rows], b.embeds[:rows])
                and torch.equal(a.pooled[:rows], b.pooled[:rows]))

    def initial_latents(self) -> torch.Tensor:
        return self._latents

    # -- the loop --------------------------------------------------------------------------------
    def progress(self):
        return self.pipe.progress_bar(total=self.num_inference_steps)

    def steps(self):
        for index, timestep in enumerate(self.timesteps):
            self.pipe._current_timestep = timestep
            yield Step(index, timestep)
        self.pipe._current_timestep = None

    def interrupted(self) -> bool:
        return bool(self.pipe.interrupt)

    def cfg_active(self) -> bool:
        return self.request.do_cfg

    def model_input(self, latents: torch.Tensor, step: Step, cfg: bool) -> torch.Tensor:
        return torch.cat([latents] * 2) if cfg else latents  # flow matching scales nothing

    def rows(self, line: Line, inputs: FluxLineTensors, sample: torch.Tensor, step: Step,
             cfg: bool, shares_negative: bool, line_index: int = 0) -> FluxRowBatch:
        current = inputs
        if line is not Line.ID and self._embeds_override is not None:
            current = FluxLineTensors(self._embeds_override.repeat(2 if cfg else 1, 1, 1),
                                      inputs.pooled)
        if line is not Line.ID:
            self._semantic_embeds = current.embeds[-self.request.num_rows:]
        branches = BOTH_BRANCHES if cfg else POSITIVE_ONLY
        if shares_negative:  # only the positive rows run; the semantic line's negative is reused
            current, sample = current.cond_half(), sample[self.request.num_rows:]
            branches = POSITIVE_ONLY
        return FluxRowBatch(line, step.index, step.timestep, sample, branches, current.embeds,
                            current.pooled, line_index=line_index)

    def merge(self, batches: list[FluxRowBatch]) -> FluxRowBatch | None:
        return merge_flux_batches(batches)

    def split(self, output: torch.Tensor, merged: FluxRowBatch) -> list[torch.Tensor]:
        return list(output.split([part.rows for part in merged.parts]))

    def cfg_branches(self, output: torch.Tensor, cfg: bool):
        if not cfg:
            return None, output
        uncond, cond = output.chunk(2)
        return uncond, cond

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """True CFG as the stock call writes it: neg + s (cond - neg)."""
        if uncond is None:
            return cond
        return uncond + self.arguments.true_cfg_scale * (cond - uncond)

    @property
    def guidance_scale(self) -> float:
        return self.arguments.true_cfg_scale

    def fusion_layout(self, prediction: torch.Tensor) -> torch.Tensor:
        """(R, N, 64) packed -> (R, 16, h, w) on the latent grid."""
        return self.pipe._unpack_latents(prediction, self.height, self.width,
                                         self.pipe.vae_scale_factor)

    def from_fusion_layout(self, prediction: torch.Tensor) -> torch.Tensor:
        rows, channels, height, width = prediction.shape
        return self.pipe._pack_latents(prediction, rows, channels, height, width)

    def x0_estimate(self, batch: FluxRowBatch, guided: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma v (the flow-matching forward process x_t = sigma noise +
        (1 - sigma) x0), on the latent grid."""
        sigma = self.sigmas[batch.step_index].to(guided.device, torch.float32)
        x_t = batch.sample[:batch.rows_per_branch].float()
        return self.fusion_layout(x_t - sigma * guided.float())

    def preview_images(self, x0: torch.Tensor) -> list[Any]:
        return decode_flux_latents(self.pipe, x0.to(self.pipe.vae.dtype), "pil")

    def scheduler_step(self, noise: torch.Tensor, step: Step, latents: torch.Tensor) -> torch.Tensor:
        dtype = latents.dtype
        latents = self.pipe.scheduler.step(noise, step.timestep, latents, return_dict=False)[0]
        if latents.dtype != dtype and torch.backends.mps.is_available():
            latents = latents.to(dtype)
        if self.img2img is not None:
            latents = self._blend_outside_mask(step, latents)
        return latents

    def end_of_step(self, step: Step, latents: torch.Tensor, progress: Any) -> torch.Tensor:
        a, i = self.arguments, step.index
        if a.callback_on_step_end is not None:
            values = {"latents": latents, "prompt_embeds": self._semantic_embeds}
            outputs = a.callback_on_step_end(self.pipe, i, step.timestep,
                                             {name: values[name] for name in self.tensor_inputs})
            latents = outputs.pop("latents", latents)
            if "prompt_embeds" in outputs:  # replaces the semantic line's T5 tokens from now
                self._embeds_override = outputs.pop("prompt_embeds")
        last = i == len(self.timesteps) - 1
        if last or ((i + 1) > self.num_warmup_steps and (i + 1) % self.pipe.scheduler.order == 0):
            progress.update()
        return latents

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, latents: torch.Tensor, record: LoopRecord, backend: str,
               images: Any = None, refined: dict[str, Any] | None = None):
        """The output; ``images``: already decoded (the face-refine pass's result), given in
        the call's output type; ``refined``: the output's refine fields."""
        a = self.arguments
        if images is not None:
            image = images
        elif a.output_type == "latent":
            image = latents
        else:
            image = self.decode(latents, a.output_type)
        self.pipe.maybe_free_model_hooks()
        if not a.return_dict:
            return (image,)
        maps = torch.stack(record.fusion_maps) if record.fusion_maps else None
        lines = torch.stack(record.fusion_lines) if record.fusion_lines else None
        return BeyondFacialPipelineOutput(
            images=image, fusion_maps=maps,
            fusion_steps=record.fusion_steps if record.keep_maps else None,
            fusion_lines=lines, regions=record.regions,
            diagnostics={"backend": backend, "host": HOST_NAME, **record.diagnostics},
            **(refined or {}))


def decode_flux_latents(pipe: Any, latents: torch.Tensor, output_type: str, check: bool = False):
    """The stock decode tail on unpacked (R, 16, h, w) latents: unscale and shift, decode,
    postprocess. check: refuse a decoded image holding NaN or infinity."""
    from bf_core.hosts.sdxl import _execution_device_of

    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    latents = latents.to(_execution_device_of(vae, latents.device))
    image = vae.decode(latents, return_dict=False)[0]
    if check:
        check_decoded(image, vae.dtype)
    return pipe.image_processor.postprocess(image, output_type=output_type)


class FluxHost:
    """The FLUX.1 host family: ``FluxPipeline`` and pipelines with its components."""

    name = HOST_NAME
    recognizes_description = ("a diffusers FluxPipeline or a pipeline with its components (a "
                              "FluxTransformer2DModel, CLIP and T5 text encoders, a VAE)")

    def recognizes(self, pipe: Any) -> bool:
        return is_flux_pipeline(pipe)

    def call_keywords(self, pipe: Any) -> frozenset[str]:
        return CALL_KEYWORDS

    def open_call(self, pipe: Any, args: tuple, kwargs: Mapping[str, Any]) -> FluxCall:
        arguments, options = split_call_arguments(args, kwargs)
        return FluxCall(pipe, arguments, options)


@hookimpl
def bf_register_hosts(register) -> None:
    register(FluxHost())


# -- the base session for FLUX backends ------------------------------------------------------------
def id_negative_prompt(request: GenerationRequest):
    """The ID line's negative prompt for true CFG: the option, else the caller's."""
    options = request.backend_options
    return options.get("id_negative_prompt", request.negative_prompt)


class FluxSession(HostSession):
    """A ``BackendSession`` with the FLUX defaults: a prompt identity, text conditioning as
    the stock pipeline encodes it, nothing to switch, the stock transformer call. A backend
    subclasses it and overrides where its method differs."""

    # -- text helpers ------------------------------------------------------------------------------
    @property
    def text_length(self) -> int:
        """The call's ``max_sequence_length``: every line's T5 tokens are padded to it."""
        return self.call.arguments.max_sequence_length

    def id_text(self, id_prompt: str, variant: Hashable = None) -> LineConditioning:
        """The ID line's text: ``P_id`` (and its negative with true CFG), encoded once per
        ``variant`` (whatever else changes the text encoders' output)."""
        key = (Line.ID, id_prompt, variant)
        if key not in self._texts:
            options = self.request.backend_options
            self._texts[key] = encode_flux_text(
                self.pipe, self.request, id_prompt, max_sequence_length=self.text_length,
                negative_prompt=id_negative_prompt(self.request),
                negative_prompt_2=options.get("id_negative_prompt_2"))
        return self._texts[key]

    def scene_text(self) -> LineConditioning:
        """The caller's scene prompt as the stock pipeline encodes it, encoded once."""
        key = (Line.SEMANTIC, None)
        if key not in self._texts:
            r = self.request
            self._texts[key] = encode_flux_text(
                self.pipe, r, r.prompt, max_sequence_length=self.text_length, prompt_2=r.prompt_2, negative_prompt=r.negative_prompt,
                negative_prompt_2=r.negative_prompt_2, prompt_embeds=r.prompt_embeds,
                pooled_prompt_embeds=r.pooled_prompt_embeds,
                negative_prompt_embeds=r.negative_prompt_embeds,
                negative_pooled_prompt_embeds=r.negative_pooled_prompt_embeds)
        return self._texts[key]


