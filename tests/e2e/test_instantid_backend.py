"""The InstantID backend end to end on tiny random weights (6 steps, 64 px, CPU).

Baseline parity is against ``reference_instantid_call``, the official basic pipeline's call
restated from the spec. The one place two correct implementations round differently is the
Resampler (diffusers' SDPA vs the official pre-scaled float32 softmax); the
bit-exact test therefore hands the reference the pipeline's own projection module, and a
second test checks the reference's own Resampler math against it to float tolerance.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import bf_core
from bf_backends.instantid.keypoints import draw_kps
from bf_backends.instantid.loader import find_instantid_projection
from bf_backends.instantid.reference import reference_control_image, reference_instantid_call
from bf_backends.instantid.testing import (
    face_pack,
    tiny_adapter_state,
    tiny_official_style_pipeline,
    tiny_pipeline,
)
from bf_core.errors import ConfigError, FaceNotFoundError, ImageInputError, MultipleFacesError
from bf_core.testing import BackendConformance, pipeline_fingerprint, tiny_sdxl_pipeline

# The random detector finds many overlapping "faces"; choosing the largest warns each time.
pytestmark = pytest.mark.filterwarnings("ignore::bf_core.faces.MultipleFacesWarning")

REFERENCE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), np.uint8))
SIZE, STEPS = 64, 6


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    from bf_core.faces import FaceAnalyzer

    root = tmp_path_factory.mktemp("faces")
    # A small detector input keeps the random ONNX detector fast; sizes are not under test.
    return (FaceAnalyzer(str(face_pack(root / "finds", finds_faces=True)), det_size=(128, 128)),
            FaceAnalyzer(str(face_pack(root / "blind", finds_faces=False)), det_size=(128, 128)))


@pytest.fixture(scope="module")
def analyzer(packs):
    return packs[0]


def _reference_face(analyzer):
    return analyzer.embed([REFERENCE])[0]


def official_call(pipe, analyzer, resampler="pipeline", **kwargs):
    """The reference (official) call with the same face and keypoint image the backend uses."""
    face = _reference_face(analyzer)
    if resampler == "pipeline":
        resampler = (find_instantid_projection(pipe.unet) if hasattr(pipe.unet, "encoder_hid_proj")
                     and pipe.unet.encoder_hid_proj is not None else pipe.image_proj_model)
    return reference_instantid_call(
        pipe, pipe.controlnet, tiny_adapter_state(0),
        face_embeddings=torch.from_numpy(face.embedding)[None],
        keypoint_image=draw_kps(REFERENCE.size, face.kps), resampler=resampler, **kwargs)


def call_kwargs(seed=0, **overrides):
    kwargs = dict(prompt="a person is kneeling by a small lake", num_inference_steps=STEPS,
                  height=SIZE, width=SIZE, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    kwargs.update(overrides)
    return kwargs


def wrapped(pipe, **config):
    return bf_core.wrap(pipe, backend="instantid", config=bf_core.BFConfig(**config))


class TestInstantIDConformance(BackendConformance):
    backend_name = "instantid"
    merges_lines = True
    steps, size = STEPS, SIZE

    @pytest.fixture(autouse=True)
    def _analyzer(self, analyzer):
        self.analyzer = analyzer

    def make_pipeline(self):
        return tiny_pipeline(seed=0)

    def identity_kwargs(self):
        return {"id_images": [REFERENCE], "face_analyzer": self.analyzer}

    def stock_call(self, pipe, **kwargs):
        return official_call(pipe, self.analyzer, **kwargs)


# --------------------------------------------------------------------------- baseline


@pytest.mark.parametrize("images_per_prompt", [2])
def test_baseline_is_the_official_algorithm_bit_for_bit_with_several_images(analyzer,
                                                                           images_per_prompt):
    pipe = tiny_pipeline(seed=0)
    kwargs = call_kwargs(num_images_per_prompt=images_per_prompt,
                         negative_prompt="blurry", guidance_scale=4.0)
    ours = wrapped(pipe, enabled=False)(**kwargs, id_images=[REFERENCE],
                                         face_analyzer=analyzer).images
    official = official_call(pipe, analyzer, **call_kwargs(
        num_images_per_prompt=images_per_prompt, negative_prompt="blurry",
        guidance_scale=4.0)).images
    assert ours.shape == (images_per_prompt, SIZE, SIZE, 3)
    np.testing.assert_array_equal(ours, official)


def test_baseline_matches_the_official_resampler_math_to_float_tolerance(analyzer):
    pipe = tiny_pipeline(seed=0)
    ours = wrapped(pipe, enabled=False)(**call_kwargs(), id_images=[REFERENCE],
                                         face_analyzer=analyzer).images
    official = official_call(pipe, analyzer, resampler=None, **call_kwargs()).images
    np.testing.assert_allclose(ours, official, atol=1e-4)
    no_identity = official_call(pipe, analyzer, ip_scale=0.0, conditioning_scale=0.0,
                                **call_kwargs()).images
    assert np.abs(no_identity - official).max() > 1e-2  # the tolerance is far below the effect


def test_official_style_pipeline_is_recognised_and_reused_bit_for_bit(analyzer):
    pipe = tiny_official_style_pipeline(seed=0)
    bf = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))
    assert bf.backend.name == "instantid"
    ours = bf(**call_kwargs(), id_images=[REFERENCE], face_analyzer=analyzer).images
    before = pipeline_fingerprint(pipe)  # after a first call: transformers adds its hooks then
    official = official_call(pipe, analyzer, resampler=None, **call_kwargs()).images
    np.testing.assert_array_equal(ours, official)
    dual = bf.with_config(enabled=True)(**call_kwargs(), id_images=[REFERENCE],
                                        face_analyzer=analyzer).images
    assert np.isfinite(dual).all() and np.abs(dual - ours).max() > 1e-4
    assert pipeline_fingerprint(pipe) == before


def test_semantic_line_is_the_plain_sdxl_model_exactly(analyzer):
    """ID attention at scale 0 and no IdentityNet = the base UNet, bit for bit."""
    stock = tiny_sdxl_pipeline(seed=0)(**call_kwargs()).images
    for pipe in (tiny_pipeline(seed=0), tiny_official_style_pipeline(seed=0)):
        semantic_only = wrapped(pipe, use_idaf=False, use_idap=False)(
            **call_kwargs(), id_images=[REFERENCE], face_analyzer=analyzer).images
        np.testing.assert_array_equal(semantic_only, stock)


# --------------------------------------------------------------------------- keypoints


class _ControlSpy:
    """Records IdentityNet's keypoint input for each call (hook removed afterwards)."""

    def __init__(self, controlnet):
        self.conds: list[torch.Tensor] = []
        self.handle = controlnet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.conds.append(kwargs["controlnet_cond"].clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _run(pipe, analyzer, **options):
    with _ControlSpy(pipe.controlnet) as spy:
        images = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE], face_analyzer=analyzer,
                               **options).images
    return images, spy.conds


def test_kps_auto_places_the_reference_keypoints_in_the_preview_face(analyzer, caplog):
    pipe = tiny_pipeline(seed=0)
    with caplog.at_level(logging.INFO, logger="bf_backends.instantid"):
        auto, conds = _run(pipe, analyzer)
    placed = [r for r in caplog.records if "face box" in r.getMessage()]
    assert len(placed) == 1 and conds, "the preview face must drive IdentityNet"
    box = np.array([float(v) for v in placed[0].getMessage().split("[")[1].split("]")[0]
                    .split(",")])
    drawn = conds[0][-1].amax(0) > 0  # (H, W) where markers were drawn
    ys, xs = np.nonzero(drawn.numpy())
    assert len(xs) > 0
    # Markers (joint radius scaled with the face) stay near the detected box.
    margin = 12
    assert xs.min() >= box[0] - margin and xs.max() <= box[2] + margin
    assert ys.min() >= box[1] - margin and ys.max() <= box[3] + margin
    reference = reference_control_image(draw_kps(REFERENCE.size, _reference_face(analyzer).kps),
                                        SIZE, SIZE)
    assert not torch.equal(conds[0][-1:], reference)
    none, _ = _run(pipe, analyzer, kps="none")
    assert np.abs(auto - none).max() > 1e-4


def _drawn_extent(cond: torch.Tensor):
    """(x0, y0, x1, y1) pixels where a (3, H, W) keypoint image has markers."""
    ys, xs = np.nonzero((cond.amax(0) > 0).numpy())
    return xs.min(), ys.min(), xs.max(), ys.max()


@pytest.mark.parametrize("kps, regions", [
    ("auto", ["auto", "auto"]),
    ("reference", [(0.5, 0.1, 0.9, 0.6), (0.0, 0.2, 0.4, 0.7)]),
])
def test_each_person_gets_its_keypoints_placed_in_its_own_region(analyzer, kps, regions):
    """Two people: every IdentityNet call of ID line j draws person j's keypoints inside
    person j's face: the detected one (kps='auto', region='auto'; the test detector lists
    the right face first) or the one its box implies (kps='reference')."""
    from bf_core.records import Person
    from bf_core.testing.faces import ScriptedFaceDetector

    faces = [(0.6, 0.2, 0.85, 0.45), (0.1, 0.3, 0.3, 0.5)]
    pipe = tiny_pipeline(seed=0)
    people = [Person(id_images=[REFERENCE], region=region) for region in regions]
    with _ControlSpy(pipe.controlnet) as spy:
        result = wrapped(pipe)(**call_kwargs(), people=people, face_analyzer=analyzer, kps=kps,
                               preview_face_analyzer=ScriptedFaceDetector(faces))
    assert len(spy.conds) == 2 * (STEPS - result.diagnostics["idaf_start"] - 1)
    if kps == "auto":
        expected = [faces[1], faces[0]]  # left to right
    else:  # the box shrunk about its centre by auto_region_scale
        expected = [((x0 + x1) / 2 - (x1 - x0) / 5, (y0 + y1) / 2 - (y1 - y0) / 5,
                     (x0 + x1) / 2 + (x1 - x0) / 5, (y0 + y1) / 2 + (y1 - y0) / 5)
                    for x0, y0, x1, y1 in regions]
    margin = 6  # markers are drawn around the keypoints, which sit inside the face
    for call, cond in enumerate(spy.conds):
        face = [v * SIZE for v in expected[call % 2]]
        x0, y0, x1, y1 = _drawn_extent(cond[-1])
        assert face[0] - margin <= x0 and x1 <= face[2] + margin
        assert face[1] - margin <= y0 and y1 <= face[3] + margin


def test_kps_auto_without_a_preview_face_turns_identitynet_off(packs, caplog):
    analyzer, blind = packs
    pipe = tiny_pipeline(seed=0)
    with caplog.at_level(logging.INFO, logger="bf_backends.instantid"):
        auto, conds = _run(pipe, analyzer, preview_face_analyzer=blind)
    assert conds == []
    assert any("no face in the step" in r.getMessage() for r in caplog.records)
    none, none_conds = _run(pipe, analyzer, kps="none")
    assert none_conds == []
    np.testing.assert_array_equal(auto, none)


def test_kps_reference_and_user_keypoints_reach_identitynet(analyzer):
    pipe = tiny_pipeline(seed=0)
    face = _reference_face(analyzer)
    _, conds = _run(pipe, analyzer, kps="reference")
    official = reference_control_image(draw_kps(REFERENCE.size, face.kps), SIZE, SIZE)
    torch.testing.assert_close(conds[0][-1:], official, rtol=0, atol=0)
    user_points = np.array([[20.0, 24], [44, 24], [32, 34], [24, 44], [40, 44]])
    _, conds = _run(pipe, analyzer, kps=user_points)
    drawn = reference_control_image(draw_kps((SIZE, SIZE), user_points), SIZE, SIZE)
    torch.testing.assert_close(conds[0][-1:], drawn, rtol=0, atol=0)
    image = draw_kps((128, 128), user_points * 2)  # the official `image=` argument
    _, conds = _run(pipe, analyzer, image=image)
    torch.testing.assert_close(conds[0][-1:], reference_control_image(image, SIZE, SIZE),
                               rtol=0, atol=0)


def test_bad_kps_and_unknown_options_are_named(analyzer):
    pipe = tiny_pipeline(seed=0)
    with pytest.raises(ConfigError, match="kps must be one of"):
        _run(pipe, analyzer, kps="centre")
    with pytest.raises(ConfigError, match=r"\(5, 2\)"):
        _run(pipe, analyzer, kps=np.zeros((68, 2)))
    with pytest.raises(ConfigError, match="unknown keyword.*'ip_scale'.*did you mean 'ip_adapter_scale'"):
        _run(pipe, analyzer, ip_scale=0.5)


# --------------------------------------------------------------------------- state, faces


def test_user_scales_and_processors_restored_after_a_failure_mid_loop(analyzer):
    pipe = tiny_pipeline(seed=0)
    pipe.set_ip_adapter_scale(0.6)
    processors = dict(pipe.unet.attn_processors)
    projection = pipe.unet.encoder_hid_proj
    seen = []

    def fail_after_id_line(pipeline, step, timestep, tensors):
        seen.append([p.scale for p in pipeline.unet.attn_processors.values()
                     if hasattr(p, "to_k_ip")][0])
        if step == STEPS - 2:
            raise RuntimeError("forced failure")
        return tensors

    with pytest.raises(RuntimeError, match="forced failure"):
        wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE], face_analyzer=analyzer,
                      ip_adapter_scale=1.3, callback_on_step_end=fail_after_id_line)
    assert [1.3] in seen  # the call's scale was in force for the ID line
    assert pipe.unet.encoder_hid_proj is projection
    assert "guidance_rescale" not in vars(pipe)
    for name, proc in pipe.unet.attn_processors.items():
        assert proc is processors[name]
        if hasattr(proc, "to_k_ip"):
            assert proc.scale == [0.6]


def test_reference_face_errors_are_named(packs, tmp_path):
    analyzer, blind = packs
    pipe = tiny_pipeline(seed=0)
    bf = wrapped(pipe)
    with pytest.raises(FaceNotFoundError, match="no face was found in reference image 0"):
        bf(**call_kwargs(), id_images=[REFERENCE], face_analyzer=blind)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="broken.png"):
        bf(**call_kwargs(), id_images=[str(broken)], face_analyzer=analyzer)
    with pytest.raises(MultipleFacesError, match="face policy is 'error'"):
        bf(**call_kwargs(), id_images=[REFERENCE], face_analyzer=analyzer, face_policy="error")
    with pytest.raises(FaceNotFoundError, match="id_images"):
        bf(**call_kwargs())


def test_face_embeds_replace_the_analysis(analyzer):
    pipe = tiny_pipeline(seed=0)
    face = _reference_face(analyzer)
    from_photo = wrapped(pipe, enabled=False)(**call_kwargs(), id_images=[REFERENCE],
                                              face_analyzer=analyzer, kps="none").images
    from_embeds = wrapped(pipe, enabled=False)(**call_kwargs(), image_embeds=face.embedding,
                                               kps="none").images
    np.testing.assert_array_equal(from_photo, from_embeds)
    with pytest.raises(ConfigError, match="face_embeds were given"):
        wrapped(pipe)(**call_kwargs(), face_embeds=face.embedding)  # kps='auto' needs a photo


def test_plain_sdxl_pipelines_are_not_instantid():
    from bf_backends.instantid.backend import InstantIDBackend

    assert not InstantIDBackend().recognizes(tiny_sdxl_pipeline(seed=0))
    assert bf_core.wrap(tiny_pipeline(seed=0)).backend.name == "instantid"
