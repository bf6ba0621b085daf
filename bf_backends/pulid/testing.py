"""Tiny PuLID set-ups for offline tests: checkpoints, face models and whole pipelines.

``write_tiny_pulid_checkpoint`` writes what the official files hold (one flat dict with
``id_adapter.`` and ``id_adapter_attn_layers.`` keys), sized for a given (tiny) UNet: v1
as a ``torch.save`` pickle ``pulid_v1.bin`` in float32, v1.1 as ``pulid_v1.1.safetensors``
in float16, like the published files.

``tiny_pipeline`` builds the tiny SDXL pipeline with PuLID attached and a complete face
pipeline: a random-weight insightface ``antelopev2`` pack (real insightface code), a tiny
random face parser, and a tiny vision tower with EVA's block layout read through the real
``EVAFeatures`` hooks (timm's EVA02 at test size is exercised by the tests where timm is
installed).

``tiny_setup`` (the demo's pipeline) and ``speed_setup`` (the speed script's) reach the CLI
and the benchmark through the backend's extras.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bf_backends.pulid.attention import pulid_attention_shapes
from bf_backends.pulid.features import FaceFeatures
from bf_backends.pulid.loader import (
    ATTENTION_PREFIX,
    ENCODER_PREFIX,
    attach_pulid,
    lightning_scheduler,
)
from bf_backends.pulid.modules import (
    EVA_TOKENS_PER_IMAGE,
    NUM_VIT_SCALES,
    EncoderConfig,
    IDEncoderConfig,
    IDFormerConfig,
    build_encoder,
)
from bf_core.checkpoints import expected_shapes
from bf_core.errors import ConfigError
from bf_core.extras import PipelineSetup, SpeedSetup

#: Tokens per image in the tiny EVA-CLIP hidden states the tests feed (CLS + 4 patches).
TINY_VIT_TOKENS = 5
FILE_NAMES = {"v1": "pulid_v1.bin", "v1.1": "pulid_v1.1.safetensors"}


def tiny_encoder_config(version: str, context_dim: int = 64,
                        id_cond_dim: int = 24) -> EncoderConfig:
    """Small widths with the official token counts (10 tokens for v1, 32 for v1.1)."""
    if version == "v1":
        return IDEncoderConfig(id_cond_dim=id_cond_dim, vit_dim=16, mapping_width=16,
                               max_body_width=32, context_dim=context_dim)
    if version == "v1.1":
        return IDFormerConfig(id_cond_dim=id_cond_dim, vit_dim=16, mapping_width=16, dim=16,
                              depth=5,
                              dim_head=4, heads=4, output_dim=context_dim, ff_mult=2)
    raise ConfigError(f"PuLID version must be 'v1' or 'v1.1', got {version!r}.")


def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random checkpoint value for ``key`` of ``shape`` (also PuLID-FLUX's tiny files)."""
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
    flat = {f"{ENCODER_PREFIX}.{key}": random_tensor(key, shape, generator)
            for key, shape in encoder_shapes.items()}
    flat.update({f"{ATTENTION_PREFIX}.{key}": random_tensor(key, shape, generator)
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


# ---------------------------------------------------------------- tiny face pipeline

#: Width and CLIP-embedding size of the tiny vision tower; its input is 28 px (2 x 2 patches).
TINY_VISION_WIDTH = 16
TINY_VISION_SIZE = 28
#: ArcFace (512, as the random antelopev2 pack gives) + the tiny CLIP embedding.
TINY_ID_COND_DIM = 512 + TINY_VISION_WIDTH


class TinyFaceParser(nn.Module):
    """A random 1x1-convolution "parser": (N, 3, H, W) -> (N, 19, H, W) logits.

    Its labels vary with the pixel colours, so the whitening step keeps and removes pixels.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.classify = nn.Conv2d(3, 19, kernel_size=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nn.init.normal_(self.classify.weight, std=1.0)
            nn.init.normal_(self.classify.bias, std=0.5)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.classify(pixels),)  # BiSeNet's tuple layout


class _TinyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + torch.nn.functional.gelu(self.mlp(self.norm(tokens)))


class TinyVisionTower(nn.Module):
    """EVA's layout at toy size: patch embedding, CLS, position, 20 ``blocks``, norm, head.

    (N, 3, 28, 28) -> head(norm(x)[:, 0]) (N, 16); block outputs are (N, 5, 16).
    """

    def __init__(self, seed: int = 0, width: int = TINY_VISION_WIDTH, depth: int = 20) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(3, width, kernel_size=14, stride=14)
            self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, width))
            self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 5, width))
            self.blocks = nn.ModuleList(_TinyBlock(width) for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(pixels), -1, -1), patches], dim=1)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


@functools.lru_cache(maxsize=4)
def tiny_face_pack(seed: int = 0) -> Path:
    """A random antelopev2 pack that finds faces in every image (written once per seed)."""
    from bf_core.testing.faces import make_random_antelopev2_pack

    folder = Path(tempfile.mkdtemp(prefix="beyondfacial-tiny-antelopev2-"))
    return make_random_antelopev2_pack(folder, seed, face_logit_bias=10.0)


def tiny_face_features(seed: int = 0, vision: nn.Module | None = None):
    """The complete PuLID face pipeline with tiny random models (offline, fast).

    vision: an ``EVAFeatures`` to use instead of the tiny stand-in tower (e.g. timm's
    EVA02 at test size, as tests/unit/test_pulid_eva_timm.py builds it).
    """
    from bf_backends.pulid.eva import EVAFeatures
    from bf_backends.pulid.features import PuLIDFaceFeatures
    from bf_core.faces import FaceAnalyzer

    analyzer = FaceAnalyzer(tiny_face_pack(seed), det_size=(128, 128),
                            providers=["CPUExecutionProvider"])
    vision = vision or EVAFeatures(TinyVisionTower(seed).eval(), image_size=TINY_VISION_SIZE)
    return PuLIDFaceFeatures(analyzer, TinyFaceParser(seed).eval(), vision)


def tiny_face_image(seed: int = 0, size: int = 96):
    """A deterministic RGB test photo (smooth colour blobs) as a PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def tiny_pipeline(version: str = "v1.1", seed: int = 0, *, mode: str = "fidelity",
                  id_scale: float = 0.8, features=None):
    """The tiny SDXL pipeline with PuLID ``version`` attached, as the official v1 runs it.

    Scheduler: DPM-Solver++ with trailing spacing and ``final_sigmas_type="sigma_min"``
    (docs/backends/pulid.md). Checkpoint: random, official layout, float32. ``features`` defaults to
    :func:`tiny_face_features`; ``mode`` / ``id_scale`` are the attached defaults.
    """
    from bf_core.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=seed, scheduler="euler")
    pipe.scheduler = lightning_scheduler(pipe.scheduler.config)
    encoder_config = tiny_encoder_config(version, pipe.unet.config.cross_attention_dim,
                                         id_cond_dim=TINY_ID_COND_DIM)
    state_dict = tiny_pulid_state_dict(pipe.unet, version, seed=seed,
                                       encoder_config=encoder_config)
    attach_pulid(pipe, state_dict, features or tiny_face_features(seed), version=version,
                 encoder_config=encoder_config, mode=mode, id_scale=id_scale)
    return pipe


def tiny_setup(seed: int = 0) -> PipelineSetup:
    """The demo's pipeline: the tiny v1.1 pipeline (its tiny face models travel on
    ``pipe.pulid``, so no option is needed) with a tiny face photo as the identity."""
    return PipelineSetup(tiny_pipeline("v1.1", seed=seed),
                         identity={"id_images": [tiny_face_image()]})


# ---------------------------------------------------------------- the speed script's set-up

def reference_photo(size: int = 96):
    """A plain RGB picture for the speed runs: ``RandomFaceFeatures`` ignores its content,
    so it only has to load."""
    from PIL import Image

    return Image.new("RGB", (size, size), (180, 140, 120))


class RandomFaceFeatures:
    """PuLID's face pipeline replaced by random features of its output shapes.

    ``(image, index) -> FaceFeatures``: id_cond (1, id_cond_dim) and five EVA-CLIP hidden
    states (1, tokens, vit_dim), float32 on ``device``. The ID encoder and the ID attention
    run for real on them; the face detector, parser and EVA-CLIP are not built.
    """

    def __init__(self, id_cond_dim: int, vit_dim: int, tokens: int, device, seed: int = 0):
        self.id_cond_dim, self.vit_dim, self.tokens = id_cond_dim, vit_dim, tokens
        self.device, self.seed = device, seed

    def __call__(self, image, index: int | None = None) -> FaceFeatures:
        import numpy as np

        generator = torch.Generator().manual_seed(self.seed + (index or 0))
        id_cond = torch.randn((1, self.id_cond_dim), generator=generator)
        hidden = [torch.randn((1, self.tokens, self.vit_dim), generator=generator)
                  for _ in range(NUM_VIT_SCALES)]
        return FaceFeatures(id_cond.to(self.device), [h.to(self.device) for h in hidden],
                            aligned=np.zeros((1, 1, 3), np.uint8), clip_input=torch.zeros(3, 1, 1))


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """PuLID v1.1 at the pipeline's size (random weights): the IDFormer and the ID attention
    via ``attach_pulid``, fed random face features of the real encoders' shapes.

    ``resolution`` and ``lora_rank`` do not apply: PuLID places no keypoints and adds no LoRA.
    """
    if real:
        config, tokens = IDFormerConfig(), EVA_TOKENS_PER_IMAGE
    else:
        config = tiny_encoder_config("v1.1", pipe.unet.config.cross_attention_dim,
                                     id_cond_dim=TINY_ID_COND_DIM)
        tokens = TINY_VIT_TOKENS
    state = tiny_pulid_state_dict(pipe.unet, "v1.1", seed=seed, encoder_config=config)
    features = RandomFaceFeatures(config.id_cond_dim, config.vit_dim, tokens,
                                  pipe.unet.device, seed)
    adapter = attach_pulid(pipe, state, features, version="v1.1", encoder_config=config)
    adapter.encoder.to(pipe.unet.device)  # the ID encoder stays float32, as loaded
    return SpeedSetup(pipe, {"id_images": [reference_photo()]})
