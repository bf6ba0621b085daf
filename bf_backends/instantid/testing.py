"""Tiny InstantID parts for offline tests: an IdentityNet config and an ``ip-adapter.bin`` writer.

Everything here is random-weight and sized for a tiny SDXL UNet (cross-attention width 64),
while keeping what makes InstantID InstantID: a 512-wide raw face embedding in, 16 ID tokens
out, the official two-part file layout, and the processor numbering of the official loader.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bf_backends.instantid.loader import (
    FACE_EMBEDDING_DIM,
    ID_TOKEN_COUNT,
    ip_adapter_shapes,
    resampler_shapes,
)

TINY_RESAMPLER_WIDTH = 128  # two heads of 64, the smallest width diffusers' converter accepts


def tiny_identitynet_config(cross_attention_dim: int = 64) -> dict:
    """A ``ControlNetModel`` config shaped like IdentityNet for the tiny SDXL UNet.

    Mirrors the tiny UNet (channels 32/64, one layer per block, transformer layers 1/2,
    text_time conditioning with 8-wide time embeddings and a 32-wide pooled text vector).
    The conditioning embedding keeps IdentityNet's three stride-2 stages so an RGB keypoint
    image at pixel resolution lands on the latent grid (vae_scale_factor 8).
    """
    return {
        "in_channels": 4,
        "conditioning_channels": 3,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "layers_per_block": 1,
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,
        "norm_num_groups": 8,
        "conditioning_embedding_out_channels": (8, 8, 16, 16),
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }


def tiny_identitynet(seed: int = 0, cross_attention_dim: int = 64):
    """A random tiny IdentityNet whose residuals are not all zero.

    A fresh ControlNet has zero-initialised output convolutions, which would make every
    residual zero and every test of the conditioning path vacuous; they are re-drawn here.
    """
    from diffusers import ControlNetModel

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # diffusers initialises from the global RNG; leave it as found
        torch.manual_seed(seed)
        net = ControlNetModel(**tiny_identitynet_config(cross_attention_dim))
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                  net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    return net.eval()


def _random_like_shapes(shapes: dict[str, tuple[int, ...]], generator: torch.Generator,
                        ) -> dict[str, torch.Tensor]:
    """Random tensors for a ``{key: shape}`` map; norms start near identity like trained ones."""
    tensors = {}
    for key, shape in shapes.items():
        is_norm = ".norm" in f".{key}" or key.endswith((".1.0.weight", ".1.0.bias"))
        if is_norm and key.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif is_norm or key.endswith(".bias"):
            value = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        tensors[key] = value.float().contiguous()
    return tensors


def make_instantid_state_dict(unet, seed: int = 0, hidden_dim: int = TINY_RESAMPLER_WIDTH,
                              ) -> dict[str, dict[str, torch.Tensor]]:
    """Random ``{"image_proj": ..., "ip_adapter": ...}`` in the official layout for ``unet``.

    ``image_proj`` is a Resampler 512 -> ``hidden_dim`` -> the UNet's cross-attention width
    with 16 queries and depth 4; ``ip_adapter`` has ``"{k}.to_k_ip.weight"`` /
    ``"{k}.to_v_ip.weight"`` for every cross-attention processor position k of ``unet``.
    """
    generator = torch.Generator().manual_seed(seed)
    output_dim = unet.config.cross_attention_dim
    return {
        "image_proj": _random_like_shapes(
            resampler_shapes(FACE_EMBEDDING_DIM, hidden_dim, output_dim, ID_TOKEN_COUNT),
            generator),
        "ip_adapter": _random_like_shapes(ip_adapter_shapes(unet), generator),
    }


def write_tiny_ip_adapter_bin(path: str | os.PathLike, unet, seed: int = 0,
                              hidden_dim: int = TINY_RESAMPLER_WIDTH) -> dict:
    """Write ``make_instantid_state_dict(unet, seed)`` with ``torch.save`` like the official file.

    Returns the state dict that was written.
    """
    state_dict = make_instantid_state_dict(unet, seed=seed, hidden_dim=hidden_dim)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, str(path))
    return state_dict
