"""The command line on FLUX.1: the demo and `generate --tiny --host flux` on the tiny
FluxPipeline, and a backend that serves SDXL only refused by name."""

from __future__ import annotations

import json

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
