"""How the benchmark finds what to run for a backend, and the face measure's one-face shortcut."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks.scenarios import BenchIdentity
from benchmarks.targets import BackendTarget, installed_target, resolve_target
from bf_core.extras import BackendExtras, PipelineSetup

BUILT_IN_BACKENDS = ("dreambooth", "instantid", "ipadapter", "photomaker", "pulid")
#: the backends whose benchmark call keywords are their own (the others take the default)
PROTOCOL_BACKENDS = ("instantid", "photomaker", "pulid")


class _BareBackend:
    name = "bare"
    default_id_prompt = "a person"


class _NewcomerExtras:
    """What a new backend's plugin answers through ``bf_backend_extras``."""

    def __init__(self):
        self.built_with: list[int] = []

    def tiny_pipeline(self, seed: int = 0):
        self.built_with.append(seed)
        return PipelineSetup(f"tiny pipeline {seed}", options={"face_analyzer": "tiny"})

    def extras(self, **fields):
        return BackendExtras(prompt="p", id_prompt="a person", tiny_pipeline=self.tiny_pipeline,
                             **fields)


def test_a_backend_with_extras_is_picked_up_for_tiny_runs():
    newcomer = _NewcomerExtras()
    extras = newcomer.extras(call_kwargs=lambda identity, images: {
        "id_images": images[:1], "newcomer_option": identity.name})
    backend = type("Newcomer", (_BareBackend,), {"name": "newcomer"})()
    target = resolve_target(backend, extras, tiny=True, base_model=None)
    assert isinstance(target, BackendTarget) and target.name == "newcomer"
    setup = target.build_pipeline(None)
    assert setup.pipe == "tiny pipeline 0" and newcomer.built_with == [0]
    assert setup.options == {"face_analyzer": "tiny"}
    identity = BenchIdentity("alice", ())
    assert target.call_kwargs(identity, ["photo1", "photo2"]) == {
        "id_images": ["photo1"], "newcomer_option": "alice"}


def test_a_backend_without_extras_is_left_out_with_the_reason():
    why = resolve_target(_BareBackend(), None, tiny=True, base_model=None)
    assert isinstance(why, str) and "bf_backend_extras" in why
    no_files = resolve_target(_BareBackend(), _NewcomerExtras().extras(), tiny=False,
                              base_model="some/sdxl")
    assert isinstance(no_files, str) and "load_pipeline" in no_files


def test_default_call_keywords_pass_the_photos_and_the_identity_prompt():
    target = resolve_target(_BareBackend(), _NewcomerExtras().extras(), tiny=True,
                            base_model=None)
    plain = BenchIdentity("p", ())
    prompted = BenchIdentity("q", (), id_prompt="a photo of a woman",
                             backend_options={"bare": {"id_prompt": "a photo of bare person"}})
    assert target.call_kwargs(plain, ["x"]) == {"id_images": ["x"]}
    assert target.call_kwargs(prompted, ["x"]) == {"id_images": ["x"],
                                                   "id_prompt": "a photo of bare person"}


def test_installed_ipadapter_is_in_tiny_runs_and_a_plugin_answering_for_it_wins():
    from bf_core.hookspecs import hookimpl
    from bf_core.plugins import get_registry, register_plugin, unregister_plugin

    installed = get_registry().backends()
    if "ipadapter" not in installed:
        pytest.skip("the IP-Adapter backend is not installed")
    assert isinstance(installed_target("ipadapter", tiny=True, base_model=None), BackendTarget)

    newcomer = _NewcomerExtras()

    class OwnExtras:
        @hookimpl
        def bf_backend_extras(self, backend):
            return newcomer.extras() if backend == "ipadapter" else None

    name = register_plugin(OwnExtras(), name="test-own-ipadapter-extras")
    try:
        own = installed_target("ipadapter", tiny=True, base_model=None)
        assert own.build_pipeline(None).pipe == "tiny pipeline 0"  # the newest answer wins
    finally:
        unregister_plugin(name)


def _installed(names):
    from bf_core.plugins import get_registry

    installed = get_registry().backends()
    missing = [name for name in names if name not in installed]
    if missing:
        pytest.skip(f"backend(s) {missing} not installed")
    return installed


def test_a_tiny_run_targets_every_built_in_backend(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("insightface")
    from benchmarks.cli import build_parser, spec_from_args
    from benchmarks.runner import Runner

    _installed(BUILT_IN_BACKENDS)
    args = build_parser().parse_args(["--tiny", "--out", str(tmp_path), "--no-progress"])
    runner = Runner(spec_from_args(args), rank=0, world_size=1)
    assert runner.skipped == {}
    assert set(BUILT_IN_BACKENDS) <= set(runner.targets)
    assert {item.backend for item in runner.grid if not item.is_reference} >= set(BUILT_IN_BACKENDS)


def test_photomaker_is_called_with_its_trigger_word_and_scored_on_the_scene_prompt():
    backend = _installed(["photomaker"])["photomaker"]
    target = installed_target("photomaker", tiny=True, base_model=None)
    scene = "A person is kneeling by a small lake, touching the water"
    assert target.prompt(scene) == "A person img is kneeling by a small lake, touching the water"
    assert target.prompt("a woman img by a lake") == "a woman img by a lake"  # already there
    assert target.prompt("a quiet lake at dawn") == "a quiet lake at dawn"  # no class word
    for other in ("dreambooth", "ipadapter"):
        _installed([other])
        assert installed_target(other, tiny=True, base_model=None).prompt(scene) == scene

    plain = BenchIdentity("p", ())
    shared = BenchIdentity("q", (), id_prompt="a photo of a woman")
    own = BenchIdentity("r", (), id_prompt="a photo of a woman",
                        backend_options={"photomaker": {"id_prompt": "a man img, smiling"}})
    assert target.call_kwargs(plain, ["x"]) == {"id_images": ["x"],
                                                "id_prompt": backend.default_id_prompt}
    assert target.call_kwargs(shared, ["x"])["id_prompt"] == "a photo of a woman img"
    assert target.call_kwargs(own, ["x"])["id_prompt"] == "a man img, smiling"


def test_real_runs_of_instantid_and_pulid_say_which_files_their_checkpoint_needs(tmp_path):
    from bf_core.errors import ConfigError

    _installed(["instantid", "pulid"])
    (tmp_path / "ip-adapter.bin").write_bytes(b"")  # no ControlNetModel/ beside it
    pulid_file = tmp_path / "pulid_v1.bin"
    pulid_file.write_bytes(b"")  # no face models beside it
    for name, checkpoint, named in (("instantid", tmp_path, "ControlNetModel/"),
                                    ("pulid", pulid_file, "parsing_bisenet.pth")):
        target = installed_target(name, tiny=False, base_model="some/sdxl")
        with pytest.raises(ConfigError, match=named):
            target.build_pipeline(str(checkpoint))


def test_each_protocol_backend_draws_a_tiny_image_through_its_benchmark_target(tmp_path):
    """One baseline image per backend, from the tiny pipeline, call keywords and prompt the
    benchmark itself would use: the method-off path is where PhotoMaker needs its trigger."""
    pytest.importorskip("onnx")
    pytest.importorskip("insightface")
    import torch

    import bf_core
    from benchmarks.cli import _tiny_identities
    from benchmarks.scenarios import Setting, load_identity, load_prompt_set

    _installed(PROTOCOL_BACKENDS)
    identity = load_identity(_tiny_identities(tmp_path)[0])
    photos = identity.load_images()
    scene = load_prompt_set("action").prompts[0]
    baseline = Setting.named("baseline")
    for name in PROTOCOL_BACKENDS:
        target = installed_target(name, tiny=True, base_model=None)
        setup = target.build_pipeline(None)
        pipe = setup.pipe
        pipe.set_progress_bar_config(disable=True)
        kwargs = {**setup.options, **target.call_kwargs(identity, photos)}
        assert kwargs["id_images"] == photos, name
        result = bf_core.wrap(pipe, backend=name, config=baseline.config)(
            prompt=target.prompt(scene), num_inference_steps=2, guidance_scale=5.0,
            height=64, width=64, output_type="pil",
            generator=torch.Generator().manual_seed(0), **kwargs)
        pixels = np.asarray(result.images[0], dtype=np.float32)
        assert pixels.shape == (64, 64, 3), name
        assert np.isfinite(pixels).all() and pixels.std() > 0, name  # a picture, not a blank
        assert result.diagnostics["model_rows"] > 0, name


def test_largest_face_is_the_largest_of_all_detections_with_the_same_embedding(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("insightface")
    from benchmarks.metrics.builtin import largest_face
    from bf_core.faces import FaceAnalyzer
    from bf_core.testing.faces import make_random_insightface_pack

    pack = make_random_insightface_pack(tmp_path / "buffalo_l", seed=3, face_logit_bias=10.0)
    analyzer = FaceAnalyzer(model=pack, det_size=(64, 64), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for _ in range(2):
        image = Image.fromarray((rng.random((64, 48, 3)) * 255).astype(np.uint8))
        every = analyzer.detect(image)
        assert len(every) > 1  # the shortcut matters only when there are several
        expected = max(every, key=lambda f: f.area)
        got = largest_face(analyzer, image)
        np.testing.assert_array_equal(got.bbox, expected.bbox)
        np.testing.assert_allclose(got.normed_embedding, expected.normed_embedding, atol=1e-6)

    never = make_random_insightface_pack(tmp_path / "none", seed=3, face_logit_bias=-20.0)
    blind = FaceAnalyzer(model=never, det_size=(64, 64), providers=["CPUExecutionProvider"])
    assert largest_face(blind, Image.new("RGB", (64, 64))) is None
