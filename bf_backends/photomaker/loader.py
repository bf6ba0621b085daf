"""Load a PhotoMaker V1/V2 checkpoint into a plain diffusers SDXL pipeline.

The official files (``photomaker-v1.bin``, ``photomaker-v2.bin``) hold two state dicts:
``id_encoder`` (loaded strictly into our own encoder) and ``lora_weights`` (rank-64 LoRA
on every UNet attention projection, in diffusers' old attention-processor key format).
A ``.safetensors`` file holds the same tensors in one namespace, keys prefixed
``id_encoder.`` and ``lora_weights.``.

``load_photomaker`` validates everything before it touches the pipeline: file format,
method, version, encoder keys and shapes, LoRA keys against the pipeline's UNet. The LoRA
is then loaded as the PEFT adapter ``"photomaker"`` and left unfused, so a caller can
switch it per UNet call (``set_adapters``) or fuse it itself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bf_backends.photomaker.modules import (
    ENCODER_CLASSES,
    PhotoMakerIDEncoderV1,
    PhotoMakerIDEncoderV2,
)
from bf_backends.photomaker.prompt import DEFAULT_TRIGGER_WORD, add_trigger_word
from bf_core.checkpoints import load_state_dict_file, load_strict
from bf_core.errors import CheckpointError, ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)

PARTS = ("id_encoder", "lora_weights")
ADAPTER_NAME = "photomaker"
#: An id_encoder key under this prefix exists only in V2 files.
V2_MARKER_PREFIX = "qformer_perceiver."

# unet.<attention module>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight
_OLD_LORA_KEY = re.compile(
    r"^unet\.(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
    r"(?P<side>down|up)\.weight$")
# unet.<attention module>.<to_q|to_k|to_v|to_out.0>.lora_<A|B>.weight
_PEFT_LORA_KEY = re.compile(r"^unet\.(?P<target>.+)\.lora_(?P<side>A|B)\.weight$")
_MAX_LISTED = 6


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


# --------------------------------------------------------------------------------------
# Reading and recognising the file
# --------------------------------------------------------------------------------------


def normalize_version(version: str | int | None) -> str | None:
    """'v1' / 'v2' from 'v1', 'V2', 1, 2 or '2'; None stays None (detect from the file)."""
    if version is None:
        return None
    text = str(version).strip().lower()
    text = text if text.startswith("v") else f"v{text}"
    if text not in ENCODER_CLASSES:
        raise ConfigError(f"version={version!r} is not a PhotoMaker version; use 'v1', 'v2' "
                          "or None to detect it from the checkpoint.")
    return text


def detect_version(id_encoder: Mapping[str, torch.Tensor]) -> str:
    """'v2' iff any id_encoder key starts with ``qformer_perceiver.``, else 'v1'."""
    return "v2" if any(key.startswith(V2_MARKER_PREFIX) for key in id_encoder) else "v1"


def describe_foreign_checkpoint(keys) -> str | None:
    """What a checkpoint that is not PhotoMaker looks like, from its (top-level) keys.

    Returns None when the keys look like PhotoMaker (an ``id_encoder`` or
    ``lora_weights`` part is present).
    """
    keys = [str(key) for key in keys]
    heads = {key.split(".", 1)[0] for key in keys}
    if heads & set(PARTS):
        return None  # PhotoMaker-shaped; a missing part is reported by the split
    if heads & {"image_proj", "ip_adapter"}:
        return ("an IP-Adapter style checkpoint (parts image_proj / ip_adapter: IP-Adapter, "
                "IP-Adapter FaceID or InstantID's ip-adapter.bin)")
    if heads & {"id_adapter", "id_adapter_attn_layers"}:
        return "a PuLID checkpoint (keys id_adapter.* / id_adapter_attn_layers.*)"
    if any("controlnet_cond_embedding" in key for key in keys):
        return "a ControlNet (e.g. InstantID's IdentityNet)"
    if any(re.search(r"lora[_.]?(a|b|up|down)\b|_lora\.", key, re.IGNORECASE) for key in keys):
        return "a plain LoRA without a PhotoMaker ID encoder"
    if heads & {"state_dict", "model", "module"}:
        return f"a training checkpoint wrapping its weights under {_listed(heads)}"
    if heads & {"conv_in", "down_blocks", "mid_block", "first_stage_model"}:
        return "a UNet / full diffusion model"
    return f"an unrecognised checkpoint (first keys: {_listed(keys)})"


def _split_flat(flat: Mapping[str, torch.Tensor], source: str) -> dict[str, dict]:
    """{part: state dict} from one namespace whose keys are prefixed ``<part>.``."""
    parts: dict[str, dict] = {part: {} for part in PARTS}
    others = []
    for key, tensor in flat.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = tensor
        else:
            others.append(key)
    if others:
        raise CheckpointError(
            f"{source}: {len(others)} key(s) outside the PhotoMaker parts id_encoder.* and "
            f"lora_weights.*: {_listed(others)}. Pass an official PhotoMaker file.")
    return parts


def split_photomaker_checkpoint(raw, source: str = "checkpoint") -> dict[str, dict]:
    """``{"id_encoder": {...}, "lora_weights": {...}}`` from a loaded file's contents.

    Accepts the ``.bin`` layout (a dict of the two state dicts, in any order) and the flat
    ``.safetensors`` layout (keys prefixed ``id_encoder.`` / ``lora_weights.``). Raises
    ``CheckpointError`` saying what the file looks like when it is not PhotoMaker.
    """
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source} holds a {type(raw).__name__}, not a state dict; pass "
                              "an official PhotoMaker .bin or .safetensors file.")
    foreign = describe_foreign_checkpoint(raw.keys())
    if foreign is not None:
        raise CheckpointError(f"{source} is not a PhotoMaker checkpoint: it looks like "
                              f"{foreign}. Pass photomaker-v1.bin or photomaker-v2.bin (or a "
                              "safetensors conversion of them).")
    if all(isinstance(value, torch.Tensor) for value in raw.values()):
        parts = _split_flat(raw, source)
    else:
        extra = [key for key in raw if key not in PARTS]
        if extra:
            logger.warning("%s: ignoring top-level entries %s besides id_encoder and "
                           "lora_weights", source, _listed(extra))
        parts = {part: raw.get(part) for part in PARTS}
    for part, state_dict in parts.items():
        if not state_dict:
            raise CheckpointError(f"{source} has no (or an empty) {part!r} part; a PhotoMaker "
                                  "checkpoint holds both id_encoder and lora_weights. The file "
                                  "may be incomplete: download it again.")
        if not isinstance(state_dict, Mapping) or not all(
                isinstance(value, torch.Tensor) for value in state_dict.values()):
            raise CheckpointError(f"{source}: the {part!r} part is not a flat state dict of "
                                  "tensors; pass an official PhotoMaker file.")
    return {part: dict(parts[part]) for part in PARTS}


@dataclass(frozen=True)
class PhotoMakerCheckpoint:
    """The two parts of a PhotoMaker file and its version."""

    version: str
    id_encoder: dict[str, torch.Tensor]
    lora_weights: dict[str, torch.Tensor]
    source: str


def read_photomaker_checkpoint(checkpoint: str | os.PathLike | Mapping,
                               version: str | int | None = None) -> PhotoMakerCheckpoint:
    """Read a PhotoMaker file (or an already loaded dict), split it and find its version.

    ``version`` ('v1' / 'v2') must agree with the file if given.
    """
    wanted = normalize_version(version)
    if isinstance(checkpoint, Mapping):
        raw, source = checkpoint, "the PhotoMaker state dict"
    else:
        raw, source = load_state_dict_file(checkpoint), os.fspath(checkpoint)
    parts = split_photomaker_checkpoint(raw, source)
    found = detect_version(parts["id_encoder"])
    if wanted is not None and wanted != found:
        evidence = ("has qformer_perceiver.* keys" if found == "v2"
                    else "has no qformer_perceiver.* keys")
        raise CheckpointError(
            f"version={wanted!r} was asked for but {source} is PhotoMaker {found} (its "
            f"id_encoder {evidence}). Pass version={found!r}, version=None, or the "
            f"photomaker-{wanted}.bin file.")
    return PhotoMakerCheckpoint(found, parts["id_encoder"], parts["lora_weights"], source)


# --------------------------------------------------------------------------------------
# The ID encoder
# --------------------------------------------------------------------------------------


def _materialize_meta_buffers(module: torch.nn.Module) -> None:
    """Give real values to buffers a meta-built module left on the meta device.

    Only CLIP's non-persistent ``position_ids`` (0..num_positions-1) are expected: they
    are not stored in checkpoints, so a strict load on the meta device leaves them empty.
    """
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise CheckpointError(f"buffer {name} is not in the checkpoint and has no known "
                                  "default; pass a ready-built encoder instead.")
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        positions = torch.arange(buffer.shape[-1]).expand(buffer.shape)
        owner.register_buffer(attribute, positions, persistent=False)


def load_id_encoder(checkpoint: PhotoMakerCheckpoint,
                    encoder: PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2 | None = None,
                    ) -> PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2:
    """Load ``checkpoint.id_encoder`` strictly into ``encoder`` (built at real size if None).

    A real-size encoder is built on the meta device and takes the checkpoint's tensors
    (no second copy, no random initialisation). Missing, unexpected or mis-shaped keys
    raise ``CheckpointError`` naming them.
    """
    what = f"PhotoMaker {checkpoint.version} id_encoder ({checkpoint.source})"
    if encoder is None:
        with torch.device("meta"):
            encoder = ENCODER_CLASSES[checkpoint.version]()
    elif encoder.version != checkpoint.version:
        raise CheckpointError(
            f"{checkpoint.source} is PhotoMaker {checkpoint.version} but the encoder given is "
            f"{type(encoder).__name__} ({encoder.version}); pass a {checkpoint.version} encoder "
            "or let load_photomaker build one.")
    load_strict(encoder, checkpoint.id_encoder, what)
    _materialize_meta_buffers(encoder)
    return encoder.eval()


# --------------------------------------------------------------------------------------
# The LoRA
# --------------------------------------------------------------------------------------


def lora_key_to_peft(key: str) -> str:
    """Map one old-format PhotoMaker LoRA key to diffusers' PEFT key.

    ``unet.<m>.processor.to_k_lora.down.weight`` -> ``unet.<m>.to_k.lora_A.weight``;
    ``up`` -> ``lora_B``; ``to_out`` -> ``to_out.0`` (the Linear inside to_out).
    """
    match = _OLD_LORA_KEY.match(key)
    if match is None:
        raise CheckpointError(
            f"lora_weights key {key!r} is not of the form unet.<attention module>.processor."
            "<to_q|to_k|to_v|to_out>_lora.<down|up>.weight; the file is not an official "
            "PhotoMaker checkpoint.")
    target = "to_out.0" if match["proj"] == "to_out" else match["proj"]
    side = "A" if match["side"] == "down" else "B"
    return f"unet.{match['module']}.{target}.lora_{side}.weight"


def convert_lora_to_peft(lora_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lora_weights`` part keyed for ``pipe.load_lora_weights`` (PEFT format).

    Every down (A, (rank, in)) must come with its up (B, (out, rank)) of the same rank.
    No alpha is stored, so the LoRA scale is 1.
    """
    converted = {lora_key_to_peft(key): tensor for key, tensor in lora_weights.items()}
    targets = {_PEFT_LORA_KEY.match(key)["target"] for key in converted}
    for target in sorted(targets):
        down = converted.get(f"unet.{target}.lora_A.weight")
        up = converted.get(f"unet.{target}.lora_B.weight")
        if down is None or up is None:
            half = "down (lora_A)" if down is None else "up (lora_B)"
            raise CheckpointError(f"lora_weights for unet.{target} lack the {half} matrix; "
                                  "the file is incomplete: download it again.")
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise CheckpointError(
                f"lora_weights for unet.{target}: down {tuple(down.shape)} and up "
                f"{tuple(up.shape)} are not a (rank, in) / (out, rank) pair of one rank.")
    return converted


def lora_target_shapes(peft_lora: Mapping[str, torch.Tensor]
                       ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{UNet Linear path: (A shape, B shape)}`` of a PEFT-format UNet LoRA."""
    shapes: dict[str, list] = {}
    for key, tensor in peft_lora.items():
        match = _PEFT_LORA_KEY.match(key)
        slot = 0 if match["side"] == "A" else 1
        shapes.setdefault(match["target"], [None, None])[slot] = tuple(tensor.shape)
    return {target: (pair[0], pair[1]) for target, pair in shapes.items()}


def _base_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The plain Linear under a PEFT LoRA wrapper (the module itself if unwrapped)."""
    return getattr(module, "base_layer", module)


def check_lora_against_unet(peft_lora: Mapping[str, torch.Tensor], unet: torch.nn.Module
                            ) -> None:
    """Raise ``CheckpointError`` unless every LoRA pair targets a Linear of ``unet`` with
    matching shapes: A (rank, in_features), B (out_features, rank)."""
    problems = []
    for target, (down_shape, up_shape) in sorted(lora_target_shapes(peft_lora).items()):
        try:
            linear = _base_linear(unet.get_submodule(target))
        except AttributeError:
            problems.append(f"{target} does not exist in the UNet")
            continue
        if not isinstance(linear, torch.nn.Linear):
            problems.append(f"{target} is a {type(linear).__name__}, not a Linear")
            continue
        rank = down_shape[0]
        if down_shape != (rank, linear.in_features) or up_shape != (linear.out_features, rank):
            problems.append(f"{target}: LoRA {down_shape} / {up_shape} does not fit Linear "
                            f"{linear.in_features} -> {linear.out_features}")
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = f" (+{len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(
            f"the PhotoMaker LoRA does not fit this pipeline's UNet: {shown}{more}. "
            "PhotoMaker needs an SDXL UNet (cross-attention width 2048).")


# --------------------------------------------------------------------------------------
# Into a pipeline
# --------------------------------------------------------------------------------------


@dataclass
class PhotoMakerState:
    """What ``load_photomaker`` added to a pipeline.

    The encoder is not a registered pipeline component (diffusers would try to save and
    offload it as one); move it with ``state.to(...)`` when the UNet moves.
    """

    encoder: PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2
    version: str
    trigger_word: str = DEFAULT_TRIGGER_WORD
    adapter_name: str = ADAPTER_NAME
    #: a ``bf_core.faces.FaceAnalyzer`` for V2's face embeddings; None: the backend builds
    #: one for insightface's ``buffalo_l`` pack when first needed
    face_analyzer: Any = None

    @property
    def tokens_per_image(self) -> int:
        """ID tokens per reference image: 1 for V1, 2 for V2."""
        return self.encoder.tokens_per_image

    def to(self, *args, **kwargs) -> PhotoMakerState:
        """Move / cast the encoder like ``nn.Module.to``; returns self."""
        self.encoder.to(*args, **kwargs)
        return self


def _require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise MissingDependencyError("loading the PhotoMaker LoRA needs the peft package "
                                     "(diffusers' LoRA backend): pip install peft")


def _loaded_adapters(pipe) -> set[str]:
    listed = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
    return {name for names in listed.values() for name in names}


def load_photomaker(pipe, checkpoint: str | os.PathLike | Mapping,
                    version: str | int | None = None, *,
                    encoder: PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2 | None = None,
                    trigger_word: str = DEFAULT_TRIGGER_WORD,
                    adapter_name: str = ADAPTER_NAME) -> PhotoMakerState:
    """Load a PhotoMaker checkpoint into a plain diffusers SDXL pipeline.

    - ``checkpoint``: path to ``.bin`` / ``.safetensors``, or the loaded dict.
    - ``version``: 'v1' / 'v2' to insist on one; None detects it from the keys.
    - ``encoder``: an encoder to load into (e.g. a tiny one in tests); by default one of
      the real size is built.

    Checks everything first, then: the encoder, loaded strictly, moves to the UNet's
    device and dtype; the trigger word is added to both tokenizers; the LoRA becomes the
    unfused PEFT adapter ``adapter_name`` of the UNet. The returned state is also stored
    as ``pipe.photomaker``, which is how the PhotoMaker backend recognises the pipeline.
    """
    _require_peft()
    if adapter_name in _loaded_adapters(pipe):
        raise ConfigError(f"the pipeline already has a LoRA adapter named {adapter_name!r}; "
                          f"remove it with pipe.delete_adapters({adapter_name!r}) or pass "
                          "another adapter_name.")
    loaded = read_photomaker_checkpoint(checkpoint, version)
    peft_lora = convert_lora_to_peft(loaded.lora_weights)
    check_lora_against_unet(peft_lora, pipe.unet)
    id_encoder = load_id_encoder(loaded, encoder)
    id_encoder.to(device=pipe.unet.device, dtype=pipe.unet.dtype)

    add_trigger_word([pipe.tokenizer, pipe.tokenizer_2], trigger_word)
    pipe.load_lora_weights(peft_lora, adapter_name=adapter_name)
    state = PhotoMakerState(id_encoder, loaded.version, trigger_word, adapter_name)
    pipe.photomaker = state
    return state


# --------------------------------------------------------------------------------------
# One call from a base model and a checkpoint
# --------------------------------------------------------------------------------------

#: The official checkpoints on the Hugging Face hub: repository -> file.
HUB_CHECKPOINTS = {
    "TencentARC/PhotoMaker": "photomaker-v1.bin",
    "TencentARC/PhotoMaker-V2": "photomaker-v2.bin",
}


def resolve_checkpoint(checkpoint: str | os.PathLike, local_files_only: bool = False) -> str:
    """A local file path for ``checkpoint``: an existing file, or an official hub id.

    Hub ids (``TencentARC/PhotoMaker``, ``TencentARC/PhotoMaker-V2``) are fetched with
    ``huggingface_hub`` (cached); offline, the error names the file and where to put it.
    """
    path = os.fspath(checkpoint)
    if os.path.isfile(path):
        return path
    filename = HUB_CHECKPOINTS.get(path)
    if filename is None:
        known = ", ".join(f"{repo} ({name})" for repo, name in HUB_CHECKPOINTS.items())
        raise CheckpointError(f"PhotoMaker checkpoint {path!r} is neither a file nor an official "
                              f"hub id. Pass the path of photomaker-v1.bin / photomaker-v2.bin "
                              f"or one of: {known}.")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, filename, local_files_only=local_files_only)
    except Exception as exc:  # offline, no such revision, interrupted download
        raise CheckpointError(
            f"could not get {filename} from the hub repository {path} ({exc}). Without network, "
            f"download {filename} from https://huggingface.co/{path} elsewhere, copy it to this "
            "machine and pass its path as the checkpoint.") from exc


def load_photomaker_pipeline(base_model: str, checkpoint: str | os.PathLike,
                             version: str | int | None = None, *, torch_dtype=None,
                             device: str | None = None, local_files_only: bool = False,
                             trigger_word: str = DEFAULT_TRIGGER_WORD):
    """A diffusers SDXL pipeline from ``base_model`` with PhotoMaker loaded into it.

    base_model: a local diffusers SDXL folder or a hub id (e.g.
    ``SG161222/RealVisXL_V4.0``, the official demos' base). checkpoint: a ``.bin`` /
    ``.safetensors`` path or ``TencentARC/PhotoMaker`` / ``TencentARC/PhotoMaker-V2``.
    """
    from bf_core.hosts.sdxl import load_sdxl_pipeline

    path = resolve_checkpoint(checkpoint, local_files_only)
    pipe = load_sdxl_pipeline(base_model, torch_dtype=torch_dtype, device=device,
                              local_files_only=local_files_only)
    load_photomaker(pipe, path, version, trigger_word=trigger_word)
    return pipe


def load_pipeline_setup(base_model: str, checkpoint: str | None, *, torch_dtype=None,
                        device: str | None = None):
    """``BackendExtras.load_pipeline``: a base SDXL model with a PhotoMaker checkpoint."""
    from bf_core.extras import PipelineSetup

    if not checkpoint:
        raise ConfigError("PhotoMaker needs its checkpoint: pass the path of "
                          "photomaker-v2.bin (or photomaker-v1.bin) or "
                          "'TencentARC/PhotoMaker-V2'")
    return PipelineSetup(load_photomaker_pipeline(base_model, checkpoint,
                                                  torch_dtype=torch_dtype, device=device))
