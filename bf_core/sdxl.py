"""Shared SDXL plumbing for backends: recognising a diffusers SDXL pipeline, encoding a
line's text the way the stock pipeline does, and a base session with the default UNet call.

A backend subclasses ``SDXLSession`` and overrides only what its method changes: the
identity encoder, a line's conditioning, the per-line model state (``line_state``) and the
extra UNet inputs (``added_cond_kwargs``, ``unet_extra_kwargs``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from bf_core.protocols import (
    GenerationRequest,
    Identity,
    IdentityEncoder,
    Line,
    LineConditioning,
    RowBatch,
)

_SDXL_ATTRIBUTES = ("unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2", "encode_prompt",
                    "prepare_latents", "_get_add_time_ids", "image_processor")


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


def _broadcast_prompt(value: str | list[str] | None, batch_size: int, what: str):
    if value is None or isinstance(value, str):
        return value
    if len(value) != batch_size:
        raise ValueError(f"{what} has {len(value)} entries but the batch has {batch_size} prompts")
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
        prompt=prompt,
        prompt_2=_broadcast_prompt(prompt_2, request.batch_size, "prompt_2"),
        device=request.device,
        num_images_per_prompt=request.num_images_per_prompt,
        do_classifier_free_guidance=request.do_cfg,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        lora_scale=request.lora_scale,
        clip_skip=request.clip_skip,
    )
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


class PromptIdentityEncoder:
    """Identity carried by a prompt: T_id is the ID line's own prompt embedding.

    Used by prompt-trigger methods (DreamBooth, textual inversion, a text description).
    """

    def __init__(self, session: SDXLSession):
        self.session = session

    def encode(self, id_images: Sequence[Any] | None, id_prompt: str,
               request: GenerationRequest) -> Identity:
        conditioning = self.session.conditioning(Line.ID, None)
        return Identity(tokens=conditioning.prompt_embeds,
                        negative_tokens=conditioning.negative_prompt_embeds)


class SDXLSession:
    """Base ``BackendSession`` for diffusers SDXL pipelines.

    Subclasses set ``encoder`` and override ``identity_state`` / ``line_state`` /
    ``added_cond_kwargs`` / ``unet_extra_kwargs`` / ``id_line_text``.
    State restore: ``__enter__`` opens an ``ExitStack``; anything registered on
    ``self.restore_stack`` (``callback`` or ``enter_context``) is undone on ``__exit__``.
    """

    def __init__(self, backend: Any, pipe: Any, request: GenerationRequest, config: Any):
        self.backend = backend
        self.pipe = pipe
        self.request = request
        self.config = config
        self.restore_stack = ExitStack()
        self.encoder: IdentityEncoder = PromptIdentityEncoder(self)
        self._conditioning_cache: dict[Line, LineConditioning] = {}

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> SDXLSession:
        self.restore_stack.__enter__()
        try:
            self.setup()
        except BaseException:
            self.restore_stack.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore_stack.__exit__(*exc_info)

    def setup(self) -> None:
        """Capture state that the session will change; register its restore."""

    # -- conditioning -------------------------------------------------------------------
    @property
    def id_prompt(self) -> str:
        return self.request.id_prompt or self.backend.default_id_prompt

    def id_line_text(self) -> LineConditioning:
        """The ID line's text: ``P_id`` with the ID line's negative prompt."""
        options = self.request.backend_options
        negative = options.get("id_negative_prompt", self.request.negative_prompt)
        if isinstance(negative, list) and self.request.batch_size != len(negative):
            negative = negative[0]
        return encode_line_text(self.pipe, self.request, self.id_prompt, negative_prompt=negative,
                                negative_prompt_2=options.get("id_negative_prompt_2"))

    def semantic_line_text(self) -> LineConditioning:
        """The semantic line's text: the caller's scene prompt."""
        return encode_user_prompt(self.pipe, self.request)

    def conditioning(self, line: Line, identity: Identity | None) -> LineConditioning:
        if line not in self._conditioning_cache:
            with self.text_state(line):
                if line is Line.ID:
                    self._conditioning_cache[line] = self.id_line_text()
                else:
                    self._conditioning_cache[line] = self.semantic_line_text()
        return self._conditioning_cache[line]

    # -- model state per line -------------------------------------------------------------
    @contextmanager
    def text_state(self, line: Line) -> Iterator[None]:
        """Text-encoder state while encoding ``line``'s prompt (e.g. text-encoder LoRA off)."""
        yield

    @contextmanager
    def line_state(self, line: Line) -> Iterator[None]:
        """UNet state for ``line``'s rows (adapters on/off, attention-processor scales)."""
        yield

    def negative_shareable(self) -> bool:
        return False

    def supports_row_batching(self, batches: Sequence[RowBatch]) -> bool:
        """Whether a merged call of ``batches`` can switch this backend's state per row.

        False by default: a backend opts in by overriding this and ``row_state``.
        """
        return False

    @contextmanager
    def row_state(self, batch: RowBatch) -> Iterator[None]:
        """UNet state for a merged batch: each row sees its own line's state."""
        raise NotImplementedError(f"{type(self).__name__} cannot switch state per row")
        yield  # pragma: no cover

    @contextmanager
    def batch_state(self, batch: RowBatch) -> Iterator[None]:
        if batch.row_lines is None:
            with self.line_state(batch.line):
                yield
        else:
            with self.row_state(batch):
                yield

    # -- the UNet call ----------------------------------------------------------------------
    def added_cond_kwargs(self, batch: RowBatch) -> dict[str, Any]:
        return {"text_embeds": batch.text_embeds, "time_ids": batch.time_ids}

    def unet_extra_kwargs(self, batch: RowBatch) -> dict[str, Any]:
        """Further UNet keywords, e.g. ControlNet residuals."""
        return {}

    def unet_forward(self, batch: RowBatch) -> torch.Tensor:
        extra = self.unet_extra_kwargs(batch)
        if batch.encoder_attention_mask is not None:
            extra["encoder_attention_mask"] = batch.encoder_attention_mask
        return self.pipe.unet(
            batch.sample,
            batch.timestep,
            encoder_hidden_states=batch.encoder_hidden_states,
            timestep_cond=batch.timestep_cond,
            cross_attention_kwargs=batch.cross_attention_kwargs,
            added_cond_kwargs=self.added_cond_kwargs(batch),
            return_dict=False,
            **extra,
        )[0]

    def predict_noise(self, batches: Sequence[RowBatch]) -> list[torch.Tensor]:
        outputs = []
        for batch in batches:
            with self.batch_state(batch):
                outputs.append(self.unet_forward(batch))
        return outputs
