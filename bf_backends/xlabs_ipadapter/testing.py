"""Tiny XLabs FLUX IP-Adapters for offline tests, the demo and the speed script (test support).

A random state dict under the official XLabs key names (``loader.xlabs_shapes``, the rule
that gives ``checkpoints/xlabs_flux_ip_adapter.json`` at FLUX.1-dev size) is written to an
``ip_adapter.safetensors`` file and loaded through ``loader.load_xlabs_ip_adapter``, so the
strict check and diffusers' own safetensors branch run exactly as for the real file. The
tiny image encoder is a CLIP vision model at 32 px (patch 8, projection 32), registered
before loading, as the real ``openai/clip-vit-large-patch14`` would be.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from bf_core.errors import ConfigError
from bf_core.extras import PipelineSetup, SpeedSetup

from .loader import CLIP_VIT_L_EMBED_DIM, WEIGHT_NAMES, load_xlabs_ip_adapter, xlabs_shapes_for

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_PROJECTION_DIM = 32  # the tiny CLIP's image_embeds width, read by the projection
ID_PROMPT = "a person"


def tiny_image_encoder(seed: int = 0):
    """A random ``CLIPVisionModelWithProjection``: 32 px, patch 8, projection 32."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, image_size=TINY_IMAGE_SIZE,
                              patch_size=TINY_PATCH_SIZE, projection_dim=TINY_PROJECTION_DIM,
                              intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers initialises from the global generator
        return CLIPVisionModelWithProjection(config).eval()


def tiny_feature_extractor():
    """The CLIP preprocessing diffusers registers for an encoder of this size."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size=TINY_IMAGE_SIZE, crop_size=TINY_IMAGE_SIZE)


def random_state_dict(transformer: Any, image_embed_dim: int, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors under the XLabs key names at ``transformer``'s size.

    Matrices are scaled by 1/sqrt(fan_in) and biases kept small, so that activations stay
    near unit size; LayerNorm gains sit near 1, so that the tokens are not zeroed.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in xlabs_shapes_for(transformer, image_embed_dim).items():
        values = torch.randn(shape, generator=generator)
        if len(shape) > 1:
            values = values / shape[-1] ** 0.5
        elif key.endswith("norm.weight"):
            values = 1.0 + 0.1 * values
        else:
            values = 0.1 * values
        tensors[key] = values.to(dtype)
    return tensors


def write_checkpoint(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike) -> Path:
    """``state_dict`` as ``<folder>/ip_adapter.safetensors``, the official file name."""
    from safetensors.torch import save_file

    path = Path(folder) / WEIGHT_NAMES[0]
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, str(path))
    return path


def load_random_adapter(pipe: Any, image_embed_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random XLabs adapter written to a temporary ``ip_adapter.safetensors`` and loaded
    through the project's loader (no image encoder is loaded with it). Returns the state dict."""
    state = random_state_dict(pipe.transformer, image_embed_dim, seed=seed,
                              dtype=pipe.transformer.dtype)
    with tempfile.TemporaryDirectory(prefix="beyondfacial-xlabs-") as folder:
        path = write_checkpoint(state, folder)
        load_xlabs_ip_adapter(pipe, path, image_encoder=None, image_embed_dim=image_embed_dim,
                              local_files_only=True)
    return state


def tiny_pipeline(seed: int = 0):
    """The tiny offline ``FluxPipeline`` with a tiny CLIP image encoder and a random XLabs
    IP-Adapter loaded by diffusers' ``load_ip_adapter`` from a real safetensors file."""
    from bf_core.testing.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=seed)
    pipe.register_modules(image_encoder=tiny_image_encoder(seed),
                          feature_extractor=tiny_feature_extractor())
    load_random_adapter(pipe, TINY_PROJECTION_DIM, seed=seed)
    return pipe


def reference_photo():
    """The bundled public-domain portrait (``bf_backends/photomaker/assets/SOURCE.md``)."""
    from PIL import Image

    from bf_backends.photomaker.testing import reference_photo_path

    with Image.open(reference_photo_path()) as image:
        return image.convert("RGB")


def tiny_setup(seed: int = 0, host: str = "flux") -> PipelineSetup:
    """The demo's pipeline: the tiny FLUX pipeline with the tiny adapter, and one photo."""
    if host != "flux":
        raise ConfigError(f"the XLabs IP-Adapter serves FLUX.1 pipelines only, not {host!r}")
    return PipelineSetup(tiny_pipeline(seed=seed),
                         identity={"id_images": [reference_photo()], "id_prompt": ID_PROMPT})


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """A random XLabs adapter at the pipeline's size (768-wide CLIP embeds at real size),
    fed precomputed ``ip_adapter_image_embeds`` (1, 1, E), so no image encoder is loaded.
    ``resolution`` and ``lora_rank`` do not apply."""
    width = CLIP_VIT_L_EMBED_DIM if real else TINY_PROJECTION_DIM
    load_random_adapter(pipe, width, seed=seed)
    embeds = torch.randn((1, 1, width), generator=torch.Generator().manual_seed(seed))
    embeds = embeds.to(device=pipe.transformer.device, dtype=pipe.transformer.dtype)
    return SpeedSetup(pipe, {"ip_adapter_image_embeds": [embeds], "id_prompt": ID_PROMPT})
