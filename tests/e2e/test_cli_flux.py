"""The command line on FLUX.1: the demo and `generate --tiny --host flux` on the tiny
FluxPipeline, and a backend that serves SDXL only refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bf_core import cli


def test_generate_on_the_tiny_flux_pipeline_writes_images_and_the_host(tmp_path, capsys):
    args = ["generate", "--tiny", "--host", "flux", "--backend", "dreambooth", "--prompt",
            "two friends at a market", "--id-prompt", "a photo of sks man", "--steps", "4",
            "--height", "64", "--width", "64", "--out", str(tmp_path), "--name", "flux",
            "--dtype", "float32"]
    assert cli.main(args) == 0
    image = Image.open(tmp_path / "flux_seed0_0.png")
    assert image.size == (64, 64) and (tmp_path / "flux_seed0_0_fusion.png").exists()
    settings = json.loads((tmp_path / "flux_settings.json").read_text())
    assert settings["backend"] == "dreambooth"
    assert "guidance_scale" not in settings["call"]  # FLUX's own default, not SDXL's 5.0


def test_the_demo_runs_on_flux_and_says_so(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--backend", "dreambooth", "--host", "flux", "--steps", "3",
                     "--size", "64", "--out", str(out)]) == 0
    assert "TINY FLUX.1 pipeline" in capsys.readouterr().out
    for name in ("demo_seed0_0.png", "demo_seed0_0_fusion.png", "demo_comparison.png"):
        assert (out / name).exists()


def test_a_backend_serving_sdxl_only_is_refused_on_flux(tmp_path):
    with pytest.raises(SystemExit, match="'photomaker' serves sdxl pipelines, not flux"):
        cli.main(["demo", "--backend", "photomaker", "--host", "flux", "--out",
                  str(tmp_path / "demo")])


def test_the_settings_say_idap_does_not_apply_to_pulid_flux(tmp_path, capsys, monkeypatch):
    from bf_core import loop

    monkeypatch.setattr(loop, "_IDAP_WARNED", set())  # the warning comes once per process
    args = ["generate", "--tiny", "--backend", "pulid_flux", "--prompt", "a person at a market",
            "--steps", "3", "--height", "64", "--width", "64", "--out", str(tmp_path),
            "--name", "pulid", "--dtype", "float32"]
    with pytest.warns(UserWarning, match="IdAP does not apply"):
        assert cli.main(args) == 0
    settings = json.loads((tmp_path / "pulid_settings.json").read_text())
    assert settings["idap"] == "not applicable" and settings["host"] == "flux"


def test_generate_loads_a_local_flux_folder_and_a_flux_lora_file(tmp_path, capsys):
    """`generate --base-model <folder>` with a FLUX folder (its model_index.json decides) and
    a character LoRA file: the run is on the FLUX host, with the LoRA on the ID line."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from bf_core.testing.tiny_flux import add_tiny_flux_lora, tiny_flux_pipeline

    folder = tmp_path / "tiny-flux"
    tiny_flux_pipeline().save_pretrained(folder)
    trained = tiny_flux_pipeline()
    add_tiny_flux_lora(trained, text_encoder=False)
    FluxPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained.transformer,
                                                                    adapter_name="identity"),
        weight_name="ana.safetensors")
    args = ["generate", "--backend", "dreambooth", "--base-model", str(folder), "--checkpoint",
            str(tmp_path / "ana.safetensors"), "--dtype", "float32", "--prompt", "a person",
            "--id-prompt", "a photo of sks person", "--steps", "3", "--height", "64", "--width",
            "64", "--out", str(tmp_path / "out"), "--name", "flux"]
    assert cli.main(args) == 0
    settings = json.loads((tmp_path / "out" / "flux_settings.json").read_text())
    assert settings["host"] == "flux" and settings["backend"] == "dreambooth"
    with_lora = np.asarray(Image.open(tmp_path / "out" / "flux_seed0_0.png"))
    assert with_lora.shape == (64, 64, 3)
    without = [a for a in args if a not in ("--checkpoint", str(tmp_path / "ana.safetensors"))]
    without[without.index("flux")] = "bare"
    assert cli.main(without) == 0
    bare = np.asarray(Image.open(tmp_path / "out" / "bare_seed0_0.png"))
    assert not np.array_equal(with_lora, bare)  # the LoRA reached the ID line
