"""Tiny IP-Adapter checkpoints and image encoders for offline tests.

Everything here is built from random numbers with a fixed seed, in the key layout of the
official IP-Adapter files (a dict with ``image_proj`` and ``ip_adapter``), and loaded into a
pipeline through diffusers' own public ``load_ip_adapter``. The same shape rules produce
the real-size key sets, which the compatibility tests compare with the published
checkpoints' manifests; so a tiny adapter exercises exactly the code path a real one does.

Variants:

=================  ======================================  ==========================
variant            projection (diffusers class)            reads
=================  ======================================  ==========================
``vit-h``          ``ImageProjection``, 4 tokens           CLIP ``image_embeds``
``bigG``           ``ImageProjection``, wider input        CLIP ``image_embeds``
``plus``           ``IPAdapterPlusImageProjection``, 16    CLIP ``hidden_states[-2]``
``plus-face``      same weights layout as ``plus``         CLIP ``hidden_states[-2]``
``faceid``         ``IPAdapterFaceIDImageProjection``, 4   face embedding (512) + LoRA
``faceid-plusv2``  ``IPAdapterFaceIDPlusImageProjection``  face embedding + CLIP + LoRA
=================  ======================================  ==========================
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from bf_core.errors import ConfigError
from bf_core.extras import PipelineSetup, SpeedSetup

VARIANTS = ("vit-h", "plus", "plus-face", "faceid", "faceid-plusv2", "bigG")
CLIP_VARIANTS = frozenset({"vit-h", "bigG", "plus", "plus-face", "faceid-plusv2"})
FACEID_VARIANTS = frozenset({"faceid", "faceid-plusv2"})
PLUS_VARIANTS = frozenset({"plus", "plus-face"})

FACE_EMBED_DIM = 512  # insightface ArcFace embeddings, the same for tiny and real adapters
PLAIN_TOKENS = 4  # diffusers hard-codes 4 tokens for ImageProjection checkpoints
FACEID_TOKENS = 4  # IPAdapterFaceIDPlusImageProjection's default, which diffusers relies on
PLUS_QUERIES = 16  # the SDXL plus / plus-face resamplers
RESAMPLER_DEPTH = 4  # diffusers' key converters rename exactly layers 0..3
RESAMPLER_HEAD_DIM = 64  # diffusers infers the head count as to_q rows // 64
FACEID_MLP_MULT = 2  # official MLPProjModel / ProjPlusModel: 512 -> 1024 -> tokens * cross
REAL_FACEID_LORA_RANK = 128
TINY_FACEID_LORA_RANK = 4

#: The benchmark's tiny variant: a CLIP-image one, so the identity photos feed it directly
#: (FaceID variants would also need a face detector that finds faces in them).
TINY_VARIANT = "plus-face"
CLIP_VIT_H_HIDDEN = 1280  # IP-Adapter plus-face reads CLIP ViT-H/14 hidden states ...
CLIP_TOKENS = 257  # ... of a 224 px image: 16 x 16 patches and the class token

_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown IP-Adapter variant {variant!r}; choose one of {', '.join(VARIANTS)}.")


# ---------------------------------------------------------------------------------------
# Official key layouts (shapes only)
# ---------------------------------------------------------------------------------------

def _perceiver_shapes(width: int, in_dim: int, out_dim: int, prefix: str = "") -> dict:
    """Keys of the official perceiver resampler (``Resampler`` / ``FacePerceiverResampler``).

    ``width`` is the resampler's own width; it reads ``in_dim`` features and writes
    ``out_dim`` (the UNet's cross-attention width). Latent queries are not included.
    """
    heads = max(1, width // RESAMPLER_HEAD_DIM)
    inner = heads * RESAMPLER_HEAD_DIM
    shapes = {
        f"{prefix}proj_in.weight": (width, in_dim),
        f"{prefix}proj_in.bias": (width,),
        f"{prefix}proj_out.weight": (out_dim, width),
        f"{prefix}proj_out.bias": (out_dim,),
        f"{prefix}norm_out.weight": (out_dim,),
        f"{prefix}norm_out.bias": (out_dim,),
    }
    for i in range(RESAMPLER_DEPTH):
        block = f"{prefix}layers.{i}"
        shapes.update({
            f"{block}.0.norm1.weight": (width,),
            f"{block}.0.norm1.bias": (width,),
            f"{block}.0.norm2.weight": (width,),
            f"{block}.0.norm2.bias": (width,),
            f"{block}.0.to_q.weight": (inner, width),
            f"{block}.0.to_kv.weight": (2 * inner, width),
            f"{block}.0.to_out.weight": (width, inner),
            f"{block}.1.0.weight": (width,),  # feed-forward LayerNorm
            f"{block}.1.0.bias": (width,),
            f"{block}.1.1.weight": (4 * width, width),
            f"{block}.1.3.weight": (width, 4 * width),
        })
    return shapes


def _face_mlp_shapes(cross_attention_dim: int) -> dict:
    """The official FaceID MLP: 512 -> 1024 -> tokens * cross, then a LayerNorm per token."""
    hidden = FACE_EMBED_DIM * FACEID_MLP_MULT
    return {
        "proj.0.weight": (hidden, FACE_EMBED_DIM),
        "proj.0.bias": (hidden,),
        "proj.2.weight": (FACEID_TOKENS * cross_attention_dim, hidden),
        "proj.2.bias": (FACEID_TOKENS * cross_attention_dim,),
        "norm.weight": (cross_attention_dim,),
        "norm.bias": (cross_attention_dim,),
    }


def image_proj_shapes(variant: str, cross_attention_dim: int, image_embed_dim: int) -> dict:
    """``{key: shape}`` of the ``image_proj`` part of an official checkpoint.

    ``image_embed_dim`` is the CLIP width the projection reads: ``projection_dim`` for
    ``vit-h``/``bigG``, ``hidden_size`` for ``plus``/``plus-face``/``faceid-plusv2``; it is
    unused for ``faceid``. With (2048, 1024) or (2048, 1280) this gives the published files.
    """
    _check_variant(variant)
    if variant in ("vit-h", "bigG"):
        return {
            "proj.weight": (PLAIN_TOKENS * cross_attention_dim, image_embed_dim),
            "proj.bias": (PLAIN_TOKENS * cross_attention_dim,),
            "norm.weight": (cross_attention_dim,),
            "norm.bias": (cross_attention_dim,),
        }
    if variant in PLUS_VARIANTS:
        # The official Resampler is as wide as the CLIP hidden states it reads (1280).
        shapes = {"latents": (1, PLUS_QUERIES, image_embed_dim)}
        shapes.update(_perceiver_shapes(image_embed_dim, image_embed_dim, cross_attention_dim))
        return shapes
    shapes = _face_mlp_shapes(cross_attention_dim)
    if variant == "faceid-plusv2":
        # FacePerceiverResampler works at the cross-attention width and reads CLIP features.
        shapes.update(_perceiver_shapes(cross_attention_dim, image_embed_dim,
                                        cross_attention_dim, prefix="perceiver_resampler."))
    return shapes


def _attention_modules(unet) -> list[tuple[str, torch.nn.Module]]:
    """``(processor name, Attention module)`` in ``unet.attn_processors`` order."""
    suffix = ".processor"
    return [(name, unet.get_submodule(name[: -len(suffix)])) for name in unet.attn_processors]


def _linear_dims(layer) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, also when PEFT has wrapped it."""
    return int(layer.in_features), int(layer.out_features)


def ip_adapter_shapes(unet, variant: str, lora_rank: int = REAL_FACEID_LORA_RANK) -> dict:
    """``{key: shape}`` of the ``ip_adapter`` part of an official checkpoint for ``unet``.

    Keys are numbered by position in ``unet.attn_processors``: cross-attention processors
    (odd numbers in SDXL) hold ``to_k_ip``/``to_v_ip`` of shape (layer width,
    cross-attention width); FaceID files also hold rank-``lora_rank`` LoRA weights on every
    processor (``down`` (rank, in), ``up`` (out, rank)).
    """
    _check_variant(variant)
    shapes: dict[str, tuple[int, ...]] = {}
    for number, (_, attn) in enumerate(_attention_modules(unet)):
        if variant in FACEID_VARIANTS:
            for proj_name, linear in (("to_q", attn.to_q), ("to_k", attn.to_k),
                                      ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
                in_features, out_features = _linear_dims(linear)
                shapes[f"{number}.{proj_name}_lora.down.weight"] = (lora_rank, in_features)
                shapes[f"{number}.{proj_name}_lora.up.weight"] = (out_features, lora_rank)
        if attn.is_cross_attention:
            key_in, key_out = _linear_dims(attn.to_k)
            shapes[f"{number}.to_k_ip.weight"] = (key_out, key_in)
            shapes[f"{number}.to_v_ip.weight"] = (key_out, key_in)
    return shapes


# ---------------------------------------------------------------------------------------
# Random tensors in those layouts
# ---------------------------------------------------------------------------------------

def _random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A tensor whose scale keeps activations of a random network near unit size.

    1-D tensors (biases, LayerNorm parameters) get small centred values; matrices are
    scaled by 1/sqrt(fan_in), the resampler's latent queries by 1/sqrt(width) as the
    official code initialises them.
    """
    values = torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 0.1 * values
    return values / shape[-1] ** 0.5


def _fill(shapes: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {key: _random_tensor(shape, generator) for key, shape in shapes.items()}
    for key, tensor in tensors.items():
        # LayerNorm gains sit near 1 so that a random adapter does not zero its tokens.
        if tensor.ndim == 1 and key.endswith("weight"):
            tensors[key] = 1.0 + tensor
    return tensors


def tiny_image_encoder_config(variant: str, cross_attention_dim: int):
    """``CLIPVisionConfig`` of the tiny image encoder that ``variant`` reads.

    Widths keep the real ratios to the UNet's cross-attention width, which is how
    ``state.detect_variant`` tells bigG from ViT-H: ViT-H projects to half of it
    (1024 of 2048), bigG to five eighths (1280 of 2048). 224 px with 14 px patches gives
    257 tokens, as the real encoders do.
    """
    from transformers import CLIPVisionConfig

    _check_variant(variant)
    if variant == "bigG":
        hidden, projection = 48, cross_attention_dim * 5 // 8
    else:
        hidden, projection = 32, cross_attention_dim // 2
    return CLIPVisionConfig(hidden_size=hidden, image_size=224, projection_dim=projection,
                            intermediate_size=37, num_attention_heads=4, num_channels=3,
                            num_hidden_layers=5, patch_size=14)


def tiny_image_embed_dim(variant: str, cross_attention_dim: int) -> int:
    """Width of the CLIP features the tiny ``variant`` projection reads (see above)."""
    config = tiny_image_encoder_config(variant, cross_attention_dim)
    if variant in ("vit-h", "bigG"):
        return config.projection_dim
    return config.hidden_size


def tiny_image_encoder(variant: str, cross_attention_dim: int, seed: int = 0):
    """A random ``CLIPVisionModelWithProjection`` matching ``tiny_image_encoder_config``."""
    from transformers import CLIPVisionModelWithProjection

    config = tiny_image_encoder_config(variant, cross_attention_dim)
    torch.manual_seed(seed)  # transformers initialises from the global generator
    return CLIPVisionModelWithProjection(config).eval()


def tiny_feature_extractor():
    """The CLIP preprocessing of the real encoders: resize 224 bicubic, crop, OpenAI mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=224, size=224, do_center_crop=True, do_normalize=True,
                              do_resize=True, resample=3, image_mean=_OPENAI_CLIP_MEAN,
                              image_std=_OPENAI_CLIP_STD)


def tiny_adapter_state_dict(variant: str, unet, image_embed_dim: int | None = None,
                            seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random adapter for ``unet`` in the official ``{"image_proj", "ip_adapter"}`` layout.

    ``image_embed_dim`` defaults to the width of ``tiny_image_encoder(variant, ...)``;
    FaceID variants always read 512-d face embeddings and carry rank-4 LoRA on every
    attention processor, as the real files carry rank 128.
    """
    _check_variant(variant)
    cross = int(unet.config.cross_attention_dim)
    if image_embed_dim is None:
        image_embed_dim = tiny_image_embed_dim(variant, cross)
    generator = torch.Generator().manual_seed(seed)
    return {
        "image_proj": _fill(image_proj_shapes(variant, cross, image_embed_dim), generator),
        "ip_adapter": _fill(ip_adapter_shapes(unet, variant, TINY_FACEID_LORA_RANK), generator),
    }


# ---------------------------------------------------------------------------------------
# Loading through diffusers
# ---------------------------------------------------------------------------------------

def _attach_tiny_image_encoder(pipe, variant: str, seed: int) -> None:
    """Give ``pipe`` the tiny CLIP encoder ``variant`` reads, unless it already has a fitting one."""
    config = tiny_image_encoder_config(variant, int(pipe.unet.config.cross_attention_dim))
    current = getattr(pipe, "image_encoder", None)
    if current is not None:
        wanted = (config.hidden_size, config.projection_dim)
        have = (current.config.hidden_size, current.config.projection_dim)
        if have != wanted:
            raise ConfigError(f"the pipeline's image encoder has (hidden, projection) widths {have}"
                              f" but the tiny {variant!r} adapter reads {wanted}. Load adapters "
                              "that share one image encoder, or start from a fresh pipeline.")
        return
    encoder = tiny_image_encoder(variant, int(pipe.unet.config.cross_attention_dim), seed)
    encoder = encoder.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    pipe.register_modules(image_encoder=encoder)
    if getattr(pipe, "feature_extractor", None) is None:
        pipe.register_modules(feature_extractor=tiny_feature_extractor())


def _write_adapter_file(state_dict: dict, folder: Path, variant: str, file_format: str) -> str:
    """Write ``state_dict`` as the official ``.bin`` or flat-prefixed ``.safetensors``; return the name."""
    name = f"ip-adapter-tiny_{variant}.{file_format}"
    if file_format == "bin":
        torch.save(state_dict, folder / name)
    else:
        from safetensors.torch import save_file

        flat = {f"{part}.{key}": tensor.contiguous()
                for part, tensors in state_dict.items() for key, tensor in tensors.items()}
        save_file(flat, str(folder / name))
    return name


def load_tiny_adapter(pipe, variant: str, seed: int = 0, file_format: str = "bin",
                      tmp_dir: str | os.PathLike | None = None) -> dict:
    """Load a tiny random ``variant`` adapter into ``pipe`` with diffusers' ``load_ip_adapter``.

    ``file_format`` "bin" or "safetensors" writes the official file into ``tmp_dir`` (a
    temporary folder when None) and loads it from there offline; "dict" passes the state
    dict itself. Variants that read CLIP get the tiny image encoder and feature extractor
    first. Returns the state dict that was loaded (official layout).
    """
    _check_variant(variant)
    if file_format not in ("bin", "safetensors", "dict"):
        raise ConfigError(f"file_format must be 'bin', 'safetensors' or 'dict', not {file_format!r}.")
    state_dict = tiny_adapter_state_dict(variant, pipe.unet, seed=seed)
    if variant in CLIP_VARIANTS:
        _attach_tiny_image_encoder(pipe, variant, seed)
    # The encoder is attached above (or not needed), so diffusers must not look for one.
    options = {"subfolder": "", "image_encoder_folder": None}
    if file_format == "dict":
        pipe.load_ip_adapter(state_dict, weight_name="", **options)
        return state_dict
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(tmp_dir) if tmp_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        name = _write_adapter_file(state_dict, folder, variant, file_format)
        pipe.load_ip_adapter(str(folder), weight_name=name, local_files_only=True, **options)
    return state_dict


def tiny_pipeline(variant: str = "plus-face", seed: int = 0, scheduler: str = "ddim"):
    """A tiny offline SDXL pipeline with a tiny ``variant`` adapter loaded the official way.

    Built on ``bf_core.testing.tiny_sdxl_pipeline``; the adapter file (and, for CLIP
    variants, the tiny image encoder) is written in the official layout and loaded with
    diffusers' ``load_ip_adapter``. FaceID variants carry their LoRA (needs ``peft``).
    """
    from bf_core.testing import tiny_sdxl_pipeline

    _check_variant(variant)
    pipe = tiny_sdxl_pipeline(seed=seed, scheduler=scheduler)
    load_tiny_adapter(pipe, variant, seed=seed)
    return pipe


def reference_photo(seed: int = 0, size: int = 96):
    """A random RGB photo, the reference image of the tests: ``size`` x ``size`` uniform
    pixels from a seeded generator (CLIP variants read any picture)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# ---------------------------------------------------------------------------------------
# The demo's and the benchmarks' set-ups (``BackendExtras``)
# ---------------------------------------------------------------------------------------

def tiny_setup(seed: int = 0) -> PipelineSetup:
    """The tiny plus-face pipeline (``TINY_VARIANT``) with one reference photo and P_id."""
    return PipelineSetup(tiny_pipeline(TINY_VARIANT, seed=seed),
                         identity={"id_images": [reference_photo(seed)], "id_prompt": "a person"})


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """IP-Adapter plus-face at the pipeline's size (random weights), loaded with diffusers'
    ``load_ip_adapter`` and fed precomputed CLIP hidden states [negative; positive]
    (2, 1, 257, width), so no image encoder is loaded. ``lora_rank``: unused (no LoRA)."""
    cross = int(pipe.unet.config.cross_attention_dim)
    width = CLIP_VIT_H_HIDDEN if real else tiny_image_embed_dim(TINY_VARIANT, cross)
    state = tiny_adapter_state_dict(TINY_VARIANT, pipe.unet, image_embed_dim=width, seed=seed)
    pipe.load_ip_adapter(state, weight_name="", subfolder="", image_encoder_folder=None)
    embeds = torch.randn((2, 1, CLIP_TOKENS, width), generator=torch.Generator().manual_seed(seed))
    embeds = embeds.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    return SpeedSetup(pipe, {"ip_adapter_image_embeds": [embeds]})
