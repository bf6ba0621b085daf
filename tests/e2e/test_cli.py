"""The ``beyondfacial`` command on the tiny offline pipeline."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bf_core import cli


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\nfrom bf_core import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['--help'])\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("generate", "backends", "env", "demo"):
        assert command in out


def test_env_reports_versions(capsys):
    assert cli.main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] and info["versions"]["diffusers"]
    assert "cuda_available" in info["devices"]


def test_generate_writes_images_fusion_maps_and_exact_settings(tmp_path, capsys):
    args = ["generate", "--tiny", "--prompt", "a person hiking a ridge", "--id-prompt",
            "a photo of sks person", "--steps", "5", "--height", "64", "--width", "64",
            "--seed", "1", "--seed", "2", "--lambda-id", "3", "--idaf-start", "1",
            "--idap-start", "0.4", "--out", str(tmp_path), "--name", "run", "--dtype", "float32"]
    assert cli.main(args) == 0
    for seed in (1, 2):
        image = Image.open(tmp_path / f"run_seed{seed}_0.png")
        assert image.size == (64, 64)
        assert (tmp_path / f"run_seed{seed}_0_fusion.png").exists()
    settings = json.loads((tmp_path / "run_settings.json").read_text())
    assert settings["config"]["idaf"]["lambda_id"] == 3.0
    assert settings["config"]["idaf_start"] == 1 and settings["config"]["idap_start"] == 0.4
    assert settings["seeds"] == [1, 2] and settings["call"]["num_inference_steps"] == 5
    assert not list(tmp_path.glob("*.partial"))
    # A second run into the same folder refuses to overwrite what is there.
    with pytest.raises(SystemExit, match="would overwrite"):
        cli.main(args)


def test_generate_rejects_bad_settings_with_the_field_named(tmp_path, capsys):
    code = cli.main(["generate", "--tiny", "--prompt", "x", "--lambda-id", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "lambda_id" in err


def test_generate_names_a_missing_base_model(tmp_path, capsys):
    missing = tmp_path / "no-such-sdxl"
    code = cli.main(["generate", "--base-model", str(missing), "--prompt", "x", "--out",
                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "does not exist" in err


def test_demo_writes_its_pictures(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "4", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "--base-model" in out
    for name in ("demo_seed0_0.png", "demo_seed0_0_fusion.png", "demo_comparison.png",
                 "demo_settings.json"):
        assert (tmp_path / name).exists(), name


def _explode(args):
    raise RuntimeError("something deep\nwent wrong")


def test_any_error_is_one_line_and_a_hint_with_the_traceback_only_when_verbose(monkeypatch,
                                                                             capsys):
    monkeypatch.setattr(cli, "cmd_env", _explode)
    assert cli.main(["env"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: RuntimeError: something deep went wrong",
                                f"({cli.VERBOSE_HINT})"]
    with pytest.raises(RuntimeError, match="something deep"):
        cli.main(["--verbose", "env"])


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory):
    from bf_core.testing import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("contents", [b"not a safetensors file", "wrong-keys"])
def test_a_bad_dreambooth_lora_is_a_checkpoint_error_in_one_line(contents, tiny_sdxl_folder,
                                                                  tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "identity.safetensors"
    if contents == "wrong-keys":
        save_file({"text_model.nonsense.weight": torch.zeros(2, 2)}, str(lora))
    else:
        lora.write_bytes(contents)
    code = cli.main(["generate", "--backend", "dreambooth", "--base-model", str(tiny_sdxl_folder),
                     "--checkpoint", str(lora), "--dtype", "float32", "--prompt", "x",
                     "--steps", "2", "--height", "64", "--width", "64",
                     "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, lines  # above it only the loading progress bars
    message = lines[errors[0]:]
    assert message[0].startswith(f"error: {lora}: diffusers could not load it as an SDXL LoRA")
    assert message[1:] == [f"({cli.VERBOSE_HINT})"] and "Traceback" not in "\n".join(lines)


def test_generate_draws_several_people_given_with_person(tmp_path, capsys):
    out = tmp_path / "two"
    code = cli.main(["generate", "--tiny", "--prompt", "two friends at a market", "--steps", "4",
                     "--height", "64", "--width", "64", "--out", str(out),
                     "--person", "prompt=a photo of sks woman;box=0,0,0.5,1",
                     "--person", "prompt=a photo of sks man;box=0.5,0,1,1"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "image_settings.json").read_text())
    assert [p["id_prompt"] for p in settings["people"]] == ["a photo of sks woman",
                                                            "a photo of sks man"]
    assert settings["people"][1]["region"] == [0.5, 0.0, 1.0, 1.0]
    assert (out / "image_seed0_0_fusion.png").is_file()


@pytest.mark.parametrize("spec", ["prompt", "box=0,0,1", "colour=red"])
def test_a_malformed_person_is_refused_by_argparse(spec, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--tiny", "--prompt", "x", "--out", str(tmp_path), "--person", spec])
    err = capsys.readouterr().err
    assert "argument --person" in err and ("a person is" in err or "four numbers" in err)


def test_a_person_may_bring_a_mask_file_or_an_auto_box(tmp_path, capsys):
    from bf_core.regions import AUTO

    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "right.png")
    person = cli.parse_person(f"prompt=a photo of sks man;mask={tmp_path / 'right.png'}")
    assert person.region.size == (32, 32) and person.id_prompt == "a photo of sks man"
    assert cli.parse_person("box=auto").region == AUTO
    with pytest.raises(argparse.ArgumentTypeError, match="one box= or mask="):
        cli.parse_person(f"box=0,0,1,1;mask={tmp_path / 'right.png'}")
    with pytest.raises(argparse.ArgumentTypeError, match="mask='missing.png'"):
        cli.parse_person("mask=missing.png")
    out = tmp_path / "masked"
    code = cli.main(["generate", "--tiny", "--prompt", "two friends at a market", "--steps", "4",
                     "--height", "64", "--width", "64", "--out", str(out),
                     "--person", "prompt=a photo of sks woman;box=0,0,0.5,1",
                     "--person", f"prompt=a photo of sks man;mask={tmp_path / 'right.png'}"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "image_settings.json").read_text())
    assert settings["people"][1]["region"] == "mask 32x32"
