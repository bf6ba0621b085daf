"""Tiny PuLID checkpoints in the official layout, for offline tests.

``write_tiny_pulid_checkpoint`` writes what the official files hold (one flat dict with
``id_adapter.`` and ``id_adapter_attn_layers.`` keys), sized for a given (tiny) UNet: v1
as a ``torch.save`` pickle ``pulid_v1.bin`` in float32, v1.1 as ``pulid_v1.1.safetensors``
in float16, like the published files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from bf_backends.pulid.attention import pulid_attention_shapes
from bf_backends.pulid.encoder import (
    EncoderConfig,
    IDEncoderConfig,
    IDFormerConfig,
    build_encoder,
)
from bf_backends.pulid.loader import ATTENTION_PREFIX, ENCODER_PREFIX
from bf_core.checkpoints import expected_shapes
from bf_core.errors import ConfigError

#: Tokens per image in the tiny EVA-CLIP hidden states the tests feed (CLS + 4 patches).
TINY_VIT_TOKENS = 5
FILE_NAMES = {"v1": "pulid_v1.bin", "v1.1": "pulid_v1.1.safetensors"}


def tiny_encoder_config(version: str, context_dim: int = 64) -> EncoderConfig:
    """Small widths with the official token counts (10 tokens for v1, 32 for v1.1)."""
    if version == "v1":
        return IDEncoderConfig(id_cond_dim=24, vit_dim=16, mapping_width=16, max_body_width=32,
                               context_dim=context_dim)
    if version == "v1.1":
        return IDFormerConfig(id_cond_dim=24, vit_dim=16, mapping_width=16, dim=16, depth=5,
                              dim_head=4, heads=4, output_dim=context_dim, ff_mult=2)
    raise ConfigError(f"PuLID version must be 'v1' or 'v1.1', got {version!r}.")


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    if len(shape) >= 2:  # matrices: unit-variance outputs for unit-variance inputs
        return values / math.sqrt(shape[-1])
    if key.endswith("weight"):  # LayerNorm gains near 1, so LayerNorms are not identities
        return 1 + 0.1 * values
    return 0.1 * values


def tiny_pulid_state_dict(unet: nn.Module, version: str, *, seed: int = 0,
                          encoder_config: EncoderConfig | None = None
                          ) -> dict[str, torch.Tensor]:
    """A random flat PuLID state dict (float32) for ``unet``, official key layout."""
    config = encoder_config or tiny_encoder_config(version, unet.config.cross_attention_dim)
    with torch.device("meta"):
        encoder_shapes = expected_shapes(build_encoder(version, config))
    generator = torch.Generator().manual_seed(seed)
    flat = {f"{ENCODER_PREFIX}.{key}": _random_tensor(key, shape, generator)
            for key, shape in encoder_shapes.items()}
    flat.update({f"{ATTENTION_PREFIX}.{key}": _random_tensor(key, shape, generator)
                 for key, shape in pulid_attention_shapes(unet).items()})
    return flat


def write_tiny_pulid_checkpoint(directory: str | os.PathLike, unet: nn.Module, version: str, *,
                                seed: int = 0, encoder_config: EncoderConfig | None = None
                                ) -> Path:
    """Write ``pulid_v1.bin`` (float32 pickle) or ``pulid_v1.1.safetensors`` (float16)."""
    state_dict = tiny_pulid_state_dict(unet, version, seed=seed, encoder_config=encoder_config)
    path = Path(directory) / FILE_NAMES[version]
    if version == "v1":
        torch.save(state_dict, path)
    else:
        from safetensors.torch import save_file

        save_file({key: value.to(torch.float16).contiguous()
                   for key, value in state_dict.items()}, str(path))
    return path
