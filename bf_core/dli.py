"""Dual-Line Inference: the only denoising loop in the project.

It mirrors ``StableDiffusionXLPipeline.__call__`` step for step (so that with the method
off it reproduces the stock pipeline bit for bit), and adds, per step ``i``:

1. the semantic line's guided noise, with IdAP tokens prepended when ``i > M2``;
2. when ``i > M1``, the ID line's guided noise, fused with the semantic one by IdAF;
3. one ``scheduler.step`` on the result.

The loop knows lines, not methods: a backend session supplies each line's conditioning and
evaluates the UNet for batches of rows tagged by line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.utils import BaseOutput

from bf_core.aggregation import (
    idap_aggregate,
    idap_prepend,
    idap_query,
    idap_selection,
    load_idap_query,
)
from bf_core.config import BFConfig
from bf_core.errors import ConfigError, NonFiniteError
from bf_core.fusion import idaf
from bf_core.protocols import GenerationRequest, Identity, Line, LineConditioning, RowBatch
from bf_core.rowbatch import merge_row_batches, split_rows


@dataclass
class BeyondFacialPipelineOutput(BaseOutput):
    """Output of a wrapped call.

    images: as the stock pipeline returns them (PIL list, numpy, torch or latents).
    fusion_maps: with ``return_fusion_maps=True``, a bool tensor (S, N, 1, h, w) of where the
        ID line won at each of the S fused steps (latent resolution), else None.
    fusion_steps: the step indices of ``fusion_maps``.
    diagnostics: thresholds, UNet call counts, IdAP token selections.
    """

    images: Any
    fusion_maps: torch.Tensor | None = None
    fusion_steps: list[int] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _LineTensors:
    """One line's CFG-concatenated UNet conditioning for all its rows."""

    embeds: torch.Tensor  # (2R or R, L, D)
    text_embeds: torch.Tensor  # (2R or R, P)
    time_ids: torch.Tensor  # (2R or R, 6)

    def cond_half(self) -> _LineTensors:
        """The positive rows only (CFG switched off mid-run by a callback)."""
        half = self.embeds.shape[0] // 2
        return _LineTensors(self.embeds[half:], self.text_embeds[half:], self.time_ids[half:])


def cfg_line_tensors(cond: LineConditioning, time_ids: torch.Tensor, negative_time_ids: torch.Tensor,
                     rows: int, do_cfg: bool, device: torch.device) -> _LineTensors:
    """Concatenate a line's conditioning for a CFG batch exactly as the stock pipeline does.

    Embeddings are blocked ``[neg x R, pos x R]``; time ids are ``cat([neg, pos])`` repeated
    R times (interleaved), a diffusers quirk kept for bit-exactness.
    """
    embeds, text_embeds, ids = cond.prompt_embeds, cond.pooled, time_ids
    if do_cfg:
        embeds = torch.cat([cond.negative_prompt_embeds, embeds], dim=0)
        text_embeds = torch.cat([cond.negative_pooled, text_embeds], dim=0)
        ids = torch.cat([negative_time_ids, ids], dim=0)
    return _LineTensors(embeds.to(device), text_embeds.to(device), ids.to(device).repeat(rows, 1))


class _Predictions(list):
    """The per-batch noise predictions, remembering whether they came from one merged call."""

    merged: bool = False


def predict(session: Any, batches: list[RowBatch], batch_lines: bool) -> _Predictions:
    """Evaluate the step's rows: one merged row-masked call when the backend supports it."""
    if batch_lines and len(batches) > 1 and session.supports_row_batching(batches):
        merged = merge_row_batches(batches)
        predictions = _Predictions(split_rows(session.predict_noise([merged])[0], merged))
        predictions.merged = True
        return predictions
    return _Predictions(session.predict_noise(batches))


def guidance_rescale_of(pipe: Any) -> float:
    """The call's guidance rescale. Read from the attribute the loop sets (and a callback may
    change) rather than the ``guidance_rescale`` property, which diffusers' SDXL ControlNet
    pipelines do not have."""
    return getattr(pipe, "_guidance_rescale", 0.0) or 0.0


def same_negative_rows(a: _LineTensors, b: _LineTensors, rows: int) -> bool:
    """True when two lines' negative (first ``rows``) rows are identical tensors."""
    return (a.embeds.shape == b.embeds.shape and torch.equal(a.embeds[:rows], b.embeds[:rows])
            and torch.equal(a.text_embeds[:rows], b.text_embeds[:rows])
            and torch.equal(a.time_ids, b.time_ids))


def guide(prediction: torch.Tensor, do_cfg: bool, scale: float, rescale: float):
    """CFG as diffusers does it. Returns (guided, cond, uncond); uncond is None without CFG."""
    if not do_cfg:
        return prediction, prediction, None
    uncond, cond = prediction.chunk(2)
    guided = uncond + scale * (cond - uncond)
    if rescale > 0.0:
        guided = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
    return guided, cond, uncond


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


def idap_conditioning(cond: LineConditioning, identity: Identity, config: BFConfig,
                      rows: int, num_images_per_prompt: int) -> tuple[LineConditioning, torch.Tensor]:
    """The semantic line's conditioning with the K aggregated ID tokens prepended (eq. 12).

    Returns the new conditioning and the IdAP token selection (R, K) for diagnostics.
    """
    idap = config.idap
    dim = identity.tokens.shape[-1]
    if dim != cond.prompt_embeds.shape[-1]:
        raise ConfigError(f"IdAP: the backend's ID tokens have width D={dim} but the scene prompt's "
                          f"tokens have D={cond.prompt_embeds.shape[-1]}; T_id must live in the "
                          "UNet's cross-attention space")
    query = (load_idap_query(idap.query_file, idap.num_tokens, dim) if idap.query_file
             else idap_query(idap.num_tokens, dim, idap.seed))
    t_id = match_rows(identity.tokens, rows, num_images_per_prompt, "Identity.tokens")
    positive = idap_prepend(idap_aggregate(t_id, query, idap.temperature), cond.prompt_embeds)
    negative = None
    if cond.negative_prompt_embeds is not None:
        if idap.negative == "aggregate" and identity.negative_tokens is not None:
            t_neg = match_rows(identity.negative_tokens, rows, num_images_per_prompt,
                               "Identity.negative_tokens")
            neg_tokens = idap_aggregate(t_neg, query, idap.temperature)
        else:
            if idap.negative == "aggregate":
                warnings.warn("the backend gave no negative ID tokens; IdAP pads the negative "
                              "branch with K zero tokens", stacklevel=3)
            neg_tokens = torch.zeros_like(positive[:, : idap.num_tokens])
        negative = idap_prepend(neg_tokens, cond.negative_prompt_embeds)
    selection = idap_selection(t_id, query, idap.temperature)
    return LineConditioning(positive, cond.pooled, negative, cond.negative_pooled, cond.extra), selection


@dataclass
class LinePlan:
    """Every line's conditioning for the whole loop, fixed before the first step.

    primary: the semantic line (or the baseline line with the method off), without and with
    the IdAP tokens; id_line: the ID line, or None when it never runs; m1/m2: the thresholds.
    """

    primary_line: Line
    primary: LineConditioning
    primary_tensors: _LineTensors
    primary_tensors_idap: _LineTensors | None = None
    id_cond: LineConditioning | None = None
    id_tensors: _LineTensors | None = None
    m1: int = 0
    m2: int = 0
    rows: int = 1
    cfg_at_start: bool = True
    idaf_config: Any = None
    share_before_idap: bool = False
    share_after_idap: bool = False
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def idap_on(self, i: int) -> bool:
        return self.primary_tensors_idap is not None and i > self.m2

    def id_active(self, i: int) -> bool:
        return self.id_tensors is not None and i > self.m1

    def primary_at(self, i: int, do_cfg: bool) -> _LineTensors:
        """The primary line's tensors at step ``i`` (IdAP from M2 on; CFG halves if switched off)."""
        current = self.primary_tensors_idap if self.idap_on(i) else self.primary_tensors
        return current.cond_half() if self.cfg_at_start and not do_cfg else current

    def row_batches(self, i, t, latent_input, do_cfg, primary_now: _LineTensors,
                    timestep_cond, cross_attention_kwargs) -> list[RowBatch]:
        """The rows the UNet evaluates at step ``i``, tagged by line and CFG branch."""
        branches = ("uncond", "cond") if do_cfg else ("cond",)
        batches = [RowBatch(self.primary_line, i, t, latent_input, branches, primary_now.embeds,
                            primary_now.text_embeds, primary_now.time_ids, timestep_cond,
                            cross_attention_kwargs, self.primary)]
        if self.id_active(i):
            id_now = self.id_tensors if do_cfg or not self.cfg_at_start else self.id_tensors.cond_half()
            if self.shares_negative(i, do_cfg):  # only the ID line's positive rows run
                id_now, latent_input, branches = id_now.cond_half(), latent_input[self.rows:], ("cond",)
            batches.append(RowBatch(Line.ID, i, t, latent_input, branches, id_now.embeds,
                                    id_now.text_embeds, id_now.time_ids, timestep_cond,
                                    cross_attention_kwargs, self.id_cond))
        return batches

    def shares_negative(self, i: int, do_cfg: bool) -> bool:
        return do_cfg and (self.share_after_idap if self.idap_on(i) else self.share_before_idap)

    def combine(self, predictions, batches, do_cfg, scale, rescale):
        """Guided noise of the step: the semantic line's, fused with the ID line's by IdAF.

        Returns (noise, id_wins); id_wins is None when the ID line did not run.
        """
        noise, cond_sem, uncond_sem = guide(predictions[0], do_cfg, scale, rescale)
        if len(predictions) == 1:
            return noise, None
        id_prediction = predictions[1]
        if batches[1].branches == ("cond",) and do_cfg:  # the negative branch was shared
            id_prediction = torch.cat([uncond_sem, id_prediction])
        eps_id, cond_id, _ = guide(id_prediction, do_cfg, scale, rescale)
        saliency = {}
        if self.idaf_config.saliency == "cfg_delta":
            reference = uncond_sem if do_cfg else torch.zeros_like(cond_sem)
            saliency = {"saliency_id": scale * (cond_id - reference),
                        "saliency_sem": scale * (cond_sem - reference)}
        return idaf(eps_id, noise, self.idaf_config, **saliency)


def plan_lines(session, identity: Identity | None, config: BFConfig, request: GenerationRequest,
               primary_line: Line, line_tensors, num_steps: int) -> LinePlan:
    """Build every line's CFG tensors once, with IdAP and the negative-sharing decision."""
    primary = session.conditioning(primary_line, identity)
    plan = LinePlan(primary_line, primary, line_tensors(primary), rows=request.num_rows,
                    cfg_at_start=request.do_cfg, idaf_config=config.idaf)
    if not config.enabled:
        return plan
    plan.m1, plan.m2 = config.thresholds(num_steps)
    plan.diagnostics.update(idaf_start=plan.m1, idap_start=plan.m2)
    if config.use_idap:
        cond_idap, selection = idap_conditioning(primary, identity, config, request.num_rows,
                                                 request.num_images_per_prompt)
        plan.primary_tensors_idap = line_tensors(cond_idap)
        plan.diagnostics["idap_selection"] = selection.cpu()
    if config.use_idaf:
        plan.id_cond = session.conditioning(Line.ID, identity)
        plan.id_tensors = line_tensors(plan.id_cond)
        if config.share_negative and request.do_cfg and session.negative_shareable():
            rows = request.num_rows
            plan.share_before_idap = same_negative_rows(plan.primary_tensors, plan.id_tensors, rows)
            plan.share_after_idap = (plan.primary_tensors_idap is not None and same_negative_rows(
                plan.primary_tensors_idap, plan.id_tensors, rows))
    return plan


def _execution_device_of(module: torch.nn.Module, fallback: torch.device) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:  # diffusers < 0.42 moves latents with the pipeline's device
        return fallback
    return get_module_execution_device(module)


def decode_latents(pipe: Any, latents: torch.Tensor, output_type: str):
    """The stock pipeline's decode tail: VAE upcast, unscale, decode, watermark, postprocess."""
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
    if needs_upcasting:
        vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type)


def sdxl_time_ids(pipe: Any, primary: LineConditioning, sizes: tuple, negative_sizes: tuple):
    """SDXL's micro-conditioning ids (positive, negative) as the stock call makes them.

    sizes: (original_size, crops_coords_top_left, target_size); the negative ones are used
    only when both negative sizes are given, else the negative ids equal the positive ones.
    """
    projection_dim = (int(primary.pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)

    def ids(original, crops, target):
        return pipe._get_add_time_ids(original, crops, target, dtype=primary.prompt_embeds.dtype,
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


def run_step_callback(callback, pipe: Any, step: int, timestep, tensor_inputs: list[str],
                      overrides: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
    """``callback_on_step_end`` as the stock loop runs it; returns the (maybe new) latents.

    Returned ``prompt_embeds``/``add_text_embeds``/``add_time_ids`` replace the primary
    line's tensors for the later steps (kept in ``overrides``).
    """
    outputs = callback(pipe, step, timestep, {name: values[name] for name in tensor_inputs})
    for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
        if name in outputs:
            overrides[name] = outputs.pop(name)
    return outputs.pop("latents", values["latents"])


def _check_call(pipe, prompt, prompt_embeds, height, width, tensor_inputs) -> None:
    if height % 8 != 0 or width % 8 != 0:
        raise ConfigError(f"height and width must be divisible by 8, got {height} and {width}")
    if (prompt is None) == (prompt_embeds is None):
        raise ConfigError("give exactly one of prompt and prompt_embeds")
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


def run(
    pipe: Any,
    backend: Any,
    config: BFConfig,
    prompt: str | list[str] | None = None,
    prompt_2: str | list[str] | None = None,
    *,
    id_images: Any = None,
    id_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    denoising_end: float | None = None,
    guidance_scale: float = 5.0,
    negative_prompt: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    output_type: str = "pil",
    return_dict: bool = True,
    cross_attention_kwargs: dict[str, Any] | None = None,
    guidance_rescale: float = 0.0,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    negative_original_size: tuple[int, int] | None = None,
    negative_crops_coords_top_left: tuple[int, int] = (0, 0),
    negative_target_size: tuple[int, int] | None = None,
    clip_skip: int | None = None,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs: list[str] | None = None,
    callback=None,
    callback_steps: int | None = None,
    return_fusion_maps: bool = False,
    **backend_options: Any,
):
    """One wrapped generation; the keyword arguments are ``StableDiffusionXLPipeline``'s."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = list(callback_on_step_end.tensor_inputs)
    if num_images_per_prompt < 1:
        raise ConfigError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    original_size = original_size or (height, width)
    target_size = target_size or (height, width)
    _check_call(pipe, prompt, prompt_embeds, height, width, tensor_inputs)

    # The pipeline's own properties are read by callbacks; set them as the stock call does.
    pipe._guidance_scale = guidance_scale
    pipe._guidance_rescale = guidance_rescale
    pipe._clip_skip = clip_skip
    pipe._cross_attention_kwargs = cross_attention_kwargs
    pipe._denoising_end = denoising_end
    pipe._interrupt = False

    batch_size = _batch_size(prompt, prompt_embeds)
    device = pipe._execution_device
    request = GenerationRequest(
        prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, id_images=id_images,
        id_prompt=id_prompt, batch_size=batch_size, num_images_per_prompt=num_images_per_prompt,
        height=height, width=width, do_cfg=pipe.do_classifier_free_guidance, clip_skip=clip_skip,
        lora_scale=(cross_attention_kwargs or {}).get("scale"), device=device,
        backend_options=backend_options)
    rows = request.num_rows
    dual = config.enabled
    primary_line = Line.SEMANTIC if dual else Line.BASELINE
    diagnostics: dict[str, Any] = {"backend": backend.name, "enabled": dual, "unet_calls": 0,
                                   "unet_rows": 0}

    with backend.open_session(pipe, request, config) as session:
        identity = (session.encoder.encode(id_images, id_prompt or backend.default_id_prompt, request)
                    if dual else None)
        primary = session.conditioning(primary_line, identity)

        timesteps, num_inference_steps = retrieve_timesteps(pipe.scheduler, num_inference_steps,
                                                            device, timesteps, sigmas)
        latents = pipe.prepare_latents(rows, pipe.unet.config.in_channels, height, width,
                                       primary.prompt_embeds.dtype, device, generator, latents)
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)

        time_ids, negative_time_ids = sdxl_time_ids(
            pipe, primary, (original_size, crops_coords_top_left, target_size),
            (negative_original_size, negative_crops_coords_top_left, negative_target_size))

        lines = plan_lines(session, identity, config, request, primary_line,
                           lambda cond: cfg_line_tensors(cond, time_ids, negative_time_ids, rows,
                                                         request.do_cfg, device),
                           num_inference_steps)
        diagnostics.update(lines.diagnostics)

        timesteps, num_inference_steps = truncate_for_denoising_end(
            pipe.scheduler, timesteps, num_inference_steps, denoising_end)
        timestep_cond = guidance_embedding(pipe, guidance_scale, rows, latents)

        pipe._num_timesteps = len(timesteps)
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * pipe.scheduler.order, 0)
        overrides: dict[str, torch.Tensor] = {}
        fusion_maps, fusion_steps = [], []

        with pipe.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if pipe.interrupt:
                    continue
                do_cfg = pipe.do_classifier_free_guidance  # a callback may switch CFG off
                current = lines.primary_at(i, do_cfg)
                prompt_embeds = overrides.get("prompt_embeds", current.embeds)
                add_text_embeds = overrides.get("add_text_embeds", current.text_embeds)
                add_time_ids = overrides.get("add_time_ids", current.time_ids)

                latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                latent_model_input = pipe.scheduler.scale_model_input(latent_model_input, t)
                batches = lines.row_batches(
                    i, t, latent_model_input, do_cfg,
                    _LineTensors(prompt_embeds, add_text_embeds, add_time_ids),
                    timestep_cond, pipe.cross_attention_kwargs)
                predictions = predict(session, batches, config.batch_lines)
                diagnostics["unet_calls"] += 1 if predictions.merged else len(batches)
                diagnostics["unet_rows"] += sum(b.rows for b in batches)
                noise_pred, id_wins = lines.combine(predictions, batches, do_cfg,
                                                    pipe.guidance_scale, guidance_rescale_of(pipe))
                if id_wins is not None and return_fusion_maps:
                    fusion_maps.append(id_wins.cpu())
                    fusion_steps.append(i)

                latents_dtype = latents.dtype
                latents = pipe.scheduler.step(noise_pred, t, latents, **extra_step_kwargs,
                                              return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    latents = run_step_callback(
                        callback_on_step_end, pipe, i, t, tensor_inputs, overrides,
                        {"latents": latents, "prompt_embeds": prompt_embeds,
                         "add_text_embeds": add_text_embeds, "add_time_ids": add_time_ids})

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps
                                               and (i + 1) % pipe.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and callback_steps and i % callback_steps == 0:
                        callback(i // getattr(pipe.scheduler, "order", 1), t, latents)

    if not torch.isfinite(latents).all():
        raise NonFiniteError(
            "the final latents contain NaN or infinity. In float16 this is usually an overflow: "
            "run the UNet in float32 or bfloat16, lower guidance_scale, or check the checkpoints")
    image = decode_latents(pipe, latents, output_type)
    pipe.maybe_free_model_hooks()
    if return_fusion_maps:
        diagnostics["fusion_steps"] = fusion_steps
    if not return_dict:
        return (image,)
    maps = torch.stack(fusion_maps) if fusion_maps else None
    return BeyondFacialPipelineOutput(images=image, fusion_maps=maps,
                                      fusion_steps=fusion_steps if return_fusion_maps else None,
                                      diagnostics=diagnostics)
