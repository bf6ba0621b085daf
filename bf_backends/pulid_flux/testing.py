"""Tiny PuLID-FLUX set-ups for offline tests: a checkpoint under the official key names, sized
for the tiny FLUX transformer, and the whole pipeline with PuLID's tiny face models.

``write_tiny_pulid_flux_checkpoint`` writes what the official file holds (one flat
safetensors dict of ``pulid_encoder.*`` and ``pulid_ca.{k}.*``, bfloat16) at tiny size:
the cross-attention's query width is the tiny transformer's inner width (2 heads x 16), its
key/value width the tiny IDFormer's output. ``tiny_setup`` loads it through
``attach_pulid_flux``, with the tiny face features of ``bf_backends.pulid.testing`` and the
bundled reference photo; it reaches the demo and the benchmark through the backend's extras.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bf_backends.pulid.testing import (
    TINY_ID_COND_DIM,
    random_tensor,
    tiny_encoder_config,
    tiny_face_features,
)
from bf_backends.pulid_flux.loader import (
    CHECKPOINT_FILE,
    attach_pulid_flux,
    expected_pulid_flux_shapes,
)
from bf_backends.pulid_flux.modules import PuLIDFluxConfig
from bf_core.errors import ConfigError
from bf_core.extras import PipelineSetup, SpeedSetup

ASSETS = Path(__file__).parent / "assets"
#: The tiny IDFormer's output width: T_id is (1, 32, 48). Not the transformer's width (32),
#: so a query/key mix-up cannot pass unnoticed.
TINY_KV_DIM = 48
TINY_CA_HEADS, TINY_CA_DIM_HEAD = 2, 8


def reference_photo_path() -> Path:
    """The bundled reference portrait (public domain; see ``assets/SOURCE.md``)."""
    return ASSETS / "astronaut.jpg"


def tiny_config() -> PuLIDFluxConfig:
    """PuLID-FLUX at test size: PuLID's tiny IDFormer (32 queries, official token counts)
    and small cross-attention heads; the official block intervals."""
    encoder = tiny_encoder_config("v1.1", context_dim=TINY_KV_DIM, id_cond_dim=TINY_ID_COND_DIM)
    return PuLIDFluxConfig(encoder=encoder, ca_heads=TINY_CA_HEADS, ca_dim_head=TINY_CA_DIM_HEAD)


def tiny_pulid_flux_state_dict(transformer: nn.Module, config: PuLIDFluxConfig | None = None, *,
                               seed: int = 0) -> dict[str, torch.Tensor]:
    """A random flat PuLID-FLUX state dict (float32) for ``transformer``, official key names."""
    shapes = expected_pulid_flux_shapes(transformer.config, config or tiny_config())
    generator = torch.Generator().manual_seed(seed)
    return {key: random_tensor(key, shape, generator) for key, shape in shapes.items()}


def write_tiny_pulid_flux_checkpoint(directory: str | os.PathLike, transformer: nn.Module,
                                     config: PuLIDFluxConfig | None = None, *,
                                     seed: int = 0) -> Path:
    """Write ``pulid_flux_v0.9.1.safetensors`` (bfloat16) for ``transformer`` into ``directory``."""
    from safetensors.torch import save_file

    state_dict = tiny_pulid_flux_state_dict(transformer, config, seed=seed)
    path = Path(directory) / CHECKPOINT_FILE
    save_file({key: value.to(torch.bfloat16).contiguous() for key, value in state_dict.items()},
              str(path))
    return path


def tiny_pipeline(seed: int = 0, *, features: Any = None, id_weight: float = 1.0,
                  start_step: int = 0):
    """The tiny FluxPipeline with a tiny random PuLID-FLUX checkpoint attached, read from a
    temporary .safetensors file through the loader. ``features`` defaults to PuLID's tiny
    face pipeline."""
    from bf_core.testing.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=seed)
    config = tiny_config()
    with tempfile.TemporaryDirectory(prefix="beyondfacial-pulid-flux-") as folder:
        path = write_tiny_pulid_flux_checkpoint(folder, pipe.transformer, config, seed=seed)
        attach_pulid_flux(pipe, path, features or tiny_face_features(seed), config=config,
                          id_weight=id_weight, start_step=start_step)
    return pipe


def tiny_setup(seed: int = 0, host: str = "flux") -> PipelineSetup:
    """The demo's pipeline: the tiny FLUX pipeline with PuLID-FLUX (its tiny face models
    travel on ``pipe.pulid_flux``) and the bundled photo as the identity."""
    if host != "flux":
        raise ConfigError(f"PuLID-FLUX runs on the FLUX host only, got host={host!r}")
    return PipelineSetup(tiny_pipeline(seed),
                         identity={"id_images": [str(reference_photo_path())]})


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """The speed script's PuLID-FLUX: the official IDFormer and the 20 cross-attention
    modules at real size (the tiny ones otherwise), random weights, fed random face features
    of the real encoders' shapes (no face models run)."""
    from bf_backends.pulid.modules import EVA_TOKENS_PER_IMAGE
    from bf_backends.pulid.testing import TINY_VIT_TOKENS, RandomFaceFeatures

    config = PuLIDFluxConfig() if real else tiny_config()
    tokens = EVA_TOKENS_PER_IMAGE if real else TINY_VIT_TOKENS
    transformer = pipe.transformer
    state = tiny_pulid_flux_state_dict(transformer, config, seed=seed)
    features = RandomFaceFeatures(config.encoder.id_cond_dim, config.encoder.vit_dim, tokens,
                                  transformer.device, seed)
    attach_pulid_flux(pipe, state, features, config=config)
    return SpeedSetup(pipe, {"id_images": [str(reference_photo_path())]})
