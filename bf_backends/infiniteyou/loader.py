"""Loading the official InfiniteYou checkpoints and attaching them to a FLUX.1 pipeline.

The published files (ByteDance/InfiniteYou, ``infu_flux_v1.0/{aes_stage2|sim_stage1}/``):

* ``image_proj_model.bin``: a ``torch.save`` pickle ``{"image_proj": <Resampler state
  dict>}``, read with ``torch.load(weights_only=True)`` and checked strictly: at FLUX.1's
  T5 width (4096) the ``image_proj`` keys and shapes must be the published Resampler's
  exactly (the manifest ``infiniteyou_image_proj_model.json``); smaller test models keep
  the layout with their own widths.
* ``InfuseNetModel/``: a diffusers ``FluxControlNetModel`` folder (``config.json`` +
  safetensors). The config and every tensor's key and shape (read from the safetensors
  headers, before any weight is loaded) are checked against what that config builds; at
  FLUX.1-dev's size the config must be the published InfuseNet's (manifest
  ``infiniteyou_infusenet.json``: 4 double and 10 single blocks, guidance embedding, no
  union mode, no hint block). Then ``FluxControlNetModel.from_pretrained`` loads it.

A file of another identity method is refused with what it looks like. ``attach_infiniteyou``
leaves an ``InfiniteYouParts`` at ``pipe.infiniteyou``: that attribute is how the backend
recognises a pipeline (and why the DreamBooth backend no longer does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bf_backends.infiniteyou.modules import InfiniteYouResampler, ResamplerShape
from bf_core.checkpoints import check_state_dict, expected_shapes, load_state_dict_file, load_strict
from bf_core.errors import CheckpointError, ConfigError, UnsupportedPipelineError

INFUSENET_FOLDER = "InfuseNetModel"
IMAGE_PROJ_FILE = "image_proj_model.bin"
IMAGE_PROJ_PART = "image_proj"
FACE_EMBEDDING_DIM = 512
ID_TOKEN_COUNT = 8
PUBLISHED_RESAMPLER = ResamplerShape()
#: ``InfuseNetModel/config.json`` of the published checkpoints (the manifest's config)
PUBLISHED_INFUSENET_CONFIG = {
    "patch_size": 1, "in_channels": 64, "num_layers": 4, "num_single_layers": 10,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
    "num_mode": None, "conditioning_embedding_channels": None,
}
_FLUX_DEV_SIZE = {"joint_attention_dim": 4096, "attention_head_dim": 128,
                  "num_attention_heads": 24}
_CONTROLNET_CLASS = "FluxControlNetModel"
_SAFETENSORS = "diffusion_pytorch_model.safetensors"
_SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SOURCE_HINT = ("ByteDance/InfiniteYou's infu_flux_v1.0/<aes_stage2|sim_stage1>/"
                f"{IMAGE_PROJ_FILE}")


# --------------------------------------------------------------------------- image_proj


def _shape_of(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if hasattr(value, "shape") else None


def is_infiniteyou_image_proj(image_proj: Mapping) -> bool:
    """True for a Resampler from a 512-wide face embedding to 8 tokens (the InfU layout)."""
    latents, proj_in = _shape_of(image_proj.get("latents")), _shape_of(image_proj.get("proj_in.weight"))
    return (latents is not None and proj_in is not None and len(latents) == 3
            and latents[:2] == (1, ID_TOKEN_COUNT) and proj_in[-1] == FACE_EMBEDDING_DIM)


def describe_checkpoint(state: Any) -> str:
    """What a loaded checkpoint object looks like, for refusing another method's file."""
    from bf_backends.instantid.loader import describe_checkpoint as describe_sdxl_checkpoint

    if not isinstance(state, Mapping) or not state:
        return f"not a state dict (a {type(state).__name__})"
    keys = [str(key) for key in state]
    if any(key.startswith(("pulid_encoder.", "pulid_ca.")) for key in keys):
        return "a PuLID-FLUX file (pulid_encoder / pulid_ca)"
    if any(key.startswith(("ip_adapter_proj_model.", "double_blocks.")) for key in keys):
        return "an XLabs FLUX IP-Adapter file (ip_adapter_proj_model / double_blocks)"
    part = state.get(IMAGE_PROJ_PART)
    if set(keys) == {IMAGE_PROJ_PART} and isinstance(part, Mapping) \
            and is_infiniteyou_image_proj(part):
        return "an InfiniteYou image_proj_model.bin"
    return describe_sdxl_checkpoint(state)


def read_image_proj(source: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """``image_proj_model.bin`` (or a dict, or a flat safetensors with ``image_proj.``
    keys) -> (the ``image_proj`` state dict, where it came from). Pickles are read with
    ``weights_only=True``. Anything else is refused, saying what it looks like."""
    where = "the given state dict" if isinstance(source, Mapping) else str(source)
    state = source if isinstance(source, Mapping) else load_state_dict_file(source)
    if isinstance(state, Mapping) and IMAGE_PROJ_PART not in state and state and all(
            str(k).startswith(f"{IMAGE_PROJ_PART}.") for k in state):
        state = {IMAGE_PROJ_PART: {str(k).partition(".")[2]: v for k, v in state.items()}}
    looks_like = describe_checkpoint(state)
    if looks_like != "an InfiniteYou image_proj_model.bin":
        raise CheckpointError(
            f"{where} is not an InfiniteYou image_proj_model.bin: it looks like {looks_like}. "
            f"Pass {_SOURCE_HINT}, which holds only '{IMAGE_PROJ_PART}' (a Resampler from a "
            f"{FACE_EMBEDDING_DIM}-wide ArcFace embedding to {ID_TOKEN_COUNT} tokens).")
    return dict(state[IMAGE_PROJ_PART]), where


def resampler_shape_for(output_dim: int, width: int | None = None) -> ResamplerShape:
    """The Resampler that fits T_id of ``output_dim``: the published one at FLUX.1's T5
    width, else the published layout with ``width`` (64-wide heads)."""
    if output_dim == PUBLISHED_RESAMPLER.output_dim or width is None:
        width = PUBLISHED_RESAMPLER.width
    head_dim = PUBLISHED_RESAMPLER.head_dim
    if width % head_dim:
        raise CheckpointError(f"InfiniteYou image_proj: latents width {width} is not a multiple "
                              f"of the {head_dim}-wide heads; the file is damaged or of another "
                              "method.")
    return ResamplerShape(width=width, heads=width // head_dim, output_dim=output_dim)


def image_proj_shapes(shape: ResamplerShape) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the ``image_proj`` part for a Resampler of ``shape`` (meta)."""
    with torch.device("meta"):
        return expected_shapes(InfiniteYouResampler(shape))


def check_image_proj(image_proj: Mapping[str, torch.Tensor], output_dim: int,
                     where: str = "image_proj") -> ResamplerShape:
    """Strict key-and-shape check of the ``image_proj`` part for T_id of ``output_dim``;
    returns the Resampler's shape. Raises ``CheckpointError`` naming the file and the
    missing, unexpected and mis-shaped keys."""
    latents = _shape_of(image_proj.get("latents"))
    shape = resampler_shape_for(output_dim, latents[-1] if latents else None)
    check_state_dict(image_proj, image_proj_shapes(shape),
                     f"InfiniteYou image_proj of {where} (Resampler {FACE_EMBEDDING_DIM} -> "
                     f"{shape.width} -> {output_dim}, {ID_TOKEN_COUNT} tokens)")
    return shape


def load_image_proj(source: str | os.PathLike | Mapping, output_dim: int
                    ) -> InfiniteYouResampler:
    """Our Resampler with the weights of ``image_proj_model.bin``, loaded strictly."""
    image_proj, where = read_image_proj(source)
    shape = check_image_proj(image_proj, output_dim, where)
    with torch.device("meta"):
        resampler = InfiniteYouResampler(shape)
    load_strict(resampler, image_proj, f"InfiniteYou image_proj of {where}")
    return resampler.eval()


# --------------------------------------------------------------------------- InfuseNet


def read_infusenet_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of an InfuseNet folder; refused when it is no FLUX ControlNet."""
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise CheckpointError(f"InfuseNet folder {folder} not found or without config.json; pass "
                              f"the {INFUSENET_FOLDER}/ folder of ByteDance/InfiniteYou's "
                              "infu_flux_v1.0/<aes_stage2|sim_stage1>/.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is not readable JSON ({exc}).") from exc
    check_infusenet_config(config, str(folder))
    return config


def _describe_model_class(name: Any) -> str:
    if name == "ControlNetModel":
        return "an SDXL/SD ControlNet (e.g. InstantID's IdentityNet)"
    if name == "FluxTransformer2DModel":
        return "a FLUX.1 base transformer"
    return f"a {name or 'model without _class_name'}"


def check_infusenet_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse a config that is no InstantX-style ``FluxControlNetModel`` (InfuseNet's form),
    and, at FLUX.1-dev's size, one that differs from the published InfuseNet's."""
    name = config.get("_class_name", _CONTROLNET_CLASS)
    if name != _CONTROLNET_CLASS:
        raise CheckpointError(f"{where} is not InfuseNet: its config describes "
                              f"{_describe_model_class(name)}, not a {_CONTROLNET_CLASS}.")
    if config.get("num_mode") is not None:
        raise CheckpointError(f"{where} is a FLUX ControlNet-Union (num_mode "
                              f"{config['num_mode']}), not InfiniteYou's InfuseNet.")
    if config.get("conditioning_embedding_channels") is not None:
        raise CheckpointError(f"{where} is an XLabs-style FLUX ControlNet (it has an input hint "
                              "block), not InfiniteYou's InfuseNet.")
    if all(config.get(key) == value for key, value in _FLUX_DEV_SIZE.items()):
        differs = {key: config.get(key) for key, value in PUBLISHED_INFUSENET_CONFIG.items()
                   if _config_value(config.get(key, value)) != _config_value(value)}
        if differs:
            published = {key: PUBLISHED_INFUSENET_CONFIG[key] for key in differs}
            raise CheckpointError(f"{where} is a FLUX.1-dev ControlNet but not InfiniteYou's "
                                  f"InfuseNet: it has {differs}, InfuseNet has {published}.")


def _config_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def infusenet_weight_shapes(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an InfuseNet folder's safetensors (one file or a sharded index) as
    an empty meta tensor of its shape, read from the headers: no weight is loaded."""
    from safetensors import safe_open

    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / _SAFETENSORS).is_file():
        files = [folder / _SAFETENSORS]
    else:
        raise CheckpointError(f"{folder} holds no InfuseNet weights; expected {_SAFETENSORS} "
                              f"or {_SAFETENSORS_INDEX} with its shards.")
    shapes: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no iterator
                    shape = handle.get_slice(key).get_shape()
                    shapes[key] = torch.empty(shape, device="meta")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); it may "
                                  "be truncated: download it again.") from exc
    return shapes


def infusenet_expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the ``FluxControlNetModel`` that ``config`` builds (meta)."""
    from diffusers import FluxControlNetModel

    with torch.device("meta"):
        model = FluxControlNetModel.from_config(dict(config))
    return expected_shapes(model)


def load_infusenet(source: str | os.PathLike | nn.Module, torch_dtype: torch.dtype | None = None):
    """InfuseNet as a diffusers ``FluxControlNetModel``: its folder checked (config, then
    every tensor's key and shape), then loaded with ``from_pretrained``. An already built
    model is checked the same way and returned as it is."""
    from diffusers import FluxControlNetModel

    if isinstance(source, nn.Module):
        where = f"the given {type(source).__name__}"
        check_infusenet_config(dict(source.config), where)
        check_state_dict(source.state_dict(), infusenet_expected_shapes(source.config),
                         f"InfuseNet ({where})")
        return source.eval()
    folder = Path(source)
    config = read_infusenet_config(folder)
    check_state_dict(infusenet_weight_shapes(folder), infusenet_expected_shapes(config),
                     f"InfuseNet weights in {folder}")
    model = FluxControlNetModel.from_pretrained(str(folder), torch_dtype=torch_dtype)
    return model.eval()


# --------------------------------------------------------------------------- the pipeline


class InfiniteYouParts(nn.Module):
    """What ``attach_infiniteyou`` leaves at ``pipe.infiniteyou``: InfuseNet, the Resampler
    and the face analyser of the reference photos (None: antelopev2, built when needed).

    Not a pipeline component, so ``pipe.to(...)`` does not move it: the session moves it to
    the call's device when they differ (or call ``pipe.infiniteyou.to(device)``).
    """

    def __init__(self, infusenet: nn.Module, resampler: InfiniteYouResampler,
                 face_analyzer: Any = None):
        super().__init__()
        self.infusenet, self.resampler = infusenet, resampler
        self.face_analyzer = face_analyzer


def find_infiniteyou_parts(pipe: Any) -> InfiniteYouParts | None:
    parts = getattr(pipe, "infiniteyou", None)
    return parts if isinstance(parts, InfiniteYouParts) else None


def check_fits_transformer(infusenet: nn.Module, transformer: nn.Module) -> None:
    """InfuseNet's residuals must have the transformer's token width, and both read the
    same packed latents, pooled text and rotary axes."""
    net, base = infusenet.config, transformer.config
    keys = ("in_channels", "pooled_projection_dim", "axes_dims_rope", "patch_size")
    mismatched = {key: (net[key], base[key]) for key in keys
                  if _config_value(net[key]) != _config_value(base[key])}
    inner = (net["num_attention_heads"] * net["attention_head_dim"],
             base["num_attention_heads"] * base["attention_head_dim"])
    if inner[0] != inner[1]:
        mismatched["inner width"] = inner
    if mismatched:
        raise ConfigError(f"InfuseNet does not fit this FLUX transformer: {mismatched} "
                          "(InfuseNet, transformer). InfiniteYou's InfuseNet is for FLUX.1-dev.")


def attach_infiniteyou(pipe: Any, infusenet: str | os.PathLike | nn.Module,
                       image_proj: str | os.PathLike | Mapping, face_analyzer: Any = None, *,
                       torch_dtype: torch.dtype | None = None) -> InfiniteYouParts:
    """Load InfiniteYou's two checkpoints for a FLUX.1 pipeline and set ``pipe.infiniteyou``.

    infusenet: the ``InfuseNetModel/`` folder (or a ``FluxControlNetModel``); image_proj:
    ``image_proj_model.bin`` (or its dict); face_analyzer: a ``bf_core.faces.FaceAnalyzer``
    (or any object with ``embed``/``detect``) for the reference photos, None for antelopev2.
    Both models go to the transformer's device, in ``torch_dtype`` (default: its dtype).
    """
    from bf_core.hosts.flux import has_identity_machinery, is_flux_pipeline

    if not is_flux_pipeline(pipe):
        raise UnsupportedPipelineError(f"{type(pipe).__name__} is not a FLUX.1 pipeline; "
                                       "InfiniteYou needs a diffusers FluxPipeline.")
    if has_identity_machinery(pipe):
        raise ConfigError("the pipeline already carries an identity method (an IP-Adapter, "
                          "PuLID-FLUX or InfiniteYou); they do not stack. Unload it first "
                          "(detach_infiniteyou(pipe) for InfiniteYou).")
    transformer = pipe.transformer
    dtype = torch_dtype or transformer.dtype
    net = load_infusenet(infusenet, torch_dtype=dtype)
    check_fits_transformer(net, transformer)
    resampler = load_image_proj(image_proj, net.config.joint_attention_dim)
    parts = InfiniteYouParts(net, resampler, face_analyzer).to(transformer.device, dtype)
    pipe.infiniteyou = parts
    return parts


def detach_infiniteyou(pipe: Any) -> InfiniteYouParts | None:
    """Remove ``pipe.infiniteyou`` (the pipeline is a plain FLUX pipeline again); returns it."""
    parts = find_infiniteyou_parts(pipe)
    if parts is not None:
        del pipe.infiniteyou
    return parts


def build_face_analyzer(options: Mapping[str, Any]):
    """The reference-photo analyser: ``face_analyzer`` if given, else antelopev2 detecting
    at 640, then 320, then 160 pixels until a face is found, as the official pipeline does."""
    if options.get("face_analyzer") is not None:
        return options["face_analyzer"]
    from bf_core.faces import FaceAnalyzer

    return FaceAnalyzer(options.get("face_model", "antelopev2"), root=options.get("face_model_root"),
                        providers=options.get("face_providers"), det_size=(640, 640),
                        retry_det_sizes=((320, 320), (160, 160)))


def load_infiniteyou_pipeline(base_model: str, checkpoint: str | os.PathLike, *,
                              torch_dtype: torch.dtype | None = None, device: str | None = None,
                              face_analyzer: Any = None, local_files_only: bool = False):
    """A FLUX.1 base model (FLUX.1-dev) with InfiniteYou from one model folder
    (``infu_flux_v1.0/aes_stage2`` or ``sim_stage1``: ``InfuseNetModel/`` +
    ``image_proj_model.bin``)."""
    from bf_core.hosts.flux import load_flux_pipeline

    folder = Path(checkpoint)
    if not (folder / IMAGE_PROJ_FILE).is_file() or not (folder / INFUSENET_FOLDER).is_dir():
        raise ConfigError(f"the InfiniteYou folder must hold {IMAGE_PROJ_FILE} and "
                          f"{INFUSENET_FOLDER}/ (ByteDance/InfiniteYou infu_flux_v1.0/"
                          f"<aes_stage2|sim_stage1>), got {str(folder)!r}")
    pipe = load_flux_pipeline(base_model, torch_dtype=torch_dtype, device=device,
                              local_files_only=local_files_only)
    attach_infiniteyou(pipe, folder / INFUSENET_FOLDER, folder / IMAGE_PROJ_FILE,
                       face_analyzer=face_analyzer, torch_dtype=torch_dtype)
    return pipe


def load_pipeline_setup(base_model: str, checkpoint: str | None, *, torch_dtype: Any = None,
                        device: str | None = None):
    """``BackendExtras.load_pipeline``: ``checkpoint`` is the InfiniteYou model folder; an
    ``antelopev2/`` pack inside it, when present, analyses every call's reference photos
    (else insightface's default root is searched)."""
    from bf_core.extras import PipelineSetup

    if checkpoint is None:
        raise ConfigError("InfiniteYou's checkpoint is its model folder; pass --checkpoint "
                          "infiniteyou=<infu_flux_v1.0/aes_stage2>")
    pack = Path(checkpoint) / "antelopev2"
    analyzer = build_face_analyzer({"face_model": str(pack)}) if pack.is_dir() else None
    pipe = load_infiniteyou_pipeline(base_model, checkpoint, torch_dtype=torch_dtype,
                                     device=device, face_analyzer=analyzer)
    return PipelineSetup(pipe)
