"""Loading the official InstantID checkpoints into plain diffusers objects.

* ``ip-adapter.bin``: a ``{"image_proj": Resampler, "ip_adapter": to_k_ip/to_v_ip}`` pickle.
  It is checked strictly against the UNet it goes into (every key and shape, named errors),
  then handed to diffusers' own ``load_ip_adapter``, which builds an
  ``IPAdapterPlusImageProjection`` (the same function as the official Resampler) and 70
  ``IPAdapterAttnProcessor2_0`` on an SDXL UNet.
* IdentityNet: a stock SDXL ``ControlNetModel``, read from a diffusers folder or a single
  ``.safetensors`` file with the published config, loaded strictly.

A file of another identity method is refused with a message saying what it looks like.

The loader also owns what the backend reads off a built pipeline (``find_instantid_parts``:
the projection, IdentityNet and the IP processors, in either of the two forms below) and
the face model the reference photos go through (``build_face_analyzer``, the antelopev2
pack), because both are the loaded pieces of an InstantID set-up, not the identity step.

Two ways a pipeline can carry InstantID (docs/backends/instantid.md), told apart by attributes
only, never by importing InstantID's code:

* ``"native"``: diffusers' ``load_ip_adapter`` put the Resampler on the UNet
  (``unet.encoder_hid_proj.image_projection_layers[0]``, 512 in, 16 queries) and installed
  ``IPAdapterAttnProcessor2_0`` (``scale`` a list); IdentityNet is ``pipe.controlnet``.
  This is what ``load_instantid_pipeline`` and ``testing.tiny_pipeline`` build.
* ``"official"``: the official ``StableDiffusionXLInstantIDPipeline`` after
  ``load_ip_adapter_instantid``: the Resampler is ``pipe.image_proj_model``, the UNet has
  processors with one ``nn.Linear`` ``to_k_ip``, an int ``num_tokens`` of 16 and a float
  ``scale``, and they read the last 16 context tokens as ID tokens.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bf_core.checkpoints import check_state_dict, expected_shapes, load_state_dict_file
from bf_core.errors import CheckpointError, ConfigError

FACE_EMBEDDING_DIM = 512  # raw antelopev2 (glintr100) embedding, not L2-normalised
ID_TOKEN_COUNT = 16  # Resampler queries = ID tokens per face set
RESAMPLER_WIDTH = 1280
RESAMPLER_DEPTH = 4  # diffusers' converter always builds depth 4, as InstantID uses
RESAMPLER_HEAD_DIM = 64
RESAMPLER_FF_MULT = 4
DEFAULT_IP_SCALE = 0.8  # what every official script passes (diffusers would start at 1.0)
DEFAULT_FACE_MODEL = "antelopev2"

_WEIGHT_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)

# ControlNetModel/config.json of the published IdentityNet (see the checkpoint manifest).
_IDENTITYNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}


# --------------------------------------------------------------------------- key layouts


def resampler_shapes(
    embedding_dim: int = FACE_EMBEDDING_DIM,
    hidden_dim: int = RESAMPLER_WIDTH,
    output_dim: int = 2048,
    num_queries: int = ID_TOKEN_COUNT,
    depth: int = RESAMPLER_DEPTH,
    ff_mult: int = RESAMPLER_FF_MULT,
) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the official Resampler's state dict (the ``image_proj`` part).

    Heads are 64 wide and the attention inner width equals ``hidden_dim`` (InstantID: 20
    heads x 64 = 1280). Defaults are the published InstantID file for SDXL.
    """
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, num_queries, hidden_dim),
        "proj_in.weight": (hidden_dim, embedding_dim),
        "proj_in.bias": (hidden_dim,),
        "proj_out.weight": (output_dim, hidden_dim),
        "proj_out.bias": (output_dim,),
        "norm_out.weight": (output_dim,),
        "norm_out.bias": (output_dim,),
    }
    for i in range(depth):
        attention, feed_forward = f"layers.{i}.0", f"layers.{i}.1"
        for norm in ("norm1", "norm2"):
            shapes[f"{attention}.{norm}.weight"] = (hidden_dim,)
            shapes[f"{attention}.{norm}.bias"] = (hidden_dim,)
        shapes[f"{attention}.to_q.weight"] = (hidden_dim, hidden_dim)
        shapes[f"{attention}.to_kv.weight"] = (2 * hidden_dim, hidden_dim)
        shapes[f"{attention}.to_out.weight"] = (hidden_dim, hidden_dim)
        shapes[f"{feed_forward}.0.weight"] = (hidden_dim,)
        shapes[f"{feed_forward}.0.bias"] = (hidden_dim,)
        shapes[f"{feed_forward}.1.weight"] = (ff_mult * hidden_dim, hidden_dim)
        shapes[f"{feed_forward}.3.weight"] = (hidden_dim, ff_mult * hidden_dim)
    return shapes


def cross_attention_numbering(unet) -> dict[int, str]:
    """``{k: attention module path}`` for every cross-attention layer of the UNet body.

    k is the 0-based position of the layer's processor in ``unet.attn_processors``, the
    number the official loader gives it (it loads ``ip_adapter`` into
    ``ModuleList(attn_processors.values())``). Processors of an IP projection attached to
    ``unet.encoder_hid_proj`` are skipped, as diffusers' loader does, because they are not
    part of the numbered UNet body. SDXL: k = 1, 3, ..., 139.
    """
    body = [name for name in unet.attn_processors if not name.startswith("encoder_hid_proj.")]
    return {k: name[: -len(".processor")] for k, name in enumerate(body)
            if not name.endswith("attn1.processor")}


def ip_adapter_shapes(unet) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the ``ip_adapter`` part that fits ``unet``.

    ``"{k}.to_k_ip.weight"`` and ``"{k}.to_v_ip.weight"``, shape (layer width,
    ``unet.config.cross_attention_dim``), for every k of ``cross_attention_numbering``.
    """
    context_dim = unet.config.cross_attention_dim
    shapes = {}
    for k, path in cross_attention_numbering(unet).items():
        width = unet.get_submodule(path).to_q.in_features
        shapes[f"{k}.to_k_ip.weight"] = (width, context_dim)
        shapes[f"{k}.to_v_ip.weight"] = (width, context_dim)
    return shapes


def config_for_identitynet() -> dict:
    """The ``ControlNetModel`` config of the published IdentityNet (a fresh copy)."""
    return copy.deepcopy(_IDENTITYNET_CONFIG)


# --------------------------------------------------------------------------- recognition


def _first_keys(state: Mapping, count: int = 4) -> str:
    return ", ".join(list(map(str, state))[:count])


def _describe_image_proj(image_proj: Mapping) -> str:
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        in_width = tuple(image_proj["proj_in.weight"].shape)[1]
        queries = tuple(image_proj["latents"].shape)[1]
        if in_width == FACE_EMBEDDING_DIM and queries == ID_TOKEN_COUNT:
            return "an InstantID ip-adapter file (Resampler from a 512-wide face embedding)"
        return (f"an IP-Adapter Plus file (Resampler over {in_width}-wide CLIP image features, "
                f"{queries} tokens)")
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "an IP-Adapter FaceID-Plus file"
    if "proj.3.weight" in image_proj:
        return "an IP-Adapter Full-face file"
    if "proj.weight" in image_proj:
        return "a plain IP-Adapter file (one global CLIP image embedding)"
    if "norm.weight" in image_proj:
        return "an IP-Adapter FaceID file"
    return f"an IP-Adapter-style file with an unknown image projection ({_first_keys(image_proj)})"


def describe_checkpoint(state: Mapping) -> str:
    """A short human description of what a loaded checkpoint object looks like."""
    if not isinstance(state, Mapping) or not state:
        return f"not a state dict (a {type(state).__name__})"
    keys = [str(k) for k in state]
    if "image_proj" in state and isinstance(state["image_proj"], Mapping):
        return _describe_image_proj(state["image_proj"])
    if "id_encoder" in state:
        version = "V2" if any("qformer_perceiver" in k for k in state["id_encoder"]) else "V1"
        return f"a PhotoMaker {version} file (id_encoder + lora_weights)"
    if any(k.startswith(("id_adapter.", "id_adapter_attn_layers.")) for k in keys):
        return "a PuLID file (id_adapter / id_adapter_attn_layers)"
    if any(k.startswith("image_proj.") for k in keys):
        inner = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
        return _describe_image_proj(inner) + " in the flat safetensors layout"
    if any("controlnet_cond_embedding" in k for k in keys):
        return "a diffusers ControlNet"
    if any(k.startswith("control_model.") for k in keys):
        return "an original-format (non-diffusers) ControlNet"
    if any("lora" in k.lower() for k in keys):
        return "a LoRA file"
    if "conv_in.weight" in state and any(k.startswith("up_blocks.") for k in keys):
        return "a diffusers UNet"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a full original-format Stable Diffusion checkpoint"
    if any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in keys):
        return "a VAE"
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return "a CLIP encoder"
    return f"an unrecognised state dict with {len(keys)} entries ({_first_keys(state)}, ...)"


# --------------------------------------------------------------------------- ip-adapter.bin


def read_instantid_adapter(source) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``ip-adapter.bin`` (or a flat ``.safetensors`` / an in-memory dict) into two parts.

    Returns ``{"image_proj": {...}, "ip_adapter": {...}}``. Pickles are read with
    ``weights_only=True``. A flat dict with ``image_proj.`` / ``ip_adapter.`` prefixes is
    split. Anything that is not an InstantID adapter raises ``CheckpointError`` saying what
    the file looks like.
    """
    where = "the given state dict" if isinstance(source, Mapping) else str(source)
    state = source if isinstance(source, Mapping) else load_state_dict_file(source)
    if isinstance(state, Mapping) and "image_proj" not in state and any(
            str(k).startswith("image_proj.") for k in state):
        parts: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state.items():
            part, _, rest = str(key).partition(".")
            parts.setdefault(part, {})[rest] = value
        state = parts
    looks_like = describe_checkpoint(state)
    has_parts = isinstance(state, Mapping) and all(
        isinstance(state.get(part), Mapping) for part in ("image_proj", "ip_adapter"))
    if not has_parts or not looks_like.startswith("an InstantID"):
        raise CheckpointError(
            f"{where} is not an InstantID ip-adapter file: it looks like {looks_like}. "
            "Pass InstantX/InstantID's ip-adapter.bin, which holds 'image_proj' (a Resampler "
            "from a 512-wide face embedding to 16 tokens) and 'ip_adapter'.")
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}


def check_instantid_adapter(state: Mapping[str, Mapping[str, torch.Tensor]], unet) -> None:
    """Strict key-and-shape check of both parts against what ``unet`` needs.

    The Resampler width is read from ``latents`` (1280 in the published file); everything
    else is fixed by InstantID (512 in, 16 queries, depth 4, 64-wide heads) and by the
    UNet (output width = ``cross_attention_dim``; one to_k_ip/to_v_ip pair per
    cross-attention layer). Raises ``CheckpointError`` naming missing, unexpected and
    mis-shaped keys.
    """
    image_proj = state["image_proj"]
    latents = image_proj.get("latents")
    hidden_dim = tuple(latents.shape)[-1] if latents is not None else RESAMPLER_WIDTH
    if hidden_dim % RESAMPLER_HEAD_DIM:
        raise CheckpointError(
            f"InstantID image_proj: latents width {hidden_dim} is not a multiple of the "
            f"{RESAMPLER_HEAD_DIM}-wide heads; the file is damaged or of another method.")
    output_dim = unet.config.cross_attention_dim
    check_state_dict(image_proj, resampler_shapes(output_dim=output_dim, hidden_dim=hidden_dim),
                     f"InstantID image_proj (Resampler for a UNet of context width {output_dim})")
    check_state_dict(state["ip_adapter"], ip_adapter_shapes(unet),
                     "InstantID ip_adapter (to_k_ip/to_v_ip per cross-attention layer)")


def find_instantid_projection(unet):
    """The diffusers-native InstantID Resampler installed on ``unet``, or ``None``.

    Recognised as ``unet.encoder_hid_proj.image_projection_layers[0]`` being an
    ``IPAdapterPlusImageProjection`` with a 512-wide ``proj_in`` and 16 queries.
    """
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    layers = getattr(getattr(unet, "encoder_hid_proj", None), "image_projection_layers", None)
    if not layers:
        return None
    projection = layers[0]
    if (isinstance(projection, IPAdapterPlusImageProjection)
            and projection.proj_in.in_features == FACE_EMBEDDING_DIM
            and projection.latents.shape[1] == ID_TOKEN_COUNT):
        return projection
    return None


def load_instantid_adapter(pipe, source, scale: float = DEFAULT_IP_SCALE,
                           low_cpu_mem_usage: bool | None = None):
    """Load ``ip-adapter.bin`` into a diffusers SDXL pipeline through ``pipe.load_ip_adapter``.

    ``source`` is a path or an already-read dict. The file is checked strictly against
    ``pipe.unet`` first, so a wrong file fails with named keys rather than inside diffusers.
    Afterwards the UNet carries the Resampler as ``encoder_hid_proj`` and 70 IP processors,
    with every scale set to ``scale`` (the official scripts use 0.8). Returns the projection
    module (``find_instantid_projection(pipe.unet)``).
    """
    if not hasattr(pipe, "load_ip_adapter"):
        raise ConfigError(f"{type(pipe).__name__} has no load_ip_adapter method; pass a diffusers "
                          "SDXL pipeline (StableDiffusionXLPipeline or a ControlNet variant).")
    if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
        raise ConfigError(
            "the pipeline's UNet already has an IP-Adapter (or other image projection) loaded; "
            "InstantID and diffusers IP-Adapters do not stack. Call pipe.unload_ip_adapter() "
            "first.")
    state = read_instantid_adapter(source)
    check_instantid_adapter(state, pipe.unet)
    kwargs = {} if low_cpu_mem_usage is None else {"low_cpu_mem_usage": low_cpu_mem_usage}
    pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None, **kwargs)
    projection = find_instantid_projection(pipe.unet)
    if projection is None:  # diffusers changed how it recognises the Resampler
        raise CheckpointError(
            "diffusers did not build an IPAdapterPlusImageProjection from the InstantID file; "
            "this diffusers version is not supported (tested: 0.37-0.42).")
    pipe.set_ip_adapter_scale(scale)
    return projection


# --------------------------------------------------------------------------- IdentityNet


def _identitynet_source(source: Path, config: Mapping | None) -> tuple[dict, Path]:
    """(config, weights file) for a diffusers model folder or a single weights file."""
    if source.is_dir():
        config_file = source / "config.json"
        weights = next((source / n for n in _WEIGHT_FILE_NAMES if (source / n).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"{source} holds no ControlNet weights; expected one of "
                f"{', '.join(_WEIGHT_FILE_NAMES)} (InstantX/InstantID's ControlNetModel folder).")
    else:
        config_file, weights = source.parent / "config.json", source
    if config is not None:
        return dict(config), weights
    if config_file.is_file():
        return json.loads(config_file.read_text()), weights
    return config_for_identitynet(), weights


def load_identitynet(source: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                     config: Mapping | None = None):
    """IdentityNet as a diffusers ``ControlNetModel``, loaded strictly.

    ``source`` is InstantX/InstantID's ``ControlNetModel`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``) or one weights file; a file without a
    ``config.json`` beside it uses ``config_for_identitynet()`` unless ``config`` is given.
    The model is built on the meta device and takes the file's tensors directly (no random
    initialisation of 1.25 B parameters), then is cast to ``torch_dtype`` if given.
    """
    from diffusers import ControlNetModel

    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"IdentityNet not found at {source}; pass InstantX/InstantID's "
                              "ControlNetModel folder or its .safetensors file.")
    model_config, weights = _identitynet_source(source, config)
    state = load_state_dict_file(weights)
    looks_like = describe_checkpoint(state)
    if looks_like != "a diffusers ControlNet":
        raise CheckpointError(f"{weights} is not a diffusers ControlNet: it looks like "
                              f"{looks_like}. Pass InstantX/InstantID's ControlNetModel weights.")
    with torch.device("meta"):
        model = ControlNetModel.from_config(model_config)
    check_state_dict(state, expected_shapes(model), f"IdentityNet ControlNet ({weights.name})")
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CheckpointError("IdentityNet: some tensors were not filled from the file; this "
                              "diffusers version builds state the file does not carry.")
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()


# --------------------------------------------------------------------------- pipelines


def assemble_instantid_pipeline(sdxl_pipe, identitynet, ip_adapter,
                                scale: float = DEFAULT_IP_SCALE):
    """An InstantID pipeline from a diffusers SDXL pipeline's components.

    Builds a ``StableDiffusionXLControlNetPipeline`` that shares ``sdxl_pipe``'s modules,
    with ``identitynet`` (a ``ControlNetModel``) as its ControlNet, and loads ``ip_adapter``
    (path or dict) into its UNet with every ID-attention scale at ``scale``. The backend
    drives it; its own ``__call__`` would feed text to IdentityNet, which is not InstantID.
    """
    from diffusers import StableDiffusionXLControlNetPipeline

    wanted = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
              "scheduler", "feature_extractor", "image_encoder")
    components = {name: sdxl_pipe.components.get(name) for name in wanted}
    pipe = StableDiffusionXLControlNetPipeline(
        **components, controlnet=identitynet,
        force_zeros_for_empty_prompt=sdxl_pipe.config.get("force_zeros_for_empty_prompt", True),
        add_watermarker=getattr(sdxl_pipe, "watermark", None) is not None)
    pipe.set_progress_bar_config(**getattr(sdxl_pipe, "_progress_bar_config", {}))
    load_instantid_adapter(pipe, ip_adapter, scale=scale)
    return pipe


def load_instantid_pipeline(base_model: str | os.PathLike, ip_adapter: str | os.PathLike,
                            identitynet: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                            scale: float = DEFAULT_IP_SCALE, **from_pretrained_kwargs):
    """Base SDXL model (folder or hub id in the local cache) + the two InstantID checkpoints.

    ``ip_adapter``: InstantX/InstantID's ``ip-adapter.bin``; ``identitynet``: its
    ``ControlNetModel`` folder. Nothing is downloaded unless ``from_pretrained_kwargs``
    allow diffusers to.
    """
    from diffusers import StableDiffusionXLPipeline

    net = load_identitynet(identitynet, torch_dtype=torch_dtype)
    base = StableDiffusionXLPipeline.from_pretrained(base_model, torch_dtype=torch_dtype,
                                                     **from_pretrained_kwargs)
    # diffusers' loader builds the projection on the UNet's device and dtype.
    return assemble_instantid_pipeline(base, net, read_instantid_adapter(ip_adapter), scale)


def load_pipeline_setup(base_model: str, checkpoint: str | None, *, torch_dtype: Any = None,
                        device: str | None = None):
    """``BackendExtras.load_pipeline``: a base SDXL model with InstantX/InstantID's folder.

    ``checkpoint`` is a folder holding ``ip-adapter.bin`` and ``ControlNetModel/``, and
    optionally the ``antelopev2/`` face pack; with the pack, its analyser goes to every call
    (``options["face_analyzer"]``), else the pack is looked up in insightface's default root.
    """
    from bf_core.extras import PipelineSetup

    folder = Path(checkpoint) if checkpoint else None
    if folder is None or not (folder / "ip-adapter.bin").is_file() \
            or not (folder / "ControlNetModel").is_dir():
        raise ConfigError(f"InstantID's benchmark checkpoint must be a folder holding "
                          f"ip-adapter.bin and ControlNetModel/ (InstantX/InstantID), got "
                          f"{checkpoint!r}; pass --checkpoint instantid=<that folder>")
    pipe = load_instantid_pipeline(base_model, str(folder / "ip-adapter.bin"),
                                   str(folder / "ControlNetModel"), torch_dtype=torch_dtype)
    if device:
        pipe.to(device)
    pack = folder / "antelopev2"
    options = {"face_analyzer": build_face_analyzer({"face_model": str(pack)})} \
        if pack.is_dir() else {}
    return PipelineSetup(pipe, options=options)


# --------------------------------------------------------------------------- pipeline parts


def _official_projection(pipe: Any, cross_attention_dim: int):
    """``pipe.image_proj_model`` if it is InstantID's Resampler (512 in, 16 x 1280, D out)."""
    model = getattr(pipe, "image_proj_model", None)
    proj_in = getattr(model, "proj_in", None)
    latents = getattr(model, "latents", None)
    proj_out = getattr(model, "proj_out", None)
    if not all(isinstance(m, torch.nn.Module) for m in (model, proj_in, proj_out)) \
            or not isinstance(latents, torch.Tensor):
        return None
    if getattr(proj_in, "in_features", None) != FACE_EMBEDDING_DIM or latents.ndim != 3 \
            or latents.shape[1] != ID_TOKEN_COUNT \
            or getattr(proj_out, "out_features", None) != cross_attention_dim:
        return None
    return model


def _official_ip_processors(unet) -> list:
    """Official-style IP processors: a single Linear ``to_k_ip`` and ``num_tokens == 16``."""
    return [proc for proc in unet.attn_processors.values()
            if isinstance(getattr(proc, "to_k_ip", None), torch.nn.Linear)
            and getattr(proc, "num_tokens", None) == ID_TOKEN_COUNT
            and isinstance(getattr(proc, "scale", None), (int, float))]


def _native_ip_processors(unet) -> list:
    return [proc for proc in unet.attn_processors.values()
            if hasattr(proc, "to_k_ip") and isinstance(getattr(proc, "scale", None), list)]


def _controlnet_of(pipe: Any):
    """IdentityNet: ``pipe.controlnet`` or, for a MultiControlNet, its only net."""
    controlnet = getattr(pipe, "controlnet", None)
    nets = getattr(controlnet, "nets", None)
    if nets is not None:
        if len(nets) != 1:
            raise ConfigError(
                f"the pipeline's MultiControlNet holds {len(nets)} ControlNets; the InstantID "
                "backend drives IdentityNet only. Build the pipeline with IdentityNet alone "
                "(extra pose/canny/depth ControlNets are not supported yet).")
        controlnet = nets[0]
    if controlnet is None or not hasattr(controlnet, "controlnet_cond_embedding"):
        return None
    return controlnet


@dataclass
class InstantIDParts:
    """What the backend uses from a recognised pipeline.

    form: ``"native"`` or ``"official"`` (module docstring). projection: the Resampler,
    (B, N, 512) -> (B, 16, D). controlnet: IdentityNet. ip_processors: the cross-attention
    processors whose ``scale`` switches the ID attention.
    """

    form: str
    projection: torch.nn.Module
    controlnet: torch.nn.Module
    ip_processors: list


def find_instantid_parts(pipe: Any) -> InstantIDParts | None:
    """The InstantID parts of ``pipe``, or None when it is not set up for InstantID."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return None
    controlnet = _controlnet_of(pipe)
    if controlnet is None:
        return None
    native = find_instantid_projection(unet)
    if native is not None:
        processors = _native_ip_processors(unet)
        return InstantIDParts("native", native, controlnet, processors) if processors else None
    official = _official_projection(pipe, unet.config.cross_attention_dim)
    if official is not None:
        processors = _official_ip_processors(unet)
        return InstantIDParts("official", official, controlnet, processors) if processors else None
    return None


# --------------------------------------------------------------------------- face model


def build_face_analyzer(options: dict[str, Any]):
    """The analyser for reference photos: ``face_analyzer`` if given, else antelopev2.

    Options: ``face_model`` (pack name or folder, default ``"antelopev2"``),
    ``face_model_root`` and ``face_providers`` (insightface root and onnxruntime providers).
    The detector runs at 640 x 640, the size every official script prepares.
    """
    if options.get("face_analyzer") is not None:
        return options["face_analyzer"]
    from bf_core.faces import FaceAnalyzer

    return FaceAnalyzer(options.get("face_model", DEFAULT_FACE_MODEL),
                        root=options.get("face_model_root"),
                        providers=options.get("face_providers"), det_size=(640, 640))


class FaceAnalyzerCache:
    """The antelopev2 analysers a backend built, one per (``face_model``,
    ``face_model_root``, ``face_providers``) of the options: loading a pack takes seconds,
    so each is built once per backend (InfiniteYou shares the same reference analysis)."""

    def __init__(self, build: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self._build = build or build_face_analyzer
        self._built: dict[tuple, Any] = {}

    def get(self, options: dict[str, Any]):
        key = (str(options.get("face_model", "antelopev2")), str(options.get("face_model_root")),
               tuple(options.get("face_providers") or ()))
        if key not in self._built:
            self._built[key] = self._build(options)
        return self._built[key]
