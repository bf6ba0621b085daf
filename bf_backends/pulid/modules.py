"""PuLID ID encoders: v1 ``IDEncoder`` (10 tokens per image) and v1.1 ``IDFormer`` (32 tokens).

Both turn ``id_cond`` (the ArcFace embedding followed by the L2-normalised EVA-CLIP
embedding, 512 + 768 = 1280 wide) and five intermediate EVA-CLIP hidden states
(577 tokens of width 1024 each, CLS first) into identity tokens in the UNet's text-context
width. Their state-dict keys and shapes equal the ``id_adapter.`` part of the official
checkpoints at the default configuration; every width is a config field so tests can build
them tiny.

The encoders run in float32 like the official code; inputs are cast to the parameters'
dtype and device on purpose, so half-precision features cannot cause a dtype mismatch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from bf_core.attention import PerceiverAttention, feed_forward
from bf_core.errors import ConfigError

#: Number of EVA-CLIP hidden states the encoders read (inputs of blocks 4, 8, 12, 16, 20).
NUM_VIT_SCALES = 5
#: Tokens per image in one EVA02-CLIP-L-14-336 hidden state: 24 x 24 patches + CLS.
EVA_TOKENS_PER_IMAGE = 577


@dataclass(frozen=True)
class IDInputConfig:
    """The input widths both PuLID encoders share; the defaults are the official ones."""

    id_cond_dim: int = 1280
    """Width of ``id_cond``: ArcFace 512 + EVA-CLIP 768."""
    vit_dim: int = 1024
    """Width of the EVA-CLIP hidden states (hard-coded in the official mapping MLPs)."""
    mapping_width: int = 1024
    """Hidden width of the MLPs that read ``id_cond`` and the hidden states (hard-coded
    officially)."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{type(self).__name__}.{field.name} must be a positive "
                                  f"integer, got {value!r}.")


@dataclass(frozen=True)
class IDEncoderConfig(IDInputConfig):
    """Widths of the v1 ``IDEncoder``; the defaults are the official ones (``pulid_v1.bin``)."""

    max_body_width: int = 1024
    """Upper bound of the two hidden widths of ``body``."""
    context_dim: int = 2048
    """Output token width; must equal the UNet's ``cross_attention_dim``."""
    num_global_tokens: int = 5
    """Tokens produced from ``id_cond`` (they come first in the output)."""

    @property
    def tokens_per_image(self) -> int:
        """Global tokens plus one token per EVA-CLIP scale (10 with the defaults)."""
        return self.num_global_tokens + NUM_VIT_SCALES


@dataclass(frozen=True)
class IDFormerConfig(IDInputConfig):
    """Sizes of the v1.1 ``IDFormer``; the defaults are the official ones (``pulid_v1.1``)."""

    dim: int = 1024
    """Width of the learned queries and of the perceiver layers."""
    depth: int = 10
    """Perceiver layers in all; ``depth / 5`` layers read each EVA-CLIP scale."""
    dim_head: int = 64
    heads: int = 16
    num_id_tokens: int = 5
    """Tokens produced from each image's ``id_cond``."""
    num_queries: int = 32
    """Learned queries = output tokens, whatever the number of images."""
    output_dim: int = 2048
    """Output token width; must equal the UNet's ``cross_attention_dim``."""
    ff_mult: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth % NUM_VIT_SCALES:
            raise ConfigError(f"IDFormerConfig.depth must be a multiple of {NUM_VIT_SCALES} "
                              f"(the same number of layers per EVA-CLIP scale), got {self.depth}.")

    @property
    def tokens_per_image(self) -> int:
        """Output tokens (32 with the defaults), independent of the number of images."""
        return self.num_queries


def _mlp(in_dim: int, hidden1: int, hidden2: int, out_dim: int) -> nn.Sequential:
    """Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear.

    Keys ``.0 .1 .3 .4 .6``: the official layout (LayerNorm eps 1e-5, LeakyReLU slope 0.01).
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden1), nn.LayerNorm(hidden1), nn.LeakyReLU(),
        nn.Linear(hidden1, hidden2), nn.LayerNorm(hidden2), nn.LeakyReLU(),
        nn.Linear(hidden2, out_dim),
    )


def _check_inputs(id_cond: torch.Tensor, id_vit_hidden: Sequence[torch.Tensor],
                  id_cond_dim: int, vit_dim: int, allow_images_axis: bool) -> None:
    dims = "(N, n_images, {0}) or (N, {0})" if allow_images_axis else "(N, {0})"
    if id_cond.shape[-1] != id_cond_dim or id_cond.ndim not in ((2, 3) if allow_images_axis
                                                                 else (2,)):
        raise ValueError(f"id_cond must have shape {dims.format(id_cond_dim)}, got "
                         f"{tuple(id_cond.shape)}; it is [ArcFace embedding ; EVA-CLIP embedding].")
    if len(id_vit_hidden) != NUM_VIT_SCALES:
        raise ValueError(f"id_vit_hidden must hold {NUM_VIT_SCALES} EVA-CLIP hidden states, got "
                         f"{len(id_vit_hidden)}; pass the inputs of blocks 4, 8, 12, 16 and 20.")
    for scale, hidden in enumerate(id_vit_hidden):
        if hidden.ndim != 3 or hidden.shape[0] != id_cond.shape[0] or hidden.shape[-1] != vit_dim:
            raise ValueError(f"id_vit_hidden[{scale}] must have shape (N, tokens, {vit_dim}) with "
                             f"N = {id_cond.shape[0]} (the batch of id_cond), got "
                             f"{tuple(hidden.shape)}.")


class IDEncoder(nn.Module):
    """PuLID v1 ID encoder: ``(N, 1280)`` + five ``(N, 577, 1024)`` -> ``(N, 10, 2048)``.

    Output token order: the ``num_global_tokens`` tokens from ``id_cond`` first, then one
    token per EVA-CLIP scale (ORTHO_v2 relies on the global tokens being first).
    """

    version = "v1"

    def __init__(self, config: IDEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or IDEncoderConfig()
        body_hidden1 = min(config.context_dim * config.num_global_tokens // 4,
                           config.max_body_width)
        body_hidden2 = min(config.context_dim * config.num_global_tokens // 2,
                           config.max_body_width)
        self.body = _mlp(config.id_cond_dim, body_hidden1, body_hidden2,
                         config.context_dim * config.num_global_tokens)
        for scale in range(NUM_VIT_SCALES):
            width = config.mapping_width
            setattr(self, f"mapping_{scale}",
                    _mlp(config.vit_dim, width, width, config.context_dim))
            setattr(self, f"mapping_patch_{scale}",
                    _mlp(config.vit_dim, width, width, config.context_dim))

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def token_width(self) -> int:
        """D, the width of the output tokens (the UNet's text-context width)."""
        return self.config.context_dim

    def forward(self, id_cond: torch.Tensor,
                id_vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """``id_cond`` (N, 1280), ``id_vit_hidden`` five (N, L, 1024) -> (N, 10, 2048).

        Token 0 of each hidden state is CLS; the rest are patches. The patch token of each
        scale is the mean over patches taken *after* the MLP.
        """
        config = self.config
        _check_inputs(id_cond, id_vit_hidden, config.id_cond_dim, config.vit_dim,
                      allow_images_axis=False)
        weight = self.body[0].weight
        id_cond = id_cond.to(weight.device, weight.dtype)
        tokens = [self.body(id_cond).reshape(id_cond.shape[0], config.num_global_tokens,
                                             config.context_dim)]
        for scale, hidden in enumerate(id_vit_hidden):
            hidden = hidden.to(weight.device, weight.dtype)
            cls_token = getattr(self, f"mapping_{scale}")(hidden[:, :1])
            patch_token = getattr(self, f"mapping_patch_{scale}")(hidden[:, 1:]).mean(
                dim=1, keepdim=True)
            tokens.append(cls_token + patch_token)
        return torch.cat(tokens, dim=1)


class IDFormer(nn.Module):
    """PuLID v1.1 ID encoder: ``(N, [n,] 1280)`` + five ``(N, 577 n, 1024)`` -> ``(N, 32, 2048)``.

    Several reference images (``n``) are encoded jointly into one set of 32 tokens.
    """

    version = "v1.1"

    def __init__(self, config: IDFormerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or IDFormerConfig()
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, config.dim)
                                    * config.dim ** -0.5)
        self.proj_out = nn.Parameter(torch.randn(config.dim, config.output_dim)
                                     * config.dim ** -0.5)
        # q and k are each scaled by dim_head^(-1/4), written as the official 1/sqrt(sqrt(d))
        # (it differs from d ** -0.25 in the last bit).
        qk_scale = 1 / math.sqrt(math.sqrt(config.dim_head))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(config.dim, config.dim_head, config.heads,
                                              qk_scale=qk_scale),
                           feed_forward(config.dim, config.ff_mult)])
            for _ in range(config.depth))
        width = config.mapping_width
        self.id_embedding_mapping = _mlp(config.id_cond_dim, width, width,
                                         config.dim * config.num_id_tokens)
        for scale in range(NUM_VIT_SCALES):
            setattr(self, f"mapping_{scale}", _mlp(config.vit_dim, width, width, config.dim))

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def token_width(self) -> int:
        """D, the width of the output tokens (the UNet's text-context width)."""
        return self.config.output_dim

    def forward(self, id_cond: torch.Tensor,
                id_vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """``id_cond`` (N, 1280) or (N, n, 1280), five (N, 577 n, 1024) -> (N, 32, 2048).

        The id tokens (5 per image, image-major) head the latents and also head the
        context of every scale, where they are never updated.
        """
        config = self.config
        _check_inputs(id_cond, id_vit_hidden, config.id_cond_dim, config.vit_dim,
                      allow_images_axis=True)
        batch = id_cond.shape[0]
        num_images = id_cond.shape[1] if id_cond.ndim == 3 else 1
        device, dtype = self.latents.device, self.latents.dtype
        id_tokens = self.id_embedding_mapping(id_cond.to(device, dtype)).reshape(
            batch, config.num_id_tokens * num_images, config.dim)
        latents = torch.cat([self.latents.repeat(batch, 1, 1), id_tokens], dim=1)
        layers_per_scale = config.depth // NUM_VIT_SCALES
        for scale, hidden in enumerate(id_vit_hidden):
            vit_tokens = getattr(self, f"mapping_{scale}")(hidden.to(device, dtype))
            context = torch.cat([id_tokens, vit_tokens], dim=1)
            for index in range(scale * layers_per_scale, (scale + 1) * layers_per_scale):
                attention, mlp = self.layers[index]
                latents = attention(context, latents) + latents
                latents = mlp(latents) + latents
        return latents[:, :config.num_queries] @ self.proj_out


PuLIDEncoder = IDEncoder | IDFormer
EncoderConfig = IDEncoderConfig | IDFormerConfig


def build_encoder(version: str, config: EncoderConfig | None = None) -> IDEncoder | IDFormer:
    """The encoder class of a PuLID version ("v1" or "v1.1") with ``config`` or the defaults."""
    if version == "v1":
        if config is not None and not isinstance(config, IDEncoderConfig):
            raise ConfigError(f"PuLID v1 needs an IDEncoderConfig, got {type(config).__name__}.")
        return IDEncoder(config)
    if version == "v1.1":
        if config is not None and not isinstance(config, IDFormerConfig):
            raise ConfigError(f"PuLID v1.1 needs an IDFormerConfig, got {type(config).__name__}.")
        return IDFormer(config)
    raise ConfigError(f"PuLID version must be 'v1' or 'v1.1', got {version!r}.")


@torch.no_grad()
def negative_id_embedding(encoder: IDEncoder | IDFormer,
                          vit_tokens: int = EVA_TOKENS_PER_IMAGE) -> torch.Tensor:
    """E_neg: the encoder applied to an all-zero single image -> (1, T, context width).

    Not zero (biases and LayerNorm shifts); the negative CFG branch always receives it.
    ``vit_tokens`` is the token count of one hidden state (577 at real size).
    """
    config = encoder.config
    param = next(encoder.parameters())
    id_cond = torch.zeros(1, config.id_cond_dim, device=param.device, dtype=param.dtype)
    hidden = [torch.zeros(1, vit_tokens, config.vit_dim, device=param.device, dtype=param.dtype)
              for _ in range(NUM_VIT_SCALES)]
    return encoder(id_cond, hidden)
