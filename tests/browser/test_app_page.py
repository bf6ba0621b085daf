"""``beyondfacial app`` in a browser: a run from the page, its files, its errors, its knobs."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bf_backends.photomaker.testing import reference_photo_path
from bf_core.config import BFConfig

PROMPT = "a person img is kneeling by a small lake, touching the water, full body"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOCS_SCREENSHOT = Path(__file__).parents[2] / "docs" / "images" / "app.png"


def png_pixels(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_SIGNATURE), "the page shows no PNG file"
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# The random face detector of the tiny pipeline "finds" dozens of faces in the photo.
@pytest.mark.filterwarnings("ignore::bf_core.faces.MultipleFacesWarning")
def test_a_run_shows_the_method_beside_its_baseline_and_how_to_reproduce_it(
        cli_app, open_page, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    from bf_core import cli

    page = open_page(cli_app)
    expect(page.page.locator("#tiny-banner")).to_contain_text("noise by design")
    page.fill(reference_photo_path(), PROMPT)
    page.generate()
    page.wait_for_results()

    (method,), (baseline,) = page.image_files("method-images"), page.image_files("baseline-images")
    method_pixels, baseline_pixels = png_pixels(method), png_pixels(baseline)
    assert method_pixels.shape == baseline_pixels.shape == (64, 64, 3)
    assert method_pixels.std() > 0 and baseline_pixels.std() > 0  # pictures, not blanks
    assert not np.array_equal(method_pixels, baseline_pixels)  # the method changed the scene

    (strip,) = page.image_files("fusion-strips")
    assert png_pixels(strip).shape[1] > png_pixels(strip).shape[0]  # a strip of steps
    (animation,) = page.image_files("fusion-animations")
    m1, _ = BFConfig().thresholds(4)
    with Image.open(io.BytesIO(animation)) as gif:  # one frame per step i > M1
        assert gif.format == "GIF" and gif.n_frames == 4 - 1 - m1

    settings = page.settings()
    assert settings["backend"] == "photomaker" and settings["seeds"] == [0]
    assert settings["config"] == dataclasses.asdict(BFConfig())
    assert settings["call"]["prompt"] == PROMPT
    assert settings["call"]["num_inference_steps"] == 4 and settings["call"]["height"] == 64
    (photo,) = settings["id_images"]  # named from the folder the app was started in
    assert (tmp_path / photo).read_bytes() == reference_photo_path().read_bytes()

    # The command on the page, run from that folder, reproduces the run: the same picture,
    # the same settings.
    monkeypatch.chdir(tmp_path)
    words = shlex.split(page.command())
    assert words[:2] == ["beyondfacial", "generate"] and "--tiny" in words
    assert cli.main(words[1:]) == 0
    out = Path(words[words.index("--out") + 1])
    assert np.array_equal(png_pixels((out / "image_seed0_0.png").read_bytes()), method_pixels)
    assert json.loads((out / "image_settings.json").read_text()) == settings

    shot = page.screenshot(tmp_path / "app.png")
    if os.environ.get("BEYONDFACIAL_DOCS_SCREENSHOT"):  # refreshes the picture in docs/app.md
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_m1_and_m2_from_the_advanced_section_reach_the_run(start_app, open_page):
    from playwright.sync_api import expect

    page = open_page(start_app())
    page.fill(reference_photo_path(), PROMPT)
    page.open_advanced()
    page.page.locator("#threshold-unit").get_by_text("step index").click()
    m1, m2 = BFConfig().thresholds(4)  # switching the unit converts the paper's fractions
    expect(page.page.locator("#idaf-start input")).to_have_value(str(m1))
    expect(page.page.locator("#idap-start input")).to_have_value(str(m2))
    page.page.locator("#idaf-start input").fill("2")
    page.page.locator("#idap-start input").fill("1")
    page.record_progress()
    page.generate()
    page.wait_for_results()
    # The bar was fed by the calls' step callbacks: steps of both calls, in order.
    seen = page.progress_seen()
    assert any(text.startswith("seed 0, BeyondFacial: step") for text in seen), seen
    assert any(text.startswith("seed 0, baseline: step") for text in seen), seen
    order = ["BeyondFacial" in text for text in seen]
    assert order == sorted(order, reverse=True), seen  # the method's call, then the baseline

    settings = page.settings()
    assert (settings["config"]["idaf_start"], settings["config"]["idap_start"]) == (2, 1)
    command = shlex.split(page.command())
    assert command[command.index("--idaf-start") + 1] == "2"
    assert command[command.index("--idap-start") + 1] == "1"
    # M2 < M1 is the library's to allow: the page runs it and says what it means.
    notes = page.page.locator("#notes")
    assert "M2 (1) is before M1 (2)" in notes.inner_text()


@pytest.fixture
def no_face_loader(tmp_path):
    """The tiny PhotoMaker V2 pipeline with a face detector that finds no face.

    Offline there is no real detector: the tiny pipeline's random one "finds" faces in any
    picture. This one finds none, as a real detector does on a photo without a face, so
    the library's face check runs and refuses."""
    from bf_backends.photomaker.testing import tiny_pipeline
    from bf_core.app.run import load_setup
    from bf_core.extras import PipelineSetup
    from bf_core.faces import FaceAnalyzer
    from bf_core.testing.faces import make_random_insightface_pack

    pack = make_random_insightface_pack(tmp_path / "buffalo_l", face_logit_bias=-20.0)

    def load(args):
        if not args.tiny:
            return load_setup(args)
        analyzer = FaceAnalyzer(model=pack, det_size=(128, 128),
                                providers=["CPUExecutionProvider"])
        return PipelineSetup(tiny_pipeline(version=2, face_analyzer=analyzer),
                             identity={"id_prompt": "a person img"})

    return load


def test_bad_input_shows_the_librarys_error_in_the_page(start_app, open_page, tmp_path,
                                                        no_face_loader):
    import torch

    from bf_core.app.run import PipelineCache
    from bf_core.testing import tiny_sdxl_pipeline

    page = open_page(start_app(PipelineCache(load=no_face_loader)))
    wall = tmp_path / "wall.png"
    Image.new("RGB", (256, 256), (205, 190, 170)).save(wall)
    page.fill(wall, PROMPT)
    page.generate()
    page.wait_for_message("FaceNotFoundError: no face was found in reference image 0")

    # Another method's checkpoint: an IP-Adapter file given to PhotoMaker.
    base = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(base)
    foreign = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}}, foreign)
    page.give_model_paths(base, foreign)
    page.generate()
    page.wait_for_message(re.compile(r"CheckpointError: .*looks like an IP-Adapter"))

    assert "Traceback" not in page.page.content()
    assert page.page.locator("#method-images img").count() == 0
    assert not list((tmp_path / "runs").glob("run-*"))  # refused runs leave nothing behind
