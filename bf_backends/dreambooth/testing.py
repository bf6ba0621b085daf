"""Tiny offline DreamBooth pipelines and the speed script's set-up (test support)."""

from __future__ import annotations

from typing import Any

from bf_core.extras import PipelineSetup, SpeedSetup
from bf_core.testing.tiny import add_tiny_lora, tiny_sdxl_pipeline

SCENE_PROMPT = "a person is kneeling by a small lake, touching the water"
ID_PROMPT = "a photo of sks person"


def tiny_setup(seed: int = 0, host: str = "sdxl") -> PipelineSetup:
    """A tiny offline SDXL (or, with ``host="flux"``, FLUX.1) pipeline with a random identity
    LoRA, and its trigger prompt."""
    if host == "flux":
        from bf_core.testing.tiny_flux import add_tiny_flux_lora, tiny_flux_pipeline

        pipe = tiny_flux_pipeline(seed=seed)
        add_tiny_flux_lora(pipe, adapter_name="identity", seed=seed)
    else:
        pipe = tiny_sdxl_pipeline(seed=seed)
        add_tiny_lora(pipe, adapter_name="identity", seed=seed)
    return PipelineSetup(pipe, identity={"id_prompt": ID_PROMPT})


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """A random rank-``lora_rank`` character LoRA on the attention projections of the UNet
    (SDXL) or the transformer (FLUX); the stock pipeline's own call is the baseline."""
    import torch
    from peft import LoraConfig

    # The UNet on SDXL, the transformer on FLUX: both name their attention projections so.
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=False,
                            target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        denoiser.add_adapter(config, adapter_name="identity")
    denoiser.to(dtype=denoiser.dtype)
    return SpeedSetup(pipe, {"id_prompt": ID_PROMPT}, stock_is_pipeline=True)
