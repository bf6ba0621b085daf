"""Tiny offline InfiniteYou pipelines (test support, the demo's tiny pipeline).

The tiny FLUX.1 pipeline of ``bf_core.testing.tiny_flux`` with the two InfiniteYou files
written the way the official ones are laid out and read back through the loaders: an
InfuseNet made by ``FluxControlNetModel.from_transformer`` and saved with
``save_pretrained`` (``InfuseNetModel/``), and a random Resampler ``torch.save``d as
``{"image_proj": ...}`` (``image_proj_model.bin``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bf_backends.infiniteyou.loader import (
    IMAGE_PROJ_FILE,
    IMAGE_PROJ_PART,
    INFUSENET_FOLDER,
    attach_infiniteyou,
    resampler_shape_for,
)
from bf_backends.infiniteyou.modules import InfiniteYouResampler
from bf_core.extras import PipelineSetup, SpeedSetup

TINY_RESAMPLER_WIDTH = 128  # two 64-wide heads
TINY_INFUSENET_BLOCKS = (1, 2)  # double, single: the base has 2 + 2, so the intervals are 2 and 1
#: A fresh InfuseNet's output layers and control embedder are zero (every residual would
#: be 0); they are re-drawn with this spread, and the control embedder with a larger one,
#: so that a control image moves the residuals enough to tell placements apart.
RESIDUAL_STD = 0.5
CONTROL_STD = 2.0
INFUSENET_SEED_OFFSET = 20
RESAMPLER_SEED_OFFSET = 21
SCENE_PROMPT = "a person is kneeling by a small lake, touching the water, full body, wide shot"


def tiny_infusenet(pipe: Any, seed: int = 0, blocks: tuple[int, int] = TINY_INFUSENET_BLOCKS):
    """A random InfuseNet for the tiny FLUX transformer whose residuals are not all zero."""
    from diffusers import FluxControlNetModel

    config = pipe.transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FluxControlNetModel.from_transformer(
            pipe.transformer, num_layers=blocks[0], num_single_layers=blocks[1],
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)
    generator = torch.Generator().manual_seed(seed)
    outputs = [*net.controlnet_blocks, *net.controlnet_single_blocks]
    with torch.no_grad():
        for linear, std in [(layer, RESIDUAL_STD) for layer in outputs] + [
                (net.controlnet_x_embedder, CONTROL_STD)]:
            fan_in = linear.weight.shape[1]
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator)
                                * std / fan_in**0.5)
            linear.bias.copy_(0.1 * torch.randn(linear.bias.shape, generator=generator))
    return net.eval()


def tiny_image_proj(output_dim: int, seed: int = 0, width: int = TINY_RESAMPLER_WIDTH
                    ) -> dict[str, torch.Tensor]:
    """A random Resampler state dict (the ``image_proj`` part) for T_id of ``output_dim``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resampler = InfiniteYouResampler(resampler_shape_for(output_dim, width))
    return {key: value.detach().clone() for key, value in resampler.state_dict().items()}


def write_tiny_checkpoints(folder: str | os.PathLike, pipe: Any, seed: int = 0) -> Path:
    """Write ``InfuseNetModel/`` and ``image_proj_model.bin`` for the tiny pipeline into
    ``folder``, laid out like an official model folder; returns the folder."""
    folder = Path(folder)
    net = tiny_infusenet(pipe, seed=seed + INFUSENET_SEED_OFFSET)
    net.save_pretrained(str(folder / INFUSENET_FOLDER))
    image_proj = tiny_image_proj(net.config.joint_attention_dim, seed=seed + RESAMPLER_SEED_OFFSET)
    torch.save({IMAGE_PROJ_PART: image_proj}, str(folder / IMAGE_PROJ_FILE))
    return folder


def tiny_pipeline(seed: int = 0, face_analyzer: Any = None, folder: str | os.PathLike | None = None):
    """The tiny FLUX.1 pipeline with InfiniteYou attached from files in ``folder`` (a new
    temporary folder by default), through ``attach_infiniteyou``."""
    from bf_core.testing.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=seed)
    folder = Path(folder) if folder is not None else Path(
        tempfile.mkdtemp(prefix="beyondfacial-infiniteyou-"))
    write_tiny_checkpoints(folder, pipe, seed=seed)
    attach_infiniteyou(pipe, folder / INFUSENET_FOLDER, folder / IMAGE_PROJ_FILE,
                       face_analyzer=face_analyzer)
    return pipe


def face_pack(folder: str | os.PathLike, finds_faces: bool = True, seed: int = 0) -> Path:
    """A random antelopev2-named insightface pack that finds faces everywhere or nowhere."""
    from bf_core.testing.faces import make_random_antelopev2_pack

    return make_random_antelopev2_pack(folder, seed=seed,
                                       face_logit_bias=10.0 if finds_faces else -10.0)


def tiny_face_analyzer(folder: str | os.PathLike, finds_faces: bool = True, seed: int = 0):
    """A ``FaceAnalyzer`` on ``face_pack`` at a small detector size (fast on a CPU)."""
    from bf_core.faces import FaceAnalyzer

    pack = face_pack(Path(folder) / "antelopev2", finds_faces=finds_faces, seed=seed)
    return FaceAnalyzer(str(pack), det_size=(128, 128), providers=["CPUExecutionProvider"])


def reference_photo(seed: int = 0, size: tuple[int, int] = (80, 96)):
    """A random RGB picture of ``size`` (width, height): the random face pack finds a face
    in any photo, so its content is free."""
    from PIL import Image

    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    return Image.fromarray(pixels)


def tiny_setup(seed: int = 0, host: str = "flux") -> PipelineSetup:
    """The tiny offline InfiniteYou pipeline (FLUX.1 only), one photo as the demo identity,
    and a random antelopev2 pack that finds a face in every photo as its analyser."""
    from bf_core.errors import ConfigError

    if host != "flux":
        raise ConfigError(f"InfiniteYou runs on FLUX.1 only, not on {host!r}")
    folder = Path(tempfile.mkdtemp(prefix="beyondfacial-infiniteyou-"))
    analyzer = tiny_face_analyzer(folder, finds_faces=True, seed=seed)
    pipe = tiny_pipeline(seed=seed, face_analyzer=analyzer, folder=folder)
    return PipelineSetup(pipe, identity={"id_images": [reference_photo(seed)],
                                         "id_prompt": "a person"},
                         options={"face_analyzer": analyzer})


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """The speed script's InfiniteYou on a FLUX pipeline: InfuseNet with the published block
    counts (4 double, 10 single) at real size, the tiny ones otherwise, and the Resampler,
    random weights, fed a fixed ArcFace embedding (``face_embeds``: no face analyser runs)."""
    blocks = (4, 10) if real else TINY_INFUSENET_BLOCKS
    net = tiny_infusenet(pipe, seed=seed + INFUSENET_SEED_OFFSET, blocks=blocks)
    width = None if real else TINY_RESAMPLER_WIDTH  # None: the published 1280
    image_proj = tiny_image_proj(net.config.joint_attention_dim,
                                 seed=seed + RESAMPLER_SEED_OFFSET, width=width or 1280)
    attach_infiniteyou(pipe, net, {IMAGE_PROJ_PART: image_proj}, torch_dtype=pipe.transformer.dtype)
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1)
    return SpeedSetup(pipe, {"face_embeds": embedding, "id_prompt": "a person"},
                      prompt=SCENE_PROMPT)
