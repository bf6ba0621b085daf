"""Face refine on the tiny pipelines of every backend: a second, masked img2img pass over
each face with the backend's own identity machinery on, pasted with a soft mask.

Faces are given by hand (``refine_boxes``) or found by the scripted test detector; the
pass's steps are few (``RefineConfig(work_size=64, effective_steps=3)``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bf_core
from bf_core.config import RefineConfig, effective_steps
from bf_core.errors import ConfigError
from bf_core.plugins import get_registry
from bf_core.refine import grown_box, scaled_box, soft_mask
from bf_core.testing.faces import ScriptedFaceDetector

SIZE = 128
FACE = (0.40, 0.20, 0.55, 0.35)  # fractions: 19 x 19 px at 128 px
BACKENDS = [("dreambooth", "sdxl"), ("photomaker", "sdxl"), ("ipadapter", "sdxl"),
            ("instantid", "sdxl"), ("pulid", "sdxl"), ("dreambooth", "flux"),
            ("xlabs_ipadapter", "flux"), ("pulid_flux", "flux"), ("infiniteyou", "flux")]


def refine_config(**fields) -> bf_core.BFConfig:
    return bf_core.BFConfig(refine=RefineConfig(**dict(dict(work_size=64, effective_steps=3),
                                                       **fields)))


def setup_of(name: str, host: str):
    return get_registry().extras(name).tiny_setup(seed=0, host=host)


def call(setup, name: str, config, seed: int = 0, **extra):
    scene = get_registry().extras(name).scene_prompt or (lambda prompt: prompt)
    kwargs = dict(prompt=scene("a person at a street market, full body"), num_inference_steps=6,
                  height=SIZE, width=SIZE, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    if "max_sequence_length" not in extra and hasattr(setup.pipe, "transformer"):
        extra["max_sequence_length"] = 32
    return bf_core.wrap(setup.pipe, backend=name, config=config)(
        **kwargs, **setup.identity, **setup.options, **extra)


def support(face_px, config: RefineConfig, size: int = SIZE) -> np.ndarray:
    """Where the paste may change pixels: the scaled face box's soft mask > 0."""
    box = scaled_box(face_px, config.mask_scale, size, size)
    return soft_mask(box, config.mask_blur_px, size, size) > 0


@pytest.mark.parametrize("name, host", BACKENDS, ids=[f"{n}-{h}" for n, h in BACKENDS])
def test_the_pass_changes_only_the_face_and_keeps_the_identity_on(name, host, one_thread):
    setup = setup_of(name, host)
    config = refine_config()
    result = call(setup, name, config, refine_faces=True, refine_boxes=[FACE])
    plain = call(setup, name, config)
    # The images before the pass are the call's images without refine_faces, bit for bit.
    np.testing.assert_array_equal(result.unrefined_images, plain.images)
    (face,), = result.refine_boxes
    inside = support(face, config.refine)
    assert np.array_equal(result.images[0][~inside], result.unrefined_images[0][~inside])
    assert not np.array_equal(result.images[0][inside], result.unrefined_images[0][inside])
    again = call(setup, name, config, refine_faces=True, refine_boxes=[FACE])
    np.testing.assert_array_equal(again.images, result.images)  # the same seed, the same face
    (entry,) = result.diagnostics["refine"]  # the main call's 6 steps: a few-step schedule
    steps, strength = config.refine.steps(6)
    assert entry["effective_steps"] == effective_steps(steps, strength) == math.ceil(
        strength * steps) and entry["model_calls"] == entry["effective_steps"]
    # The identity machinery is on in the pass: the ablation without it draws another face.
    off = call(setup, name, refine_config(identity="off"), refine_faces=True,
               refine_boxes=[FACE])
    np.testing.assert_array_equal(off.unrefined_images, result.unrefined_images)
    assert not np.array_equal(off.images[0][inside], result.images[0][inside])


@pytest.mark.parametrize("name, host", BACKENDS, ids=[f"{n}-{h}" for n, h in BACKENDS])
def test_without_a_size_the_call_and_its_pass_draw_at_the_hosts_native_size(name, host,
                                                                              one_thread):
    """No height, width or work size: the call draws at the pipeline's native side, as the
    stock pipeline does, and the pass works at it. SDXL's ControlNet pipeline class
    (InstantID) has no ``default_sample_size``; its side comes from the UNet's config."""
    setup = setup_of(name, host)
    pipe = setup.pipe
    side = (pipe.default_sample_size if host == "flux" else pipe.unet.config.sample_size
            ) * pipe.vae_scale_factor
    scene = get_registry().extras(name).scene_prompt or (lambda prompt: prompt)
    extra = {"max_sequence_length": 32} if host == "flux" else {}
    result = bf_core.wrap(pipe, backend=name, config=bf_core.BFConfig(
        refine=RefineConfig(effective_steps=2)))(
        prompt=scene("a person at a street market, full body"), num_inference_steps=4,
        output_type="np", generator=torch.Generator().manual_seed(0), refine_faces=True,
        refine_boxes=[FACE], **setup.identity, **setup.options, **extra)
    assert result.images.shape[1:3] == (side, side)
    assert result.unrefined_images.shape == result.images.shape
    (face,), = result.refine_boxes
    assert not np.array_equal(result.images, result.unrefined_images)  # the pass ran


def test_the_effective_step_count_is_ceil_of_strength_times_steps(lora_pipe, one_thread):
    config = bf_core.BFConfig(refine=RefineConfig(work_size=64, effective_steps=4,
                                                  strength=0.3))
    result = bf_core.wrap(lora_pipe, config=config)(
        prompt="a person", num_inference_steps=10, height=SIZE, width=SIZE, output_type="np",
        generator=torch.Generator().manual_seed(0), refine_faces=True, refine_boxes=[FACE])
    (entry,) = result.diagnostics["refine"]
    assert entry["prompt"] == "a photo of sks person, a person"  # DreamBooth: P_id leads
    steps = math.ceil(4 / 0.3)  # 14 steps at strength 0.3
    assert entry["steps"] == steps and entry["effective_steps"] == math.ceil(0.3 * steps) == 5
    assert entry["model_calls"] == entry["effective_steps"] == effective_steps(steps, 0.3)


def test_a_few_step_model_keeps_at_least_two_effective_steps():
    config = RefineConfig()  # strength 0.45: 4 x 0.45 would leave 1.8
    steps, strength = config.steps(4)
    assert steps == 4 and effective_steps(steps, strength) == 2
    assert config.steps(50) == (45, 0.45) and effective_steps(45, 0.45) == 21


def test_detection_refines_the_largest_small_face_and_skips_large_ones(lora_pipe, one_thread):
    small, smaller, large = (0.1, 0.1, 0.25, 0.25), (0.6, 0.1, 0.7, 0.2), (0.2, 0.3, 0.9, 1.0)
    detector = ScriptedFaceDetector([smaller, large, small])
    config = refine_config(max_face_px=64)  # the large face (90 px) is drawn well already
    result = bf_core.wrap(lora_pipe, config=config)(
        prompt="a person", num_inference_steps=6, height=SIZE, width=SIZE, output_type="np",
        generator=torch.Generator().manual_seed(0), refine_faces=True,
        refine_face_analyzer=detector)
    assert detector.seen == [(SIZE, SIZE)]  # the decoded image, at full size
    (face,), = result.refine_boxes
    assert face == tuple(round(v * SIZE) for v in small)
    two = bf_core.wrap(lora_pipe, config=refine_config(max_face_px=64, max_faces=2))(
        prompt="a person", num_inference_steps=6, height=SIZE, width=SIZE, output_type="np",
        generator=torch.Generator().manual_seed(0), refine_faces=True,
        refine_face_analyzer=ScriptedFaceDetector([smaller, large, small]))
    assert two.refine_boxes[0] == [tuple(round(v * SIZE) for v in box) for box in (small, smaller)]


def test_pil_output_keeps_the_pixels_outside_the_mask(lora_pipe, one_thread):
    config = refine_config()
    result = bf_core.wrap(lora_pipe, config=config)(
        prompt="a person", num_inference_steps=6, height=SIZE, width=SIZE, output_type="pil",
        generator=torch.Generator().manual_seed(0), refine_faces=True, refine_boxes=[FACE])
    (face,), = result.refine_boxes
    inside = support(face, config.refine)
    refined, before = np.asarray(result.images[0]), np.asarray(result.unrefined_images[0])
    assert np.array_equal(refined[~inside], before[~inside])
    assert not np.array_equal(refined[inside], before[inside])


@pytest.mark.parametrize("kwargs, message", [
    (dict(refine_boxes=[FACE]), "take effect with refine_faces=True"),
    (dict(refine_faces="yes"), "refine_faces must be True or False"),
    (dict(refine_faces=True, output_type="latent"), "output_type='latent' gives none"),
    (dict(refine_faces=True, refine_boxes=[(0.5, 0.5, 0.4, 0.6)]), "is not a box"),
    (dict(refine_faces=True, refine_boxes=[[FACE], [FACE]]), "2 lists of boxes but the call"),
])
def test_bad_refine_requests_are_named(kwargs, message, lora_pipe):
    call_kwargs = dict(prompt="a person", num_inference_steps=6, height=SIZE, width=SIZE,
                       output_type="np")
    call_kwargs.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        bf_core.wrap(lora_pipe, config=refine_config())(**call_kwargs)


def test_refine_config_is_validated():
    with pytest.raises(ConfigError, match="RefineConfig.strength"):
        RefineConfig(strength=1.5)
    with pytest.raises(ConfigError, match="keep blur <= dilate"):
        RefineConfig(mask_blur_px=8, mask_dilate_px=4)


def test_the_paste_mask_ends_exactly_at_its_support():
    box = (10, 10, 20, 20)
    alpha = soft_mask(box, 3, 40, 40)
    grown = grown_box(box, 3, 40, 40)
    outside = np.ones((40, 40), bool)
    outside[grown[1]:grown[3], grown[0]:grown[2]] = False
    assert (alpha[outside] == 0).all() and (alpha[grown[1]:grown[3], grown[0]:grown[2]] > 0).all()
    assert alpha[15, 15] == 1.0  # deep inside: the pass's pixels alone


def test_generate_refine_faces_writes_the_image_before_the_pass(tmp_path, capsys):
    import json

    from PIL import Image

    from bf_core import cli

    args = ["generate", "--tiny", "--prompt", "a person at a market", "--id-prompt",
            "a photo of sks person", "--steps", "6", "--height", str(SIZE), "--width",
            str(SIZE), "--out", str(tmp_path), "--name", "run", "--dtype", "float32",
            "--refine-faces", "--refine-box", "0.4,0.2,0.55,0.35", "--refine-work-size", "64",
            "--refine-steps", "3"]
    assert cli.main(args) == 0
    after = np.asarray(Image.open(tmp_path / "run_seed0_0.png"))
    before = np.asarray(Image.open(tmp_path / "run_seed0_0_unrefined.png"))
    assert after.shape == before.shape == (SIZE, SIZE, 3) and not np.array_equal(after, before)
    settings = json.loads((tmp_path / "run_settings.json").read_text())
    assert settings["call"]["refine_faces"] is True
    assert settings["config"]["refine"]["work_size"] == 64
    with pytest.raises(SystemExit, match="--refine-box takes effect with --refine-faces"):
        cli.main(args[:-7] + ["--refine-box", "0.4,0.2,0.55,0.35", "--overwrite"])


def test_instantid_feeds_identitynet_the_keypoints_found_again_in_the_crop(caplog, one_thread):
    """InstantID's pass: IdentityNet gets the keypoints its face analyser finds in the
    upscaled crop; with no face there, IdentityNet is off (the adapter alone), logged."""
    from PIL import Image

    setup = setup_of("instantid", "sdxl")
    backend = get_registry().get_backend("instantid")
    seen = []
    real = backend.refine_options

    def recording(crop, options):
        found = real(crop, options)
        seen.append((crop.size, found["kps"]))
        return found

    backend.refine_options = recording
    try:
        call(setup, "instantid", refine_config(), refine_faces=True, refine_boxes=[FACE])
    finally:
        del backend.refine_options
    (size, kps), = seen
    assert size == (64, 64) and np.asarray(kps).shape == (5, 2)  # the crop at the work size
    blind = {"face_analyzer": ScriptedFaceDetector([])}
    with caplog.at_level("WARNING"):
        assert backend.refine_options(Image.new("RGB", (64, 64)), blind) == {"kps": "none"}
    assert "no face found in the upscaled crop" in caplog.text


def test_the_passes_unet_calls_run_the_identity_lora(lora_pipe, one_thread):
    """DreamBooth, checked with hooks: every UNet call of the pass runs the identity LoRA's
    up-projections; the identity-off ablation's pass runs none of them."""
    from bf_core.switching import active_up_projections, peft_tuner_layers

    ups = [up for _, up in active_up_projections([layer for _, layer in
                                                  peft_tuner_layers(lora_pipe.unet)])]
    unet_calls, lora_calls = [], []
    handles = [lora_pipe.unet.register_forward_pre_hook(lambda m, a: unet_calls.append(1))]
    handles += [up.register_forward_hook(lambda m, a, o: lora_calls.append(len(unet_calls)))
                for up in ups]

    def pass_counts(identity):
        unet_calls.clear(), lora_calls.clear()
        result = bf_core.wrap(lora_pipe, config=refine_config(identity=identity))(
            prompt="a person", num_inference_steps=6, height=SIZE, width=SIZE,
            output_type="np", generator=torch.Generator().manual_seed(0), refine_faces=True,
            refine_boxes=[FACE])
        first = len(unet_calls) - result.diagnostics["refine"][0]["model_calls"]
        pass_calls = range(first + 1, len(unet_calls) + 1)
        return {call: lora_calls.count(call) for call in pass_calls}

    try:
        on, off = pass_counts("on"), pass_counts("off")
    finally:
        for handle in handles:
            handle.remove()
    assert on and all(count == len(ups) for count in on.values())  # every LoRA layer, every call
    assert off and all(count == 0 for count in off.values())
