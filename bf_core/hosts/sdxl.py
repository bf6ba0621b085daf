"""The SDXL host: diffusers' ``StableDiffusionXLPipeline`` family (UNet, epsilon or v
prediction, classifier-free guidance, two CLIP text encoders, SDXL micro-conditioning).

``SDXLCall`` mirrors ``StableDiffusionXLPipeline.__call__`` piece for piece, so that the one
loop with the method off reproduces the stock pipeline bit for bit: the same text
encoding, latents, time ids, CFG stacking, guidance rescale, scheduler calls, callbacks,
progress bar and decoding. The per-call pipeline properties the stock call sets
(``_guidance_scale``, ``_interrupt``, ...) are set the same way, because callbacks such as
diffusers' CFG cut-off read and write them.

For backends: ``RowBatch`` (the rows of one UNet call), ``SDXLModel`` (the stock UNet
call for such a batch), ``SDXLSession`` (a ``BackendSession`` with the SDXL defaults,
which a backend subclasses and overrides where its method differs), and the recognisers
and text helpers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
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

HOST_NAME = "sdxl"
_SDXL_ATTRIBUTES = ("unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2", "encode_prompt",
                    "prepare_latents", "_get_add_time_ids", "image_processor")
#: Options every SDXL backend takes for its ID line's text.
ID_LINE_OPTIONS = {
    "id_negative_prompt": "the ID line's negative prompt (default: the caller's)",
    "id_negative_prompt_2": "the ID line's second negative prompt",
}


# -- recognising and loading SDXL pipelines -------------------------------------------------------
def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL base UNet's architecture (stabilityai/stable-diffusion-xl-base-1.0
    unet/config.json): what real-size compatibility checks and speed runs build."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def is_sdxl_pipeline(pipe: Any) -> bool:
    """Duck-typed: does ``pipe`` look like diffusers' ``StableDiffusionXLPipeline``?"""
    if not all(hasattr(pipe, name) for name in _SDXL_ATTRIBUTES):
        return False
    unet_config = getattr(getattr(pipe, "unet", None), "config", None)
    return getattr(unet_config, "addition_embed_type", None) == "text_time"


def has_ip_adapter(pipe: Any) -> bool:
    """True when diffusers' IP-Adapter is loaded into the pipeline's UNet."""
    return getattr(getattr(pipe, "unet", None), "encoder_hid_proj", None) is not None


def load_sdxl_pipeline(base_model: str, torch_dtype=None, device: str | None = None,
                       local_files_only: bool = False):
    """``StableDiffusionXLPipeline.from_pretrained`` with a clear message when offline."""
    from diffusers import StableDiffusionXLPipeline

    from bf_core.errors import CheckpointError

    # "org/name" may be a hub id; an absolute, relative or home path can only be a folder.
    looks_local = base_model.startswith((".", "/", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(base_model)):
        raise CheckpointError(f"the SDXL base model folder {base_model!r} does not exist; give a "
                              "local diffusers SDXL folder or a hub id")
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            base_model, torch_dtype=torch_dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not load the SDXL base model {base_model!r} ({exc}). Give a local folder in "
            "diffusers layout (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, "
            "tokenizer/, tokenizer_2/, scheduler/), or a hub id with network access.") from exc
    return pipe.to(device) if device else pipe


# -- the call's arguments -------------------------------------------------------------------------
@dataclass
class SDXLCallArguments:
    """The keywords of ``StableDiffusionXLPipeline.__call__`` the wrapped call takes, with the
    stock defaults (``prompt`` and ``prompt_2`` may also be given by position)."""

    prompt: str | list[str] | None = None
    prompt_2: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    denoising_end: float | None = None
    guidance_scale: float = 5.0
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    num_images_per_prompt: int = 1
    eta: float = 0.0
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    output_type: str = "pil"
    return_dict: bool = True
    cross_attention_kwargs: dict[str, Any] | None = None
    guidance_rescale: float = 0.0
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    clip_skip: int | None = None
    callback_on_step_end: Any = None
    callback_on_step_end_tensor_inputs: list[str] | None = None
    callback: Any = None
    callback_steps: int | None = None


CALL_KEYWORDS = frozenset(f.name for f in dataclasses.fields(SDXLCallArguments))


def split_call_arguments(args: tuple, kwargs: Mapping[str, Any]
                         ) -> tuple[SDXLCallArguments, dict[str, Any]]:
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
    return SDXLCallArguments(**positional, **known), options


# -- rows of one UNet call --------------------------------------------------------------------------
@dataclass
class LineTensors:
    """One line's CFG-stacked UNet conditioning for all its rows (``HostCall.line_inputs``)."""

    embeds: torch.Tensor  # (2R or R, L, D)
    text_embeds: torch.Tensor  # (2R or R, P)
    time_ids: torch.Tensor  # (2R or R, 6)

    def cond_half(self) -> LineTensors:
        """The positive rows only (CFG switched off mid-run, or a shared negative)."""
        half = self.embeds.shape[0] // 2
        return LineTensors(self.embeds[half:], self.text_embeds[half:], self.time_ids[half:])


@dataclass
class RowBatch(RowsOfLines):
    """The rows of one UNet evaluation: one line's, or several lines' merged into one call.

    line: the line of every row, or None for a merged batch, whose ``parts`` are the
        one-line batches it holds, in row order.
    sample: (R, C, H, W), already ``scale_model_input``-scaled.
    branches: the CFG branch of each block of rows, in order, e.g. (UNCOND, COND); each
        block of a one-line batch holds ``rows_per_branch`` rows.
    encoder_hidden_states, text_embeds, time_ids: the concatenated conditioning.
    encoder_attention_mask: (R, L) 1/0 when rows of different context lengths were padded.
    line_index: which line of the call the rows belong to (one-line batches).
    """

    line: Line | None
    step_index: int
    timestep: torch.Tensor
    sample: torch.Tensor
    branches: tuple[Branch, ...]
    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    timestep_cond: torch.Tensor | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    parts: tuple[RowBatch, ...] = ()
    encoder_attention_mask: torch.Tensor | None = None
    line_index: int = 0  # 0 the semantic (or baseline) line, j person j's ID line


def pad_tokens(embeds: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (R, L, D) tokens at the end to ``length`` with zeros; return them and the mask.

    The mask (R, length) is 1 for real tokens and 0 for padding, as the UNet's
    ``encoder_attention_mask`` expects: the padded keys get exactly zero softmax weight.
    """
    rows, current, dim = embeds.shape
    mask = torch.ones(rows, length, device=embeds.device, dtype=embeds.dtype)
    if current == length:
        return embeds, mask
    padding = embeds.new_zeros(rows, length - current, dim)
    mask[:, current:] = 0
    return torch.cat([embeds, padding], dim=1), mask


def merge_row_batches(batches: Sequence[RowBatch]) -> RowBatch:
    """One batch holding every row of ``batches``, in order (``HostCall.merge``).

    Context lengths are padded to the longest with an attention mask (``pad_tokens``); the
    mask is None when all lengths agree, so no masked-attention kernel is used needlessly.
    """
    length = max(b.encoder_hidden_states.shape[1] for b in batches)
    padded = [pad_tokens(b.encoder_hidden_states, length) for b in batches]
    same_length = all(b.encoder_hidden_states.shape[1] == length for b in batches)
    first = batches[0]
    return RowBatch(
        line=None, step_index=first.step_index, timestep=first.timestep,
        sample=torch.cat([b.sample for b in batches]),
        branches=tuple(branch for b in batches for branch in b.branches),
        encoder_hidden_states=torch.cat([embeds for embeds, _ in padded]),
        text_embeds=torch.cat([b.text_embeds for b in batches]),
        time_ids=torch.cat([b.time_ids for b in batches]),
        timestep_cond=(None if first.timestep_cond is None
                       else torch.cat([b.timestep_cond for b in batches])),
        cross_attention_kwargs=first.cross_attention_kwargs, parts=tuple(batches),
        encoder_attention_mask=None if same_length else torch.cat([mask for _, mask in padded]))


def split_rows(output: torch.Tensor, merged: RowBatch) -> list[torch.Tensor]:
    """Undo ``merge_row_batches`` on the UNet output: one tensor per original batch."""
    return list(output.split([part.rows for part in merged.parts]))


class SDXLModel:
    """The stock UNet call for a ``RowBatch``; a backend adds its own inputs.

    added_cond: entries added to ``added_cond_kwargs`` (e.g. IP-Adapter ``image_embeds``);
    context: replaces ``encoder_hidden_states``; further keywords go to the UNet as they
    are (e.g. ControlNet residuals). The UNet is read from the pipeline at each call, so a
    ``pipe.unet`` swapped for a compiled one is used.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe

    def __call__(self, batch: RowBatch, *, added_cond: dict[str, Any] | None = None,
                 context: torch.Tensor | None = None, **unet_kwargs: Any) -> torch.Tensor:
        if batch.encoder_attention_mask is not None:
            unet_kwargs.setdefault("encoder_attention_mask", batch.encoder_attention_mask)
        return self.pipe.unet(
            batch.sample, batch.timestep,
            encoder_hidden_states=batch.encoder_hidden_states if context is None else context,
            timestep_cond=batch.timestep_cond, cross_attention_kwargs=batch.cross_attention_kwargs,
            added_cond_kwargs={"text_embeds": batch.text_embeds, "time_ids": batch.time_ids,
                               **(added_cond or {})},
            return_dict=False, **unet_kwargs)[0]


# -- SDXL pieces of the stock call ------------------------------------------------------------------
def cfg_line_tensors(cond: LineConditioning, time_ids: torch.Tensor, negative_time_ids: torch.Tensor,
                     rows: int, do_cfg: bool, device: torch.device) -> LineTensors:
    """Concatenate a line's conditioning for a CFG batch exactly as the stock pipeline does.

    Embeddings are blocked ``[neg x R, pos x R]``; time ids are ``cat([neg, pos])`` repeated
    R times (interleaved), a diffusers quirk kept for bit-exactness.
    """
    embeds, text_embeds, ids = cond.prompt_embeds, cond.pooled, time_ids
    if do_cfg:
        embeds = torch.cat([cond.negative_prompt_embeds, embeds], dim=0)
        text_embeds = torch.cat([cond.negative_pooled, text_embeds], dim=0)
        ids = torch.cat([negative_time_ids, ids], dim=0)
    return LineTensors(embeds.to(device), text_embeds.to(device), ids.to(device).repeat(rows, 1))


def same_negative_rows(a: LineTensors, b: LineTensors, rows: int) -> bool:
    """True when two lines' negative (first ``rows``) rows are identical tensors."""
    return (a.embeds.shape == b.embeds.shape and torch.equal(a.embeds[:rows], b.embeds[:rows])
            and torch.equal(a.text_embeds[:rows], b.text_embeds[:rows])
            and torch.equal(a.time_ids, b.time_ids))


def guidance_rescale_of(pipe: Any) -> float:
    """The call's guidance rescale. Read from the attribute the call sets (and a callback may
    change) rather than the ``guidance_rescale`` property, which diffusers' SDXL ControlNet
    pipelines do not have."""
    return getattr(pipe, "_guidance_rescale", 0.0) or 0.0


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
                             rescale: float) -> torch.Tensor:
    """CFG as diffusers does it: uncond + s (cond - uncond), then the guidance rescale."""
    if uncond is None:
        return cond
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        rescale_noise_cfg,
    )

    guided = uncond + scale * (cond - uncond)
    if rescale > 0.0:
        guided = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
    return guided


def sdxl_time_ids(pipe: Any, semantic: LineConditioning, sizes: tuple, negative_sizes: tuple):
    """SDXL's micro-conditioning ids (positive, negative) as the stock call makes them.

    sizes: (original_size, crops_coords_top_left, target_size); the negative ones are used
    only when both negative sizes are given, else the negative ids equal the positive ones.
    """
    projection_dim = (int(semantic.pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)

    def ids(original, crops, target):
        return pipe._get_add_time_ids(original, crops, target, dtype=semantic.prompt_embeds.dtype,
                                      text_encoder_projection_dim=projection_dim)

    time_ids = ids(*sizes)
    negative_original, _, negative_target = negative_sizes
    if negative_original is not None and negative_target is not None:
        return time_ids, ids(*negative_sizes)
    return time_ids, time_ids


def truncate_for_denoising_end(scheduler: Any, timesteps, num_steps: int,
                               denoising_end: float | None):
    """Keep the timesteps before ``denoising_end`` (a fraction in (0, 1)), as the stock call."""
    if not (isinstance(denoising_end, float) and 0 < denoising_end < 1):
        return timesteps, num_steps
    train_steps = scheduler.config.num_train_timesteps
    cutoff = int(round(train_steps - denoising_end * train_steps))
    num_steps = len([ts for ts in timesteps if ts >= cutoff])
    return timesteps[:num_steps], num_steps


def guidance_embedding(pipe: Any, guidance_scale: float, rows: int, latents: torch.Tensor):
    """The guidance-scale embedding of distilled (LCM-style) UNets; None for SDXL base."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    scale = torch.tensor(guidance_scale - 1).repeat(rows)
    return pipe.get_guidance_scale_embedding(scale, embedding_dim=dim).to(
        device=latents.device, dtype=latents.dtype)


def _execution_device_of(module: torch.nn.Module, fallback: torch.device) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:  # diffusers < 0.42 moves latents with the pipeline's device
        return fallback
    return get_module_execution_device(module)


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str, check: bool = False):
    """The stock pipeline's decode tail: VAE upcast, unscale, decode, watermark, postprocess.

    check: refuse a decoded image holding NaN or infinity (``bf_core.finite.check_decoded``).
    """
    if output_type == "latent":
        return latents
    vae = pipe.vae
    needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
    if needs_upcasting:
        vae.to(dtype=torch.float32)  # what the deprecated ``upcast_vae`` does
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    elif latents.dtype != vae.dtype and torch.backends.mps.is_available():
        pipe.vae = vae = vae.to(latents.dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    latents = latents.to(_execution_device_of(vae, latents.device))
    image = vae.decode(latents, return_dict=False)[0]
    if check:
        check_decoded(image, vae.dtype)
    if needs_upcasting:
        vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type)


def alpha_bar_at(scheduler: Any, timestep: torch.Tensor) -> float | None:
    """The scheduler's cumulative alpha at ``timestep``, or None if it keeps none."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    index = int(torch.as_tensor(timestep).float().round().clamp(0, len(alphas) - 1))
    return float(alphas[index])


def x0_from_prediction(sample: torch.Tensor, model_output: torch.Tensor, alpha_bar: float,
                       prediction_type: str) -> torch.Tensor | None:
    """The clean-latent estimate from a guided prediction, (R, C, h, w) -> (R, C, h, w).

    ``sample`` is the scheduler-scaled model input, which is in variance-preserving form
    (x_in = sqrt(a) x0 + sqrt(1 - a) eps) for DDIM-like and Euler-like schedulers alike.
    None for a prediction type it cannot read.
    """
    a = torch.tensor(alpha_bar, dtype=torch.float32)
    x_in, out = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        return (x_in - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_in - (1 - a).sqrt() * out
    if prediction_type == "sample":
        return out
    return None


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def native_size(pipe: Any) -> int:
    """The side in pixels an SDXL pipeline draws when the caller gives no size.

    ``StableDiffusionXLPipeline`` reads its ``default_sample_size`` from the UNet's
    ``sample_size`` (128 when the config has none). The SDXL ControlNet pipeline classes
    have no ``default_sample_size`` (they size the picture by the control image, which a
    backend draws at the call's size), so the UNet's value is read here directly."""
    sample_size = getattr(pipe, "default_sample_size", None)
    if sample_size is None:
        sample_size = getattr(pipe.unet.config, "sample_size", None) or 128
    return int(sample_size * pipe.vae_scale_factor)


def _check_prompts(arguments: SDXLCallArguments) -> None:
    """Prompts are a string or a non-empty list of strings; lists agree on the batch."""
    if (arguments.prompt is None) == (arguments.prompt_embeds is None):
        raise ConfigError("give exactly one of prompt and prompt_embeds")
    batch = None
    for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
        value = getattr(arguments, name)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, (list, tuple)) or not value \
                or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{name} must be a string or a non-empty list of strings, got "
                              f"{type(value).__name__} {value!r:.60}")
        if batch is not None and len(value) != batch:
            raise ConfigError(f"{name} has {len(value)} entries but the batch has {batch} "
                              "prompts; give one per prompt, or one string for all")
        batch = len(value) if batch is None else batch


def _check_int(name: str, value: Any, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(f"{name} must be an int >= {lowest}, got {value!r}")


def _check_number(name: str, value: Any, lowest: float, highest: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not lowest <= value <= highest:
        raise ConfigError(f"{name} must be a finite number in [{lowest:g}, {highest:g}], "
                          f"got {value!r}")


def _check_call(pipe, arguments: SDXLCallArguments, height: int, width: int,
                tensor_inputs: list[str]) -> None:
    """The call's arguments, refused with a named error before anything runs."""
    _check_prompts(arguments)
    for name, value in (("height", height), ("width", width)):
        _check_int(name, value, 8)
        if value % 8:
            raise ConfigError(f"height and width must be divisible by 8, got {height} and {width}")
    if arguments.timesteps is None and arguments.sigmas is None:
        _check_int("num_inference_steps", arguments.num_inference_steps, 1)
    _check_int("num_images_per_prompt", arguments.num_images_per_prompt, 1)
    _check_number("guidance_scale", arguments.guidance_scale, 0.0, 1e3)
    _check_number("guidance_rescale", arguments.guidance_rescale, 0.0, 1.0)
    _check_number("eta", arguments.eta, 0.0, 1.0)
    if arguments.output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {OUTPUT_TYPES}, got {arguments.output_type!r}")
    allowed = set(getattr(pipe, "_callback_tensor_inputs", ()))
    unknown = [name for name in tensor_inputs if name not in allowed]
    if unknown:
        raise ConfigError(f"callback_on_step_end_tensor_inputs has {unknown}; allowed: {sorted(allowed)}")


def _batch_size(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def _callback_tensor_inputs(arguments: SDXLCallArguments) -> list[str]:
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(arguments.callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        return list(arguments.callback_on_step_end.tensor_inputs)
    return list(arguments.callback_on_step_end_tensor_inputs or ["latents"])


# -- one call ---------------------------------------------------------------------------------------
class SDXLCall:
    """``HostCall`` for an SDXL pipeline: one wrapped call, as the stock ``__call__`` runs it."""

    def __init__(self, pipe: Any, arguments: SDXLCallArguments, options: dict[str, Any]):
        self.pipe, self.arguments = pipe, arguments
        self.tensor_inputs = _callback_tensor_inputs(arguments)
        self.native_size = native_size(pipe)
        self.height = size_or_native(arguments.height, self.native_size)
        self.width = size_or_native(arguments.width, self.native_size)
        _check_call(pipe, arguments, self.height, self.width, self.tensor_inputs)
        self._set_pipeline_properties()
        self.request = self._request(options)
        self.model = SDXLModel(pipe)
        self.img2img: MaskedImg2Img | None = None  # set before ``prepare`` by the refine pass
        # Set by ``prepare``; the semantic line's tensors a callback sees and may replace.
        self._latents: torch.Tensor | None = None
        self._semantic_now: LineTensors | None = None
        self._overrides: dict[str, torch.Tensor] = {}

    def _set_pipeline_properties(self) -> None:
        # The stock call's per-call properties: callbacks read them, and some change them.
        pipe, arguments = self.pipe, self.arguments
        pipe._guidance_scale = arguments.guidance_scale
        pipe._guidance_rescale = arguments.guidance_rescale
        pipe._clip_skip = arguments.clip_skip
        pipe._cross_attention_kwargs = arguments.cross_attention_kwargs
        pipe._denoising_end = arguments.denoising_end
        pipe._interrupt = False

    def _request(self, options: dict[str, Any]) -> GenerationRequest:
        a = self.arguments
        return GenerationRequest(
            prompt=a.prompt, prompt_2=a.prompt_2, negative_prompt=a.negative_prompt,
            negative_prompt_2=a.negative_prompt_2, prompt_embeds=a.prompt_embeds,
            negative_prompt_embeds=a.negative_prompt_embeds,
            pooled_prompt_embeds=a.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=a.negative_pooled_prompt_embeds,
            batch_size=_batch_size(a.prompt, a.prompt_embeds),
            num_images_per_prompt=a.num_images_per_prompt, height=self.height, width=self.width,
            do_cfg=self.pipe.do_classifier_free_guidance, clip_skip=a.clip_skip,
            lora_scale=(a.cross_attention_kwargs or {}).get("scale"),
            device=self.pipe._execution_device, backend_options=options)

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self, semantic: LineConditioning) -> int:
        """Timesteps, latents, step keywords and time ids, in the stock call's order."""
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
            retrieve_timesteps,
        )

        pipe, a, request = self.pipe, self.arguments, self.request
        timesteps, num_steps = retrieve_timesteps(pipe.scheduler, a.num_inference_steps,
                                                  request.device, a.timesteps, a.sigmas)
        self._latents = pipe.prepare_latents(
            request.num_rows, pipe.unet.config.in_channels, self.height, self.width,
            semantic.prompt_embeds.dtype, request.device, a.generator, a.latents)
        self.extra_step_kwargs = pipe.prepare_extra_step_kwargs(a.generator, a.eta)
        size = (self.height, self.width)
        self.time_ids, self.negative_time_ids = sdxl_time_ids(
            pipe, semantic, (a.original_size or size, a.crops_coords_top_left, a.target_size or size),
            (a.negative_original_size, a.negative_crops_coords_top_left, a.negative_target_size))
        self.timesteps, self.num_inference_steps = truncate_for_denoising_end(
            pipe.scheduler, timesteps, num_steps, a.denoising_end)
        self.timestep_cond = guidance_embedding(pipe, a.guidance_scale, request.num_rows,
                                                self._latents)
        pipe._num_timesteps = len(self.timesteps)
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        if self.img2img is not None:
            self._start_img2img(a.generator)
        self.num_warmup_steps = max(len(self.timesteps)
                                    - self.num_inference_steps * pipe.scheduler.order, 0)
        return num_steps

    def line_inputs(self, conditioning: LineConditioning) -> LineTensors:
        return cfg_line_tensors(conditioning, self.time_ids, self.negative_time_ids,
                                self.request.num_rows, self.request.do_cfg, self.request.device)

    def same_negative(self, a: LineTensors, b: LineTensors) -> bool:
        return same_negative_rows(a, b, self.request.num_rows)

    def initial_latents(self) -> torch.Tensor:
        return self._latents

    # -- masked img2img (the face-refine pass) ----------------------------------------------------
    def _start_img2img(self, generator) -> None:
        """Keep the last ``effective_steps(T, strength)`` timesteps and start from the image
        latents noised to the first of them."""
        from diffusers.utils.torch_utils import randn_tensor

        from bf_core.config import effective_steps

        start = self.img2img
        order = self.pipe.scheduler.order
        skipped = self.num_inference_steps - effective_steps(self.num_inference_steps,
                                                             start.strength)
        self.timesteps = self.timesteps[skipped * order:]
        self.num_inference_steps -= skipped
        self.pipe._num_timesteps = len(self.timesteps)
        if hasattr(self.pipe.scheduler, "set_begin_index"):  # the noise level of the start
            self.pipe.scheduler.set_begin_index(skipped * order)
        image = start.image_latents.to(self._latents.device, self._latents.dtype)
        start.noise = randn_tensor(image.shape, generator=generator, device=image.device,
                                   dtype=image.dtype)
        self._latents = self.pipe.scheduler.add_noise(image, start.noise,
                                                      self.timesteps[:1].repeat(image.shape[0]))

    def _blend_outside_mask(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """Outside the mask, the image latents noised to the next step (clean after the last)."""
        start = self.img2img
        image = start.image_latents.to(latents.device, latents.dtype)
        if step.index < len(self.timesteps) - 1:
            next_t = self.timesteps[step.index + 1: step.index + 2].repeat(image.shape[0])
            image = self.pipe.scheduler.add_noise(image, start.noise, next_t)
        mask = start.mask.to(latents.device, latents.dtype)
        return (1 - mask) * image + mask * latents

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(R, 3, H, W) pixels in [-1, 1] -> (R, 4, h, w) scaled latents (the VAE's mode, as
        diffusers' img2img encodes an image, upcast when the VAE asks)."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        dtype = next(iter(vae.parameters())).dtype
        try:
            latents = vae.encode(images.to(self.request.device, dtype)).latent_dist.mode()
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            return (latents - mean) * vae.config.scaling_factor / std
        return latents * vae.config.scaling_factor

    def latent_layout(self, grid: torch.Tensor) -> torch.Tensor:
        """A (R, C, h, w) latent-grid tensor in the host's latent layout: SDXL's is the grid."""
        return grid

    def decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Final latents -> images, checked for NaN (the stock decode tail)."""
        return decode_latents(self.pipe, latents, output_type, check=True)

    # -- the loop --------------------------------------------------------------------------------
    def progress(self):
        return self.pipe.progress_bar(total=self.num_inference_steps)

    def steps(self) -> Iterator[Step]:
        for index, timestep in enumerate(self.timesteps):
            yield Step(index, timestep)

    def interrupted(self) -> bool:
        return bool(self.pipe.interrupt)

    def cfg_active(self) -> bool:
        return bool(self.pipe.do_classifier_free_guidance)

    def model_input(self, latents: torch.Tensor, step: Step, cfg: bool) -> torch.Tensor:
        sample = torch.cat([latents] * 2) if cfg else latents
        return self.pipe.scheduler.scale_model_input(sample, step.timestep)

    def rows(self, line: Line, inputs: LineTensors, sample: torch.Tensor, step: Step, cfg: bool,
             shares_negative: bool, line_index: int = 0) -> RowBatch:
        current = inputs.cond_half() if self.request.do_cfg and not cfg else inputs
        if line is not Line.ID:
            current = self._semantic_with_overrides(current)
        branches = BOTH_BRANCHES if cfg else POSITIVE_ONLY
        if shares_negative:  # only the positive rows run; the semantic line's negative is reused
            current, sample = current.cond_half(), sample[self.request.num_rows:]
            branches = POSITIVE_ONLY
        return RowBatch(line, step.index, step.timestep, sample, branches, current.embeds,
                        current.text_embeds, current.time_ids, self.timestep_cond,
                        self.pipe.cross_attention_kwargs, line_index=line_index)

    def _semantic_with_overrides(self, current: LineTensors) -> LineTensors:
        """A callback's returned ``prompt_embeds`` / ``add_text_embeds`` / ``add_time_ids``
        replace the semantic line's tensors for the later steps, as in the stock loop."""
        overrides = self._overrides
        self._semantic_now = LineTensors(overrides.get("prompt_embeds", current.embeds),
                                         overrides.get("add_text_embeds", current.text_embeds),
                                         overrides.get("add_time_ids", current.time_ids))
        return self._semantic_now

    def merge(self, batches: list[RowBatch]) -> RowBatch:
        return merge_row_batches(batches)

    def split(self, output: torch.Tensor, merged: RowBatch) -> list[torch.Tensor]:
        return split_rows(output, merged)

    def cfg_branches(self, output: torch.Tensor, cfg: bool):
        if not cfg:
            return None, output
        uncond, cond = output.chunk(2)
        return uncond, cond

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        return classifier_free_guidance(cond, uncond, self.pipe.guidance_scale,
                                        guidance_rescale_of(self.pipe))

    @property
    def guidance_scale(self) -> float:
        return self.pipe.guidance_scale

    def fusion_layout(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction  # the UNet's output is already (N, C, H, W) on the latent grid

    def from_fusion_layout(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction

    def x0_estimate(self, batch: RowBatch, guided: torch.Tensor) -> torch.Tensor | None:
        alpha_bar = alpha_bar_at(self.pipe.scheduler, batch.timestep)
        if alpha_bar is None:
            return None
        prediction_type = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        return x0_from_prediction(batch.sample[:batch.rows_per_branch], guided, alpha_bar,
                                  prediction_type)

    def preview_images(self, x0: torch.Tensor) -> list[Any]:
        return decode_latents(self.pipe, x0.to(self.pipe.vae.dtype), "pil")

    def scheduler_step(self, noise: torch.Tensor, step: Step, latents: torch.Tensor) -> torch.Tensor:
        dtype = latents.dtype
        latents = self.pipe.scheduler.step(noise, step.timestep, latents, **self.extra_step_kwargs,
                                           return_dict=False)[0]
        if latents.dtype != dtype and torch.backends.mps.is_available():
            latents = latents.to(dtype)
        if self.img2img is not None:
            latents = self._blend_outside_mask(step, latents)
        return latents

    def end_of_step(self, step: Step, latents: torch.Tensor, progress: Any) -> torch.Tensor:
        a, i = self.arguments, step.index
        if a.callback_on_step_end is not None:
            latents = self._run_step_callback(step, latents)
        last = i == len(self.timesteps) - 1
        if last or ((i + 1) > self.num_warmup_steps and (i + 1) % self.pipe.scheduler.order == 0):
            progress.update()
            if a.callback is not None and a.callback_steps and i % a.callback_steps == 0:
                a.callback(i // getattr(self.pipe.scheduler, "order", 1), step.timestep, latents)
        return latents

    def _run_step_callback(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """``callback_on_step_end`` as the stock loop runs it; returns the (maybe new) latents."""
        now = self._semantic_now
        values = {"latents": latents, "prompt_embeds": now.embeds,
                  "add_text_embeds": now.text_embeds, "add_time_ids": now.time_ids}
        outputs = self.arguments.callback_on_step_end(
            self.pipe, step.index, step.timestep, {name: values[name] for name in self.tensor_inputs})
        for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
            if name in outputs:
                self._overrides[name] = outputs.pop(name)
        return outputs.pop("latents", latents)

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, latents: torch.Tensor, record: LoopRecord, backend: str,
               images: Any = None, refined: dict[str, Any] | None = None):
        """The output; ``images``: already decoded (numpy, the face-refine pass's result),
        given in the call's output type; ``refined``: the output's refine fields."""
        image = (decode_latents(self.pipe, latents, self.arguments.output_type, check=True)
                 if images is None else images)
        self.pipe.maybe_free_model_hooks()
        if not self.arguments.return_dict:
            return (image,)
        maps = torch.stack(record.fusion_maps) if record.fusion_maps else None
        lines = torch.stack(record.fusion_lines) if record.fusion_lines else None
        return BeyondFacialPipelineOutput(
            images=image, fusion_maps=maps,
            fusion_steps=record.fusion_steps if record.keep_maps else None,
            fusion_lines=lines, regions=record.regions,
            diagnostics={"backend": backend, **record.diagnostics}, **(refined or {}))


class SDXLHost:
    """The SDXL host family: ``StableDiffusionXLPipeline`` and pipelines shaped like it
    (SDXL ControlNet pipelines, the official PhotoMaker and InstantID pipelines)."""

    name = HOST_NAME
    recognizes_description = ("a diffusers StableDiffusionXLPipeline or a pipeline with its "
                              "components (a text-time UNet, two CLIP text encoders, a VAE)")

    def recognizes(self, pipe: Any) -> bool:
        return is_sdxl_pipeline(pipe)

    def call_keywords(self, pipe: Any) -> frozenset[str]:
        return CALL_KEYWORDS

    def open_call(self, pipe: Any, args: tuple, kwargs: Mapping[str, Any]) -> SDXLCall:
        arguments, options = split_call_arguments(args, kwargs)
        return SDXLCall(pipe, arguments, options)


@hookimpl
def bf_register_hosts(register) -> None:
    register(SDXLHost())


# -- the base session for SDXL backends ------------------------------------------------------------
def _broadcast_prompt(value: str | list[str] | None, batch_size: int, what: str):
    if value is None or isinstance(value, str):
        return value
    if len(value) != batch_size:
        raise ConfigError(f"{what} has {len(value)} entries but the batch has {batch_size} prompts")
    return list(value)


def encode_line_text(
    pipe: Any,
    request: GenerationRequest,
    prompt: str | list[str] | None,
    *,
    prompt_2: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
) -> LineConditioning:
    """Encode one line's prompt exactly as ``StableDiffusionXLPipeline.__call__`` does.

    A single string prompt is repeated to the request's batch size, so that an ID prompt
    serves every scene prompt of a batch. Returns embeds of R = batch * images-per-prompt rows.
    """
    if isinstance(prompt, str) and request.batch_size > 1:
        prompt = [prompt] * request.batch_size
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=_broadcast_prompt(prompt_2, request.batch_size, "prompt_2"),
        device=request.device, num_images_per_prompt=request.num_images_per_prompt,
        do_classifier_free_guidance=request.do_cfg, negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        lora_scale=request.lora_scale, clip_skip=request.clip_skip)
    return LineConditioning(prompt_embeds=embeds, pooled=pooled,
                            negative_prompt_embeds=negative if request.do_cfg else None,
                            negative_pooled=negative_pooled if request.do_cfg else None)


def encode_user_prompt(pipe: Any, request: GenerationRequest) -> LineConditioning:
    """The caller's own prompt (and embeds, if given), as the stock pipeline encodes it."""
    return encode_line_text(
        pipe, request, request.prompt, prompt_2=request.prompt_2,
        negative_prompt=request.negative_prompt, negative_prompt_2=request.negative_prompt_2,
        prompt_embeds=request.prompt_embeds, negative_prompt_embeds=request.negative_prompt_embeds,
        pooled_prompt_embeds=request.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=request.negative_pooled_prompt_embeds)


def id_negative_prompt(request: GenerationRequest) -> Any:
    """The ID line's negative prompt: the ``id_negative_prompt`` option, else the caller's
    (a string serves every prompt; a list gives one per prompt)."""
    negative = request.backend_options.get("id_negative_prompt", request.negative_prompt)
    if isinstance(negative, (list, tuple)) and len(negative) != request.batch_size:
        raise ConfigError(f"id_negative_prompt has {len(negative)} entries but the batch has "
                          f"{request.batch_size} prompts; give one per prompt, or one string")
    if negative is not None and not isinstance(negative, (str, list, tuple)):
        raise ConfigError(f"id_negative_prompt must be a string or a list of strings, got "
                          f"{type(negative).__name__}")
    return negative


class SDXLSession(HostSession):
    """A ``BackendSession`` with the SDXL defaults: a prompt identity, text conditioning as the
    stock pipeline encodes it, no machinery to switch, the stock UNet call.

    A backend subclasses it and overrides the ``BackendSession`` methods where its method
    differs; ``id_text`` and ``scene_text`` are helpers, each line's text encoded once.
    """

    # -- text helpers ------------------------------------------------------------------------------
    def id_text(self, id_prompt: str, variant: Hashable = None) -> LineConditioning:
        """The ID line's text: ``P_id`` with the ID line's negative prompt, encoded once.

        variant: whatever else changes the text encoders' output for this line (the LoRA
        adapters a person's line keeps on), so that each variant is encoded once."""
        key = (Line.ID, id_prompt, variant)
        if key not in self._texts:
            options = self.request.backend_options
            self._texts[key] = encode_line_text(
                self.pipe, self.request, id_prompt, negative_prompt=id_negative_prompt(self.request),
                negative_prompt_2=options.get("id_negative_prompt_2"))
        return self._texts[key]

    def scene_text(self) -> LineConditioning:
        """The caller's scene prompt as the stock pipeline encodes it, encoded once."""
        key = (Line.SEMANTIC, None)
        if key not in self._texts:
            self._texts[key] = encode_user_prompt(self.pipe, self.request)
        return self._texts[key]
