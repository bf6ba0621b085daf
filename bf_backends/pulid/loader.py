"""Load the official PuLID SDXL checkpoints (``pulid_v1.bin``, ``pulid_v1.1.safetensors``).

An official file is one flat state dict whose keys start with ``id_adapter.`` (the ID
encoder: v1 ``IDEncoder`` or v1.1 ``IDFormer``) or ``id_adapter_attn_layers.`` (the ID
projections of the attention processors, numbered by position in
``unet.attn_processors``). Like the official loader, keys are split at the first dot and
each group is loaded strictly; unlike it, every problem is a ``CheckpointError`` that
names the keys, the version or what kind of file it really is.

Attaching: :func:`attach_pulid` loads an official file into our ID encoder and ID attention
processors and leaves a :class:`PuLIDAdapter` at ``pipe.pulid``; that attribute is how the
backend recognises a pipeline. :func:`load_pulid_pipeline` builds the official v1 set-up
from local files, and :func:`load_pipeline_setup` is what the CLI and the benchmark call
with one checkpoint path (the face models lie beside it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bf_backends.pulid.attention import (
    PuLIDAttentionConfig,
    PuLIDAttentionInstallation,
    PuLIDAttentionState,
    install_pulid_attention,
    pulid_attention_shapes,
)
from bf_backends.pulid.features import FaceFeatures
from bf_backends.pulid.modules import EncoderConfig, IDEncoder, IDFormer, build_encoder
from bf_core.checkpoints import (
    check_state_dict,
    expected_shapes,
    load_state_dict_file,
    load_strict,
)
from bf_core.errors import CheckpointError, ConfigError
from bf_core.hosts.sdxl import is_sdxl_pipeline

ENCODER_PREFIX = "id_adapter"
ATTENTION_PREFIX = "id_adapter_attn_layers"
VERSIONS = ("v1", "v1.1")
# Keys that only one version's encoder has.
_V1_MARKER = "body.0.weight"
_V11_MARKER = "latents"


@dataclass
class PuLIDWeights:
    """The two groups of an official PuLID file, prefixes removed."""

    version: str
    """"v1" or "v1.1", detected from the encoder keys."""
    encoder: dict[str, torch.Tensor]
    """``id_adapter.`` keys without the prefix."""
    attention: dict[str, torch.Tensor]
    """``id_adapter_attn_layers.`` keys without the prefix, e.g. ``"1.id_to_k.weight"``."""


@dataclass
class LoadedPuLID:
    """What :func:`load_pulid` built: the encoder and the installed ID processors."""

    version: str
    encoder: IDEncoder | IDFormer
    attention: PuLIDAttentionInstallation


def _top_level_prefixes(keys) -> list[str]:
    return sorted({str(key).split(".", 1)[0] for key in keys})


def describe_foreign_checkpoint(state_dict: Mapping) -> str:
    """A sentence saying what a non-PuLID checkpoint looks like, from its keys alone."""
    keys = [str(key) for key in state_dict]
    top = set(keys)
    prefixes = set(_top_level_prefixes(keys))
    if {"image_proj", "ip_adapter"} <= top:
        return ("it looks like an IP-Adapter or InstantID adapter (a .bin with 'image_proj' "
                "and 'ip_adapter' sub-dicts); load it with the IP-Adapter or InstantID backend")
    if "id_encoder" in top:
        return ("it looks like a PhotoMaker checkpoint ('id_encoder' / 'lora_weights'); load it "
                "with the PhotoMaker backend")
    if {"image_proj", "ip_adapter"} <= prefixes:
        if any(".to_k_ip." in key for key in keys) and any(
                key.startswith(("image_proj.body.", "image_proj.latents")) for key in keys):
            return ("it looks like the community re-keyed PuLID format "
                    "('ip-adapter_pulid_sdxl', used by ComfyUI / A1111), which this loader "
                    "does not read; use the official pulid_v1.bin or pulid_v1.1.safetensors")
        return ("it looks like a flat IP-Adapter file ('image_proj.' / 'ip_adapter.' keys); "
                "load it with the IP-Adapter backend")
    if "visual" in prefixes or any(".attn.q_proj." in key for key in keys):
        return ("it looks like EVA-CLIP vision weights, the image encoder PuLID uses, not the "
                "PuLID adapter itself")
    if any("controlnet_cond_embedding" in key for key in keys):
        return "it looks like a ControlNet (e.g. InstantID's IdentityNet)"
    if prefixes & {"down_blocks", "up_blocks", "mid_block", "model", "conv_in"}:
        return "it looks like UNet or whole-model weights, not a PuLID adapter"
    shown = ", ".join(sorted(prefixes)[:8]) or "none"
    return f"its top-level key prefixes are: {shown}"


def _flat_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        state_dict, where = dict(source), "the given state dict"
    else:
        state_dict, where = load_state_dict_file(source), str(source)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{where} holds a {type(state_dict).__name__}, not a state dict; "
                              "expected the official PuLID file (pulid_v1.bin or "
                              "pulid_v1.1.safetensors).")
    nested = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if nested:
        raise CheckpointError(f"{where} is not a PuLID checkpoint: "
                              f"{describe_foreign_checkpoint(state_dict)}.")
    return dict(state_dict), where


def two_groups(state_dict: Mapping[str, torch.Tensor], where: str, prefixes: tuple[str, str],
               method: str, official: str, second: str, describe) -> dict[str, dict]:
    """The state dict split at the first dot into exactly the two groups ``prefixes`` (the
    ID encoder's and ``second``'s), else a ``CheckpointError`` naming the file and what it
    looks like (``describe(state_dict)``), the keys outside them, or the group missing."""
    groups = split_at_first_dot(state_dict)
    first, other = prefixes
    if first not in groups and other not in groups:
        raise CheckpointError(f"{where} is not a {method} checkpoint (no '{first}.' or "
                              f"'{other}.' keys): {describe(state_dict)}.")
    unknown = sorted(set(groups) - set(prefixes))
    if unknown:
        raise CheckpointError(f"{where} has keys outside '{first}.' and '{other}.' (prefixes "
                              f"{unknown}); {official} has only those two groups. Remove the "
                              "extra keys.")
    for prefix in prefixes:
        if prefix not in groups:
            raise CheckpointError(f"{where} has no '{prefix}.' keys; {official} holds both the "
                                  f"ID encoder and {second}. The file may be incomplete: "
                                  "download it again.")
    return groups


def split_at_first_dot(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """``{"a.b.c": t}`` -> ``{"a": {"b.c": t}}`` (the official loader's grouping)."""
    groups: dict[str, dict] = {}
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        groups.setdefault(prefix, {})[rest] = value
    return groups


def detect_pulid_version(encoder_state: Mapping[str, torch.Tensor]) -> str | None:
    """"v1" (has ``body.0.weight``), "v1.1" (has ``latents``) or None if neither/both."""
    is_v1, is_v11 = _V1_MARKER in encoder_state, _V11_MARKER in encoder_state
    if is_v1 == is_v11:
        return None
    return "v1" if is_v1 else "v1.1"


def read_pulid_weights(source: str | os.PathLike | Mapping[str, torch.Tensor],
                       version: str | None = None) -> PuLIDWeights:
    """Read a PuLID file (or a flat state dict), split it, and detect its version.

    ``version`` ("v1" / "v1.1"), when given, must match the file. ``.bin`` files are read
    with ``torch.load(weights_only=True)``. Raises ``CheckpointError`` naming the problem.
    """
    if version is not None and version not in VERSIONS:
        raise CheckpointError(f"PuLID version must be one of {VERSIONS} or None (detect), got "
                              f"{version!r}.")
    state_dict, where = _flat_state_dict(source)
    groups = two_groups(state_dict, where, (ENCODER_PREFIX, ATTENTION_PREFIX), "PuLID",
                        "an official PuLID file", "the attention layers",
                        describe_foreign_checkpoint)
    detected = detect_pulid_version(groups[ENCODER_PREFIX])
    if detected is None:
        raise CheckpointError(f"{where}: cannot tell the PuLID version; the 'id_adapter.' keys "
                              f"must contain exactly one of '{_V1_MARKER}' (v1 IDEncoder) and "
                              f"'{_V11_MARKER}' (v1.1 IDFormer).")
    if version is not None and version != detected:
        raise CheckpointError(f"{where} is a PuLID {detected} checkpoint but version "
                              f"{version!r} was requested; pass version={detected!r} or None, or "
                              f"use the {version} file.")
    return PuLIDWeights(detected, groups[ENCODER_PREFIX], groups[ATTENTION_PREFIX])


def _unet_device(unet: nn.Module) -> torch.device:
    return next(unet.parameters()).device


def check_unet_fits(weights: PuLIDWeights, unet: nn.Module) -> None:
    """Raise ``CheckpointError`` unless the ID layers of ``weights`` fit ``unet``'s layers."""
    expected = pulid_attention_shapes(unet)
    context = {shape[1] for shape in expected.values()}
    try:
        check_state_dict(weights.attention, expected,
                         f"PuLID {weights.version} id_adapter_attn_layers")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} This UNet has {len(expected) // 2} cross-attention layers "
                              f"with context width {sorted(context)}; the official PuLID files "
                              "need an SDXL UNet (70 layers, width 2048).") from exc


def load_pulid(source: str | os.PathLike | Mapping[str, torch.Tensor], unet: nn.Module, *,
               version: str | None = None, encoder_config: EncoderConfig | None = None,
               state: PuLIDAttentionState | None = None) -> LoadedPuLID:
    """Build the encoder, install ID processors in ``unet`` and load both strictly.

    ``encoder_config`` defaults to the official sizes of the detected version; tests pass a
    tiny one. The encoder and the ID projections are float32 on the UNet's device (on the
    meta device for a meta UNet). On any error the UNet's processors are left untouched.
    """
    weights = read_pulid_weights(source, version)
    check_unet_fits(weights, unet)
    what = f"PuLID {weights.version} ID encoder (id_adapter.)"
    # Check the layout on the meta device first: a mismatch costs no real allocation.
    with torch.device("meta"):
        check_state_dict(weights.encoder, expected_shapes(build_encoder(weights.version,
                                                                        encoder_config)), what)
    with torch.device(_unet_device(unet)):
        encoder = build_encoder(weights.version, encoder_config)
    load_strict(encoder, weights.encoder, what)
    installation = install_pulid_attention(unet, state)
    try:
        load_strict(installation.numbered_layers(), weights.attention,
                    f"PuLID {weights.version} id_adapter_attn_layers")
    except BaseException:
        installation.uninstall()
        raise
    return LoadedPuLID(weights.version, encoder.eval(), installation)


# ---------------------------------------------------------------- attaching to a pipeline

#: The pipeline attribute that holds the attached :class:`PuLIDAdapter`.
PULID_ATTRIBUTE = "pulid"
#: Reference image and its index -> its face features.
FeatureExtractor = Callable[[Any, int], FaceFeatures]
#: The face models that lie beside the PuLID file for ``load_pipeline_setup``.
FACE_PACK, PARSER_FILE, EVA_FILE = ("antelopev2", "parsing_bisenet.pth",
                                    "EVA02_CLIP_L_336_psz14_s6B.pt")
LIGHTNING_UNET_FILE = "sdxl_lightning_4step_unet.safetensors"


@dataclass
class PuLIDAdapter:
    """Everything PuLID adds to a pipeline.

    version: "v1" or "v1.1". encoder: the ID encoder (float32). attention: the installed
    ID processors, whose ``state`` the backend sets per line. features: reference image
    (and its index) -> :class:`FaceFeatures` (see ``PuLIDFaceFeatures``).
    """

    version: str
    encoder: IDEncoder | IDFormer
    attention: PuLIDAttentionInstallation
    features: FeatureExtractor

    @property
    def state(self) -> PuLIDAttentionState:
        return self.attention.state


def attach_pulid(pipe: Any, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
                 features: FeatureExtractor, *, version: str | None = None,
                 encoder_config: EncoderConfig | None = None, mode: str = "fidelity",
                 id_scale: float = 0.8) -> PuLIDAdapter:
    """Load ``checkpoint`` into ``pipe.unet`` and attach PuLID to ``pipe`` (``pipe.pulid``).

    checkpoint: ``pulid_v1.bin`` / ``pulid_v1.1.safetensors`` or their flat state dict.
    mode, id_scale: the default ID attention settings ("fidelity" = the paper's baseline).
    With no ID tokens set, the processors hand every call to the processors they replaced,
    so ``pipe(...)`` still draws plain SDXL, and ``pipe(..., cross_attention_kwargs=
    {"id_embedding": [E_neg ; E], "id_scale": s})`` is the official PuLID v1 call.
    Undo with :func:`detach_pulid`.
    """
    if not is_sdxl_pipeline(pipe):
        raise ConfigError(f"PuLID attaches to a diffusers StableDiffusionXLPipeline; got a "
                          f"{type(pipe).__name__}.")
    if getattr(pipe, PULID_ATTRIBUTE, None) is not None:
        raise ConfigError("PuLID is already attached to this pipeline; call detach_pulid(pipe) "
                          "first to load another checkpoint.")
    state = PuLIDAttentionState(PuLIDAttentionConfig.from_mode(mode, id_scale))
    loaded = load_pulid(checkpoint, pipe.unet, version=version, encoder_config=encoder_config,
                        state=state)
    adapter = PuLIDAdapter(loaded.version, loaded.encoder, loaded.attention, features)
    setattr(pipe, PULID_ATTRIBUTE, adapter)
    return adapter


def detach_pulid(pipe: Any) -> None:
    """Put back the UNet's original processors and remove ``pipe.pulid``."""
    adapter = getattr(pipe, PULID_ATTRIBUTE, None)
    if adapter is not None:
        adapter.attention.uninstall()
        setattr(pipe, PULID_ATTRIBUTE, None)


def lightning_scheduler(base_scheduler_config: Mapping[str, Any]):
    """PuLID v1's sampler: DPM-Solver++ from SDXL's scheduler config, trailing spacing.

    ``final_sigmas_type="sigma_min"`` reproduces diffusers 0.25 (the official pin), whose
    last update did not go to sigma 0; newer defaults change the final latent.
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        dict(base_scheduler_config), timestep_spacing="trailing", final_sigmas_type="sigma_min")


def load_pulid_pipeline(base_model: str, checkpoint: str | os.PathLike, features: FeatureExtractor,
                        *, unet_weights: str | os.PathLike | None = None, torch_dtype=None,
                        device: str | None = None, mode: str = "fidelity",
                        id_scale: float = 0.8, local_files_only: bool = True):
    """The official v1 set-up from local files: SDXL base, optional full UNet weights
    (``sdxl_lightning_4step_unet.safetensors``), DPM-Solver trailing, PuLID attached.

    The ID encoder and ID projections stay float32 whatever ``torch_dtype`` is, as in the
    official code.
    """
    from bf_core.hosts.sdxl import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(base_model, torch_dtype=torch_dtype,
                              local_files_only=local_files_only)
    if unet_weights is not None:
        state_dict = load_state_dict_file(unet_weights)
        load_strict(pipe.unet, {k: v.to(pipe.unet.dtype) for k, v in state_dict.items()},
                    f"SDXL UNet ({unet_weights})")
    pipe.scheduler = lightning_scheduler(pipe.scheduler.config)
    pipe.watermark = None
    if device:
        pipe.to(device)
    attach_pulid(pipe, checkpoint, features, mode=mode, id_scale=id_scale)
    return pipe


def load_pipeline_setup(base_model: str, checkpoint: str | None, *, torch_dtype: Any = None,
                        device: str | None = None):
    """``BackendExtras.load_pipeline``: ``checkpoint`` is the PuLID file (``pulid_v1.bin``
    or ``pulid_v1.1.safetensors``); the face models lie beside it: ``antelopev2/`` (the
    insightface pack), ``parsing_bisenet.pth`` and ``EVA02_CLIP_L_336_psz14_s6B.pt``; and,
    when present, ``sdxl_lightning_4step_unet.safetensors`` replaces the base UNet (the v1
    set-up)."""
    from pathlib import Path

    from bf_core.extras import PipelineSetup

    path = Path(checkpoint) if checkpoint else None
    if path is None or not path.is_file():
        raise ConfigError(f"PuLID's benchmark checkpoint must be the PuLID file, got "
                          f"{checkpoint!r}; pass --checkpoint pulid=<folder>/pulid_v1.bin")
    folder = path.parent
    features = face_features_beside(path, "PuLID", "docs/backends/pulid.md", device)
    lightning = folder / LIGHTNING_UNET_FILE
    return PipelineSetup(load_pulid_pipeline(
        base_model, path, features, torch_dtype=torch_dtype, device=device,
        unet_weights=lightning if lightning.is_file() else None))


def face_features_beside(path: os.PathLike, method: str, page: str, device: str | None = None):
    """PuLID's face pipeline from the files beside the checkpoint ``path``: the antelopev2
    pack, the BiSeNet parser and EVA02-CLIP-L (the benchmark's layout); a ``ConfigError``
    naming the missing ones."""
    from pathlib import Path

    from bf_backends.pulid.eva import load_eva_features
    from bf_backends.pulid.features import PuLIDFaceFeatures, load_bisenet_parser
    from bf_core.faces import FaceAnalyzer

    path = Path(path)
    folder = path.parent
    needed = [folder / FACE_PACK, folder / PARSER_FILE, folder / EVA_FILE]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        raise ConfigError(f"{method}'s face models {missing} are not beside {path.name} in "
                          f"{folder}; put the antelopev2/ pack, parsing_bisenet.pth and "
                          f"EVA02_CLIP_L_336_psz14_s6B.pt there ({page})")
    return PuLIDFaceFeatures(FaceAnalyzer(str(needed[0])),
                             load_bisenet_parser(needed[1], device=device),
                             load_eva_features(str(needed[2]), device=device))
