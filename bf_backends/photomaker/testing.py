"""Tiny PhotoMaker pipelines and checkpoints in the official layout (test support).

``write_tiny_checkpoint`` saves a tiny encoder's weights and a random LoRA on every
attention projection of a (tiny) UNet exactly as the official files are organised, so
``load_photomaker`` can be exercised end to end without the real weights. ``tiny_setup``
(the demo's pipeline) and ``speed_setup`` (the speed script's) reach the CLI and the
benchmark through the backend's extras.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bf_backends.photomaker.modules import (
    ENCODER_CLASSES,
    PhotoMakerIDEncoderV1,
    PhotoMakerIDEncoderV2,
)
from bf_core.errors import ConfigError
from bf_core.extras import PipelineSetup, SpeedSetup

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def _projection_linear(attention: torch.nn.Module, projection: str) -> torch.nn.Linear:
    linear = attention.to_out[0] if projection == "to_out" else getattr(attention, projection)
    return getattr(linear, "base_layer", linear)  # skip a PEFT wrapper if one is there


def make_tiny_lora_weights(unet: torch.nn.Module, rank: int = 4, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random LoRA on every attention processor of ``unet``, in the official key format.

    Keys ``unet.<processor name>.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``; down
    (rank, in), up (out, rank). Values are scaled so the LoRA visibly changes the UNet
    output without swamping it.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for processor_name in unet.attn_processors:
        attention = unet.get_submodule(processor_name.removesuffix(".processor"))
        for projection in _PROJECTIONS:
            linear = _projection_linear(attention, projection)
            prefix = f"unet.{processor_name}.{projection}_lora"
            down = torch.randn(rank, linear.in_features, generator=generator)
            up = torch.randn(linear.out_features, rank, generator=generator)
            weights[f"{prefix}.down.weight"] = (down / math.sqrt(linear.in_features)).to(dtype)
            weights[f"{prefix}.up.weight"] = (up * 0.1 / math.sqrt(rank)).to(dtype)
    return weights


def write_tiny_checkpoint(path: str | os.PathLike, version: str,
                          encoder: PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2,
                          unet: torch.nn.Module, *, rank: int = 4, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write ``encoder`` and a random LoRA for ``unet`` as a PhotoMaker checkpoint.

    ``.safetensors``: one namespace, keys prefixed ``id_encoder.`` / ``lora_weights.``;
    any other suffix (``.bin``): ``torch.save`` of ``{"id_encoder": ..., "lora_weights":
    ...}``. ``version`` must be the encoder's. Returns the path.
    """
    if encoder.version != version:
        raise ValueError(f"version={version!r} but the encoder is {encoder.version}; pass the "
                         "encoder's own version.")
    path = Path(path)
    id_encoder = {key: tensor.detach().to("cpu", dtype).clone().contiguous()
                  for key, tensor in encoder.state_dict().items()}
    lora_weights = make_tiny_lora_weights(unet, rank=rank, seed=seed, dtype=dtype)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"id_encoder.{key}": tensor for key, tensor in id_encoder.items()}
        flat.update({f"lora_weights.{key}": tensor for key, tensor in lora_weights.items()})
        save_file(flat, str(path))
    else:
        torch.save({"id_encoder": id_encoder, "lora_weights": lora_weights}, path)
    return path


# --------------------------------------------------------------------------------------
# A tiny PhotoMaker pipeline (tests, ``beyondfacial demo``)
# --------------------------------------------------------------------------------------

ASSETS = Path(__file__).parent / "assets"


def reference_photo_path() -> Path:
    """The bundled reference portrait (public domain; see ``assets/SOURCE.md``)."""
    return ASSETS / "astronaut.jpg"


@functools.lru_cache(maxsize=4)
def random_face_pack(seed: int = 0) -> Path:
    """A random-weight ``buffalo_l``-named insightface pack in a temporary folder.

    Written once per process and seed. Its detector finds faces on every image (the
    score bias is strongly positive), so V2's face path runs insightface's real code on
    any photo; the embeddings are random functions of the face crops.
    """
    from bf_core.testing.faces import make_random_insightface_pack

    folder = Path(tempfile.mkdtemp(prefix="beyondfacial-faces-")) / "buffalo_l"
    return make_random_insightface_pack(folder, seed=seed, face_logit_bias=10.0)


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_pipeline(version: int | str = 2, seed: int = 0, scheduler: str = "ddim",
                  *, face_analyzer: Any = "random"):
    """A tiny random-weight SDXL pipeline with PhotoMaker ``version`` loaded, offline.

    The core's tiny SDXL pipeline plus a tiny encoder and a rank-4 LoRA on every UNet
    attention projection, written in the official checkpoint layout and read back with
    ``load_photomaker`` (so the real loading path runs). For V2, ``face_analyzer``
    "random" attaches a ``FaceAnalyzer`` over ``random_face_pack()`` (needs insightface,
    onnxruntime and onnx); None leaves the default (real ``buffalo_l``); or pass an
    analyzer. Deterministic per ``seed``; the global random state is left alone.
    """
    from bf_backends.photomaker.loader import load_photomaker, normalize_version
    from bf_core.testing import tiny_sdxl_pipeline

    version = normalize_version(version)
    pipe = tiny_sdxl_pipeline(seed=seed, scheduler=scheduler)
    source = _seeded(lambda: build_tiny_encoder(version), seed + 10)
    checkpoint = {
        "id_encoder": {key: tensor.detach().clone() for key, tensor in source.state_dict().items()},
        "lora_weights": make_tiny_lora_weights(pipe.unet, rank=4, seed=seed),
    }
    # Loading into a meta-built tiny encoder: no second random initialisation.
    with torch.device("meta"):
        target = build_tiny_encoder(version)
    state = load_photomaker(pipe, checkpoint, version, encoder=target)
    if version == "v2" and face_analyzer is not None:
        if face_analyzer == "random":
            from bf_core.faces import PHOTOMAKER_RETRY_DET_SIZES, FaceAnalyzer

            # A small detector input keeps the random detector's face count (and so the
            # recogniser's work) small; the larger sizes are still tried if none is found.
            face_analyzer = FaceAnalyzer(model=random_face_pack(), det_size=(128, 128),
                                         providers=["CPUExecutionProvider"],
                                         retry_det_sizes=PHOTOMAKER_RETRY_DET_SIZES)
        state.face_analyzer = face_analyzer
    return pipe


DEMO_PROMPT = "a person img is kneeling by a small lake, touching the water, full body, wide shot"


def tiny_setup(seed: int = 0) -> PipelineSetup:
    """The demo's pipeline: a tiny V2 pipeline with the bundled reference photo and P_id.

    Falls back to V1 (no face analysis) when insightface, onnxruntime or onnx is not
    installed. A random face pack rides on the pipeline, so no face option is needed.
    """
    import warnings

    from bf_core.errors import MissingDependencyError

    try:
        pipe = tiny_pipeline(version=2, seed=seed)
        pipe.photomaker.face_analyzer.app  # noqa: B018  (build it now: fail here, not mid-call)
    except (ImportError, MissingDependencyError) as exc:
        warnings.warn(f"PhotoMaker V2's face analysis is unavailable ({exc}); the demo uses "
                      "V1. Install beyondfacial[faces] and onnx for V2.", stacklevel=2)
        pipe = tiny_pipeline(version=1, seed=seed)
    return PipelineSetup(pipe, identity={"id_images": [str(reference_photo_path())],
                                         "id_prompt": "a person img"})


#: The rank of the published PhotoMaker LoRA.
REAL_LORA_RANK = 64
ARCFACE_DIM = 512


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """PhotoMaker V2 at the pipeline's size (random weights): its ID encoder and LoRA via
    ``load_photomaker``; a precomputed ArcFace embedding replaces the face analyser. The
    baseline (PhotoMaker's own algorithm) needs the trigger word in the scene prompt."""
    from PIL import Image

    from bf_backends.photomaker.loader import load_photomaker

    encoder = _seeded(lambda: PhotoMakerIDEncoderV2() if real else build_tiny_encoder("v2"), seed)
    checkpoint = {"id_encoder": encoder.state_dict(),
                  "lora_weights": make_tiny_lora_weights(pipe.unet, rank=REAL_LORA_RANK if real
                                                         else 4, seed=seed)}
    state = load_photomaker(pipe, checkpoint, "v2", encoder=encoder)
    trigger = state.trigger_word
    face = torch.randn((1, ARCFACE_DIM), generator=torch.Generator().manual_seed(seed))
    # The CLIP tower still reads pixels; their content does not change the cost.
    photo = Image.new("RGB", (96, 96), (180, 140, 120))
    identity = {"id_images": [photo], "id_prompt": f"a person {trigger}", "id_embeds": face}
    return SpeedSetup(pipe, identity, prompt=f"a person {trigger} is kneeling by a small lake, "
                                             "touching the water gently")


# --------------------------------------------------------------------------------------
# The official pipeline, imitated by its attributes (no official package imported)
# --------------------------------------------------------------------------------------


class OfficialLikeEncoder(torch.nn.Module):
    """The official encoders' call: (pixels (1, N, 3, H, W), prompt_embeds, mask[, id_embeds]).

    Like the official fuse module it writes the fused rows into ``prompt_embeds`` itself.
    """

    def __init__(self, ours):
        super().__init__()
        self.inner = ours
        if ours.version == "v2":
            self.qformer_perceiver = ours.qformer_perceiver  # what makes it recognisably V2

    def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds=None):
        fused = self.inner.fuse(prompt_embeds, class_tokens_mask,
                                self.inner.encode_id_tokens(id_pixel_values, id_embeds))
        prompt_embeds.copy_(fused)
        return prompt_embeds


class _Processed:
    def __init__(self, pixel_values):
        self.pixel_values = pixel_values


def official_like(pipe):
    """``pipe`` (a ``tiny_pipeline``) as an object carrying the official PhotoMaker
    pipeline's attributes: its class name, ``id_encoder``, ``trigger_word``, ``num_tokens``
    and ``id_image_processor``, and no ``pipe.photomaker``."""
    from diffusers import StableDiffusionXLPipeline

    from bf_backends.photomaker.images import preprocess_id_images

    class PhotoMakerStableDiffusionXLPipeline(StableDiffusionXLPipeline):
        def encode_prompt_with_trigger_word(self, *args, **kwargs):
            raise AssertionError("the backend builds the ID prompt itself")

    official = PhotoMakerStableDiffusionXLPipeline(**pipe.components)
    official.set_progress_bar_config(disable=True)
    state = pipe.photomaker
    official.id_encoder = OfficialLikeEncoder(state.encoder)
    official.trigger_word = state.trigger_word
    official.num_tokens = 2  # always 2 in current official code, also for V1
    official.id_image_processor = lambda images, return_tensors: _Processed(
        preprocess_id_images(images))
    return official


def tiny_vision_config() -> CLIPVisionConfig:
    """A 2-layer, 32-wide vision tower for tests (still 224 px, so 257 tokens).

    With ``projection_dim`` 32 and a second projection of 32 the ID vectors are 64 wide,
    the text width of the tiny test SDXL pipeline (two text encoders of hidden size 32).
    """
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, patch_size=14, image_size=224,
                            projection_dim=32)


def tiny_config(version: str) -> dict:
    """Constructor arguments of a tiny V1/V2 encoder whose ID vectors are 64 wide.

    64 = 32 + 32 matches the tiny test SDXL pipeline (two text encoders of hidden 32,
    UNet cross_attention_dim 64). V2 uses 16-wide perceiver heads (4 heads), one layer,
    and a narrow query projection.
    """
    kwargs: dict = {"vision_config": tiny_vision_config(), "second_projection_dim": 32}
    if version == "v2":
        kwargs.update(perceiver_head_dim=16, perceiver_depth=1, token_proj_ratio=1, ff_mult=2)
    elif version != "v1":
        raise ConfigError(f"unknown PhotoMaker version {version!r}; use 'v1' or 'v2'.")
    return kwargs


def build_tiny_encoder(version: str) -> PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2:
    """A tiny random-weight encoder of the given version (for tests)."""
    return ENCODER_CLASSES[version](**tiny_config(version))
