"""Loading on FLUX.1: which base models are FLUX, and a character LoRA file through the
DreamBooth loader (the real safetensors path, on the tiny pipeline)."""

from __future__ import annotations

import json

import pytest
import torch

from bf_backends.dreambooth.loader import load_dreambooth_pipeline, load_identity_checkpoint
from bf_core.errors import CheckpointError
from bf_core.hosts.flux import is_flux_model
from bf_core.testing.tiny_flux import add_tiny_flux_lora, tiny_flux_pipeline


def test_flux_base_models_are_told_from_their_folder_or_hub_id(tmp_path):
    flux, sdxl = tmp_path / "flux", tmp_path / "sdxl-named-flux-on-purpose"
    for folder, name in ((flux, "FluxPipeline"), (sdxl, "StableDiffusionXLPipeline")):
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
    assert is_flux_model(str(flux)) and not is_flux_model(str(sdxl))  # the folder decides
    assert is_flux_model("black-forest-labs/FLUX.1-dev")
    assert not is_flux_model("stabilityai/stable-diffusion-xl-base-1.0")


def test_a_missing_flux_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="FLUX base model folder"):
        load_dreambooth_pipeline(str(tmp_path / "no-FLUX-here"))


def test_a_flux_character_lora_file_loads_and_runs_like_the_lora_it_was_saved_from(tmp_path):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    trained = tiny_flux_pipeline(seed=0)
    add_tiny_flux_lora(trained, adapter_name="identity", text_encoder=False)
    FluxPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(
            trained.transformer, adapter_name="identity"), weight_name="ana.safetensors")
    fresh = tiny_flux_pipeline(seed=0)
    load_identity_checkpoint(fresh, str(tmp_path / "ana.safetensors"), adapter_name="identity")
    call = dict(prompt="a person", num_inference_steps=2, height=32, width=32,
                output_type="latent", max_sequence_length=16)
    expected = trained(**call, generator=torch.Generator().manual_seed(0)).images
    loaded = fresh(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="textual inversion is served on SDXL only"):
        load_dreambooth_pipeline("black-forest-labs/FLUX.1-dev", token="<sks>")
