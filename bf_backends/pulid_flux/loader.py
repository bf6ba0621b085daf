"""Load the official PuLID-FLUX checkpoint (``pulid_flux_v0.9.1.safetensors``).

The file is one flat state dict: ``pulid_encoder.*`` (the IDFormer) and
``pulid_ca.{0..19}.*`` (the cross-attention modules, double blocks first). Like the official
loader, keys are split at the first dot and each group is loaded strictly; unlike it, the
whole file is first checked against the layout our modules expect for this transformer (at
FLUX.1 size, the manifest ``tests/fixtures/manifests/pulid_flux_v0.9.1.json``), and every
problem is a ``CheckpointError`` that names the file and the keys, or what kind of file it
really is.

Attaching: :func:`attach_pulid_flux` loads a file into our modules and leaves a
:class:`PuLIDFluxAdapter` at ``pipe.pulid_flux``; that attribute is how the backend (and the
FLUX host, which then stops offering the DreamBooth backend) recognises the pipeline. The
transformer itself is not changed: the ID cross-attention is hooked onto its blocks only
while a wrapped call runs. :func:`load_pipeline_setup` is what the CLI and the benchmark
call with one checkpoint path (the face models lie beside it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bf_backends.pulid.loader import (
    FeatureExtractor,
    describe_foreign_checkpoint,
    face_features_beside,
    split_at_first_dot,
    two_groups,
)
from bf_backends.pulid.modules import IDFormer
from bf_backends.pulid_flux.hooks import PuLIDFluxSettings
from bf_backends.pulid_flux.modules import (
    BlockPosition,
    PuLIDFluxConfig,
    build_cross_attention,
    build_encoder,
    positions_for,
    transformer_inner_dim,
)
from bf_core.checkpoints import check_state_dict, expected_shapes, load_state_dict_file, load_strict
from bf_core.errors import CheckpointError, ConfigError
from bf_core.hosts.flux import is_flux_pipeline

ENCODER_PREFIX, CA_PREFIX = "pulid_encoder", "pulid_ca"
CHECKPOINT_FILE = "pulid_flux_v0.9.1.safetensors"
#: The pipeline attribute that holds the attached :class:`PuLIDFluxAdapter`.
PULID_FLUX_ATTRIBUTE = "pulid_flux"
_SDXL_PULID_PREFIXES = {"id_adapter", "id_adapter_attn_layers"}
_FLUX_MODEL_PREFIXES = {"double_blocks", "single_blocks", "transformer_blocks",
                        "single_transformer_blocks", "x_embedder", "img_in", "context_embedder"}


def describe_foreign_flux_checkpoint(state_dict: Mapping) -> str:
    """A sentence saying what a checkpoint that is not PuLID-FLUX looks like, from its keys."""
    keys = [str(key) for key in state_dict]
    prefixes = {key.split(".", 1)[0] for key in keys}
    if prefixes & _SDXL_PULID_PREFIXES:
        return ("it looks like an SDXL PuLID checkpoint (pulid_v1 / pulid_v1.1: "
                "'id_adapter.' / 'id_adapter_attn_layers.' keys); attach it to an SDXL "
                "pipeline with bf_backends.pulid.backend.attach_pulid")
    if any(key.startswith("ip_adapter_proj_model.") or ".ip_adapter_double_stream_" in key
           for key in keys):
        return ("it looks like the XLabs FLUX IP-Adapter (ip_adapter.safetensors: "
                "'ip_adapter_proj_model.' / 'double_blocks.*.processor."
                "ip_adapter_double_stream_*' keys); load it with diffusers' "
                "pipe.load_ip_adapter(...)")
    nested = state_dict.get("image_proj") if "image_proj" in prefixes else None
    if (isinstance(nested, Mapping) and "proj_in.weight" in nested) or any(
            key.startswith("image_proj.proj_in.") for key in keys):
        return "it looks like InfiniteYou's image_proj_model.bin (an 'image_proj' resampler)"
    if prefixes & _FLUX_MODEL_PREFIXES:
        return "it looks like FLUX transformer weights, not the PuLID-FLUX adapter"
    return describe_foreign_checkpoint(state_dict)


def read_pulid_flux_weights(source: str | os.PathLike | Mapping[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], str]:
    """The flat state dict of a PuLID-FLUX file (or of a given dict) and a name for it.

    Raises ``CheckpointError`` for another method's checkpoint (saying what it looks like),
    for keys outside ``pulid_encoder.`` / ``pulid_ca.`` and for a file missing either group.
    """
    if isinstance(source, Mapping):
        state_dict, where = dict(source), "the given state dict"
    else:
        state_dict, where = load_state_dict_file(source), str(source)
    if not isinstance(state_dict, Mapping) or any(
            not isinstance(value, torch.Tensor) for value in state_dict.values()):
        shown = state_dict if isinstance(state_dict, Mapping) else {}
        raise CheckpointError(f"{where} is not a PuLID-FLUX checkpoint: "
                              f"{describe_foreign_flux_checkpoint(shown)}.")
    two_groups(state_dict, where, (ENCODER_PREFIX, CA_PREFIX), "PuLID-FLUX", CHECKPOINT_FILE,
               "the cross-attention modules", describe_foreign_flux_checkpoint)
    return dict(state_dict), where


def expected_pulid_flux_shapes(transformer_config: Any, config: PuLIDFluxConfig
                               ) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the whole file our modules read for this transformer (built on
    the meta device: no memory, no random numbers)."""
    with torch.device("meta"):
        encoder = expected_shapes(build_encoder(config))
        cross_attention = expected_shapes(build_cross_attention(transformer_config, config))
    return ({f"{ENCODER_PREFIX}.{key}": shape for key, shape in encoder.items()}
            | {f"{CA_PREFIX}.{key}": shape for key, shape in cross_attention.items()})


def check_pulid_flux_layout(state_dict: Mapping[str, torch.Tensor], where: str,
                            transformer_config: Any, config: PuLIDFluxConfig) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly the keys and shapes of
    PuLID-FLUX for this transformer; the message names the file, the keys and the sizes."""
    try:
        check_state_dict(state_dict, expected_pulid_flux_shapes(transformer_config, config),
                         f"PuLID-FLUX checkpoint ({where})")
    except CheckpointError as exc:
        count = len(positions_for(transformer_config, config))
        raise CheckpointError(
            f"{exc} This transformer has {transformer_config.num_layers} double and "
            f"{transformer_config.num_single_layers} single blocks of width "
            f"{transformer_inner_dim(transformer_config)}, so {count} cross-attention modules; "
            f"{CHECKPOINT_FILE} needs FLUX.1 (19 + 38 blocks of width 3072, 20 modules).") from exc


@dataclass
class LoadedPuLIDFlux:
    """What :func:`load_pulid_flux` built: the encoder and the cross-attention modules with
    the blocks they follow."""

    config: PuLIDFluxConfig
    encoder: IDFormer
    cross_attention: nn.ModuleList
    positions: tuple[BlockPosition, ...]


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A meta-built module on ``device`` in ``dtype``, its values left for a strict load."""
    return module if device.type == "meta" else module.to_empty(device=device).to(dtype)


def load_pulid_flux(source: str | os.PathLike | Mapping[str, torch.Tensor],
                    transformer: nn.Module, *, config: PuLIDFluxConfig | None = None
                    ) -> LoadedPuLIDFlux:
    """Read ``source``, check it strictly and load it into modules sized for ``transformer``.

    The modules are built on the meta device and then placed on the transformer's device in
    its dtype (as the official pipeline keeps them in the DiT's dtype); every value comes
    from the file. ``config`` defaults to the official sizes; tests pass a tiny one.
    """
    config = config or PuLIDFluxConfig()
    state_dict, where = read_pulid_flux_weights(source)
    transformer_config = transformer.config
    check_pulid_flux_layout(state_dict, where, transformer_config, config)
    groups = split_at_first_dot(state_dict)
    parameter = next(transformer.parameters())
    with torch.device("meta"):
        encoder = build_encoder(config)
        cross_attention = build_cross_attention(transformer_config, config)
    encoder = _place(encoder, parameter.device, parameter.dtype)
    cross_attention = _place(cross_attention, parameter.device, parameter.dtype)
    load_strict(encoder, groups[ENCODER_PREFIX], f"PuLID-FLUX {ENCODER_PREFIX} ({where})")
    load_strict(cross_attention, groups[CA_PREFIX], f"PuLID-FLUX {CA_PREFIX} ({where})")
    return LoadedPuLIDFlux(config, encoder.eval(), cross_attention.eval(),
                           positions_for(transformer_config, config))


# ---------------------------------------------------------------- attaching to a pipeline

@dataclass
class PuLIDFluxAdapter:
    """Everything PuLID-FLUX adds to a pipeline.

    encoder: the IDFormer; cross_attention: one module per block of ``positions``;
    features: reference image (and its index) -> ``FaceFeatures`` (PuLID's face pipeline);
    settings: the default ID weight and start step of a call.
    """

    config: PuLIDFluxConfig
    encoder: IDFormer
    cross_attention: nn.ModuleList
    positions: tuple[BlockPosition, ...]
    features: FeatureExtractor
    settings: PuLIDFluxSettings = PuLIDFluxSettings()

    def to(self, device: torch.device | str) -> PuLIDFluxAdapter:
        """Move the encoder and the cross-attention modules (not the face models)."""
        self.encoder.to(device)
        self.cross_attention.to(device)
        return self


def attach_pulid_flux(pipe: Any, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
                      features: FeatureExtractor, *, config: PuLIDFluxConfig | None = None,
                      id_weight: float = 1.0, start_step: int = 0) -> PuLIDFluxAdapter:
    """Load ``checkpoint`` for ``pipe.transformer`` and attach PuLID-FLUX (``pipe.pulid_flux``).

    checkpoint: ``pulid_flux_v0.9.1.safetensors`` or its flat state dict. id_weight,
    start_step: the defaults of a call (the official demo's 1 and 0). ``pipe(...)`` itself
    stays plain FLUX: the ID is injected only inside ``bf_core.wrap(pipe)(...)``. Undo with
    :func:`detach_pulid_flux`.
    """
    if not is_flux_pipeline(pipe):
        raise ConfigError(f"PuLID-FLUX attaches to a diffusers FluxPipeline; got a "
                          f"{type(pipe).__name__}.")
    if getattr(pipe, PULID_FLUX_ATTRIBUTE, None) is not None:
        raise ConfigError("PuLID-FLUX is already attached to this pipeline; call "
                          "detach_pulid_flux(pipe) first to load another checkpoint.")
    settings = PuLIDFluxSettings(id_weight, start_step)
    loaded = load_pulid_flux(checkpoint, pipe.transformer, config=config)
    adapter = PuLIDFluxAdapter(loaded.config, loaded.encoder, loaded.cross_attention,
                               loaded.positions, features, settings)
    setattr(pipe, PULID_FLUX_ATTRIBUTE, adapter)
    return adapter


def detach_pulid_flux(pipe: Any) -> None:
    """Remove ``pipe.pulid_flux``; nothing else on the pipeline was changed."""
    if getattr(pipe, PULID_FLUX_ATTRIBUTE, None) is not None:
        setattr(pipe, PULID_FLUX_ATTRIBUTE, None)


def settings_for(base: PuLIDFluxSettings, options: Mapping[str, Any]) -> PuLIDFluxSettings:
    """The attached settings with a call's ``id_weight`` / ``start_step`` (validated)."""
    changes = {name: options[name] for name in ("id_weight", "start_step")
               if options.get(name) is not None}
    return dataclasses.replace(base, **changes) if changes else base


def load_pipeline_setup(base_model: str, checkpoint: str | None, *, torch_dtype: Any = None,
                        device: str | None = None):
    """``BackendExtras.load_pipeline``: a FLUX.1 base model (diffusers folder or hub id) with
    ``checkpoint`` (``pulid_flux_v0.9.1.safetensors``) attached. The face models lie beside
    it, as for PuLID on SDXL: ``antelopev2/``, ``parsing_bisenet.pth`` and
    ``EVA02_CLIP_L_336_psz14_s6B.pt``."""
    from pathlib import Path

    from bf_core.extras import PipelineSetup
    from bf_core.hosts.flux import load_flux_pipeline

    path = Path(checkpoint) if checkpoint else None
    if path is None or not path.is_file():
        raise ConfigError(f"PuLID-FLUX's benchmark checkpoint must be the PuLID-FLUX file, got "
                          f"{checkpoint!r}; pass --checkpoint pulid_flux=<folder>/"
                          f"{CHECKPOINT_FILE}")
    features = face_features_beside(path, "PuLID-FLUX", "docs/backends/pulid_flux.md", device)
    pipe = load_flux_pipeline(base_model, torch_dtype=torch_dtype, device=device)
    attach_pulid_flux(pipe, path, features)
    return PipelineSetup(pipe)
