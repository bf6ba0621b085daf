"""Loading a base SDXL model with a DreamBooth/character LoRA or a textual inversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bf_core.errors import CheckpointError
from bf_core.extras import PipelineSetup
from bf_core.hosts.flux import is_flux_model, load_flux_pipeline
from bf_core.hosts.sdxl import load_sdxl_pipeline

IDENTITY_ADAPTER = "identity"


def load_identity_checkpoint(pipe: Any, checkpoint: str, adapter_name: str = IDENTITY_ADAPTER,
                             token: str | None = None) -> None:
    """Load a LoRA (``.safetensors``) as adapter ``adapter_name``, left unfused so each line
    can switch it; or a textual-inversion embedding when ``token`` is given."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"identity checkpoint not found: {checkpoint}")
    if token is None and path.suffix != ".safetensors":
        raise CheckpointError(f"{checkpoint}: identity LoRAs are read from .safetensors files only "
                              "(pickled LoRA files are refused: convert them first)")
    what = ("a textual-inversion embedding" if token is not None
            else "a FLUX.1 LoRA" if hasattr(pipe, "transformer") else "an SDXL LoRA")
    try:
        if token is not None:
            pipe.load_textual_inversion(str(path), token=token)
        else:
            pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint}: diffusers could not load it as {what} "
                              f"({type(exc).__name__}: {exc}). Give a LoRA trained for this base "
                              "model in diffusers, kohya or PEFT format (or an SDXL "
                              "embedding).") from exc


def load_dreambooth_pipeline(base_model: str, checkpoint: str | None = None, *, torch_dtype=None,
                             device: str | None = None, token: str | None = None,
                             local_files_only: bool = False):
    """The base model (SDXL, or FLUX.1 when ``is_flux_model`` says so) with the identity
    LoRA or, on SDXL, a textual-inversion embedding."""
    if is_flux_model(base_model):
        if token is not None:
            raise CheckpointError("textual inversion is served on SDXL only; on FLUX.1 give a "
                                  "character LoRA (.safetensors)")
        pipe = load_flux_pipeline(base_model, torch_dtype=torch_dtype, device=device,
                                  local_files_only=local_files_only)
    else:
        pipe = load_sdxl_pipeline(base_model, torch_dtype=torch_dtype, device=device,
                                  local_files_only=local_files_only)
    if checkpoint:
        load_identity_checkpoint(pipe, checkpoint, token=token)
    return pipe


def load_pipeline_setup(base_model: str, checkpoint: str | None, *, torch_dtype=None,
                        device: str | None = None) -> PipelineSetup:
    """``BackendExtras.load_pipeline``: the base model with the identity LoRA, if given."""
    return PipelineSetup(load_dreambooth_pipeline(base_model, checkpoint, torch_dtype=torch_dtype,
                                                  device=device))
