"""Load the official XLabs FLUX IP-Adapter (``ip_adapter.safetensors``) with diffusers.

The file (Hugging Face ``XLabs-AI/flux-ip-adapter``, formerly ``flux-ip-adapter.safetensors``)
is one flat state dict: ``ip_adapter_proj_model.{proj,norm}.*`` (CLIP ``image_embeds`` 768 ->
4 tokens of 4096) and ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``
(4096 -> 3072, with biases) for the 19 double-stream blocks. diffusers' own
``pipe.load_ip_adapter`` converts and installs it, but its safetensors branch keeps only
the keys with known prefixes and drops every other one silently. So the file's key set and
shapes are checked first, strictly, against the layout of the pipeline's transformer (at
FLUX.1-dev size exactly ``checkpoints/xlabs_flux_ip_adapter.json``), reading only the
safetensors header; a checkpoint of another method is named as such.

:func:`load_xlabs_ip_adapter` is that check plus diffusers' loader; :func:`load_pipeline_setup`
is what the CLI and the benchmark call with a base model and the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from bf_core.checkpoints import check_state_dict, load_state_dict_file
from bf_core.errors import CheckpointError, UnsupportedPipelineError
from bf_core.extras import PipelineSetup

WEIGHT_NAMES = ("ip_adapter.safetensors", "flux-ip-adapter.safetensors")
PROJ_PREFIX = "ip_adapter_proj_model"
NUM_TOKENS = 4  # the XLabs ImageProjModel's clip_extra_context_tokens
CLIP_VIT_L_EMBED_DIM = 768  # openai/clip-vit-large-patch14 image_embeds
IMAGE_ENCODER = "openai/clip-vit-large-patch14"


# -- the official layout ------------------------------------------------------------------
def xlabs_shapes(num_layers: int, inner_dim: int, joint_dim: int, image_embed_dim: int,
                 num_tokens: int = NUM_TOKENS) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of an XLabs IP-Adapter file for a FLUX transformer.

    num_layers: double-stream blocks (19); inner_dim: heads x head width (3072);
    joint_dim: the text-token width (4096); image_embed_dim: the CLIP ``image_embeds``
    width (768). The projection is Linear(image_embed_dim -> num_tokens * joint_dim) and
    a LayerNorm(joint_dim); each block's k/v projections are Linear(joint_dim -> inner_dim).
    """
    shapes = {
        f"{PROJ_PREFIX}.proj.weight": (num_tokens * joint_dim, image_embed_dim),
        f"{PROJ_PREFIX}.proj.bias": (num_tokens * joint_dim,),
        f"{PROJ_PREFIX}.norm.weight": (joint_dim,),
        f"{PROJ_PREFIX}.norm.bias": (joint_dim,),
    }
    for i in range(num_layers):
        for kind in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kind}_proj"
            shapes[f"{prefix}.weight"] = (inner_dim, joint_dim)
            shapes[f"{prefix}.bias"] = (inner_dim,)
    return shapes


def xlabs_shapes_for(transformer: Any, image_embed_dim: int) -> dict[str, tuple[int, ...]]:
    """``xlabs_shapes`` at the size of ``transformer`` (a ``FluxTransformer2DModel``)."""
    config = transformer.config
    return xlabs_shapes(int(config.num_layers),
                        int(config.num_attention_heads) * int(config.attention_head_dim),
                        int(config.joint_attention_dim), image_embed_dim)


# -- what another checkpoint looks like ----------------------------------------------------
_FOREIGN_PREFIXES = (
    (("pulid_encoder.", "pulid_ca."), "a PuLID-FLUX checkpoint (pulid_flux_v0.9.1.safetensors), "
                                      "which the pulid_flux backend loads"),
    (("id_adapter.", "id_adapter_attn_layers."), "a PuLID SDXL checkpoint (pulid_v1 / v1.1), "
                                                 "which the pulid backend loads on SDXL"),
    (("id_encoder.", "lora_weights."), "a PhotoMaker checkpoint (SDXL)"),
    (("controlnet_blocks.", "input_hint_block."), "an XLabs FLUX ControlNet"),
    (("transformer.", "lora_unet_", "diffusion_model."), "a FLUX LoRA or transformer"),
)


def describe_foreign_checkpoint(keys: Iterable[str]) -> str | None:
    """What a checkpoint that is not an XLabs IP-Adapter looks like, from its keys alone;
    None when it looks like one (then the strict check names what is wrong)."""
    keys = [str(key) for key in keys]
    if any(key.startswith(PROJ_PREFIX + ".") or "ip_adapter_double_stream" in key
           for key in keys):
        return None
    if set(keys) == {"image_proj"}:
        return "an InfiniteYou image_proj_model.bin (the infiniteyou backend loads it)"
    if set(keys) == {"image_proj", "ip_adapter"}:
        return ("an SDXL IP-Adapter or InstantID .bin ({image_proj, ip_adapter} parts), which "
                "the ipadapter / instantid backends load on SDXL")
    if any(key.startswith(("image_proj.", "ip_adapter.")) for key in keys):
        if any(key.endswith("to_k_ip.bias") for key in keys):
            return ("a FLUX IP-Adapter already in diffusers' layout (image_proj. / ip_adapter. "
                    "keys); give the official XLabs ip_adapter.safetensors")
        return ("an SDXL IP-Adapter (h94/IP-Adapter layout: image_proj. / ip_adapter. keys), "
                "which the ipadapter backend loads on SDXL")
    if any(key.startswith("double_blocks.") and "lora" in key for key in keys):
        return "an XLabs FLUX LoRA"
    for prefixes, description in _FOREIGN_PREFIXES:
        if any(key.startswith(prefixes) for key in keys):
            return description
    return "no XLabs IP-Adapter (none of its ip_adapter_proj_model. / double_blocks. keys)"


def check_xlabs_checkpoint(tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                           what: str) -> None:
    """Raise ``CheckpointError`` unless ``tensors`` (anything with ``.shape``, meta tensors
    included) has exactly ``expected``'s keys and shapes. ``what`` names the file."""
    foreign = describe_foreign_checkpoint(tensors)
    if foreign is not None:
        raise CheckpointError(f"{what} is not an XLabs FLUX IP-Adapter: it looks like {foreign}.")
    check_state_dict(tensors, expected, f"XLabs FLUX IP-Adapter {what}")


def safetensors_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{key: meta tensor of its shape}`` from a safetensors header; no weight is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = handle.keys()  # a list; the handle itself is not iterable
            return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta")
                    for key in names}
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}). It may be "
                              "truncated or corrupt: download it again.") from exc


def checkpoint_file(checkpoint: str | os.PathLike) -> Path:
    """The adapter file: ``checkpoint`` itself, or the official file name inside a folder."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds none of {', '.join(WEIGHT_NAMES)}; download "
                              "ip_adapter.safetensors from XLabs-AI/flux-ip-adapter into it.")
    if not path.is_file():
        raise CheckpointError(f"XLabs IP-Adapter checkpoint not found: {path}")
    return path


def _refuse_other_formats(path: Path) -> None:
    """XLabs publishes safetensors only; a pickled file is read safely just to say what it is."""
    loaded = load_state_dict_file(path)
    described = describe_foreign_checkpoint(loaded) if isinstance(loaded, Mapping) else None
    raise CheckpointError(f"{path} is not an XLabs FLUX IP-Adapter file (XLabs publishes "
                          f"ip_adapter.safetensors); it looks like {described or 'one'} in "
                          f"{path.suffix} format.")


# -- loading ------------------------------------------------------------------------------
def _image_embed_dim(pipe: Any, image_encoder: str | os.PathLike | None,
                     local_files_only: bool) -> int:
    """The CLIP width the projection must read: the pipeline's encoder's, else the one to be
    loaded (its config only), else the official ViT-L/14's."""
    current = getattr(pipe, "image_encoder", None)
    if current is not None:
        return int(current.config.projection_dim)
    if image_encoder is None:
        return CLIP_VIT_L_EMBED_DIM
    from transformers import CLIPVisionConfig

    try:
        config = CLIPVisionConfig.from_pretrained(str(image_encoder),
                                                  local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not read the image encoder {image_encoder!r} ({exc}); give "
                              f"a local copy of {IMAGE_ENCODER}, or allow downloads.") from exc
    return int(config.projection_dim)


def load_xlabs_ip_adapter(pipe: Any, checkpoint: str | os.PathLike, *,
                          image_encoder: str | os.PathLike | None = IMAGE_ENCODER,
                          image_encoder_dtype: torch.dtype | None = None,
                          image_embed_dim: int | None = None,
                          local_files_only: bool = False) -> Path:
    """Check the XLabs file strictly, then load it with diffusers' ``pipe.load_ip_adapter``.

    checkpoint: ``ip_adapter.safetensors`` or a folder holding it. image_encoder: the CLIP
    vision model to register when the pipeline has none (a folder or hub id; None: register
    none, e.g. when one is already set or embeds are passed precomputed).
    image_encoder_dtype: default the transformer's. image_embed_dim: the CLIP width the
    file must read (default: the image encoder's, else 768). Returns the file loaded.
    """
    from bf_core.hosts.flux import is_flux_pipeline

    if not is_flux_pipeline(pipe):
        raise UnsupportedPipelineError(f"{type(pipe).__name__} is not a FLUX pipeline; the XLabs "
                                       "IP-Adapter is for FLUX.1-dev (FluxPipeline).")
    path = checkpoint_file(checkpoint)
    if path.suffix.lower() != ".safetensors":
        _refuse_other_formats(path)
    embed_dim = image_embed_dim or _image_embed_dim(pipe, image_encoder, local_files_only)
    check_xlabs_checkpoint(safetensors_shapes(path), xlabs_shapes_for(pipe.transformer, embed_dim),
                           str(path))
    dtype = image_encoder_dtype or pipe.transformer.dtype
    try:
        pipe.load_ip_adapter(str(path.parent), weight_name=path.name, subfolder="",
                             image_encoder_pretrained_model_name_or_path=(
                                 None if image_encoder is None else str(image_encoder)),
                             image_encoder_dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: diffusers could not load it as a FLUX IP-Adapter "
                              f"({type(exc).__name__}: {exc}).") from exc
    return path


def load_pipeline_setup(base_model: str, checkpoint: str | None, *, torch_dtype=None,
                        device: str | None = None,
                        image_encoder: str | os.PathLike = IMAGE_ENCODER) -> PipelineSetup:
    """``BackendExtras.load_pipeline``: FLUX.1-dev with the XLabs IP-Adapter and its CLIP
    ViT-L/14 image encoder (``image_encoder``: a local folder, or the hub id)."""
    from bf_core.hosts.flux import load_flux_pipeline

    if not checkpoint:
        raise CheckpointError("the XLabs IP-Adapter needs its checkpoint: the path of "
                              "ip_adapter.safetensors (XLabs-AI/flux-ip-adapter)")
    pipe = load_flux_pipeline(base_model, torch_dtype=torch_dtype)
    load_xlabs_ip_adapter(pipe, checkpoint, image_encoder=image_encoder,
                          image_encoder_dtype=torch_dtype)
    return PipelineSetup(pipe.to(device) if device else pipe)
