"""How the benchmark finds what to run for a backend, and the face measure's one-face shortcut."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks.scenarios import BenchIdentity
from benchmarks.targets import BackendTarget, resolve_target


class _BareBackend:
    name = "bare"
    default_id_prompt = "a person"


class _ProtocolBackend(_BareBackend):
    """A backend that speaks the benchmark protocol, as a new backend would."""

    name = "newcomer"

    def __init__(self):
        self.built_with: list[int] = []

    def benchmark_tiny_pipeline(self, seed: int = 0):
        self.built_with.append(seed)
        return f"tiny pipeline {seed}"

    def benchmark_call_kwargs(self, identity, images):
        return {"id_images": images[:1], "newcomer_option": identity.name}


def test_a_backend_with_the_protocol_is_picked_up_for_tiny_runs():
    backend = _ProtocolBackend()
    target = resolve_target(backend, tiny=True, base_model=None)
    assert isinstance(target, BackendTarget) and target.name == "newcomer"
    assert target.build_pipeline(None) == "tiny pipeline 0" and backend.built_with == [0]
    identity = BenchIdentity("alice", ())
    assert target.call_kwargs(identity, ["photo1", "photo2"]) == {
        "id_images": ["photo1"], "newcomer_option": "alice"}


def test_a_backend_without_a_tiny_pipeline_is_left_out_with_the_reason():
    why = resolve_target(_BareBackend(), tiny=True, base_model=None)
    assert isinstance(why, str) and "benchmark_tiny_pipeline" in why


def test_default_call_keywords_pass_the_photos_and_the_identity_prompt():
    class Backend(_BareBackend):
        def benchmark_tiny_pipeline(self, seed=0):
            return None

    target = resolve_target(Backend(), tiny=True, base_model=None)
    plain = BenchIdentity("p", ())
    prompted = BenchIdentity("q", (), id_prompt="a photo of a woman",
                             backend_options={"bare": {"id_prompt": "a photo of bare person"}})
    assert target.call_kwargs(plain, ["x"]) == {"id_images": ["x"]}
    assert target.call_kwargs(prompted, ["x"]) == {"id_images": ["x"],
                                                   "id_prompt": "a photo of bare person"}


def test_installed_ipadapter_is_in_tiny_runs_and_its_own_protocol_would_win():
    from bf_core.plugins import get_registry

    installed = get_registry().backends()
    if "ipadapter" not in installed:
        pytest.skip("the IP-Adapter backend is not installed")
    assert isinstance(resolve_target(installed["ipadapter"], tiny=True, base_model=None),
                      BackendTarget)

    class OwnIPAdapter(_ProtocolBackend):
        name = "ipadapter"

    own = resolve_target(OwnIPAdapter(), tiny=True, base_model=None)
    assert own.build_pipeline(None) == "tiny pipeline 0"  # not the known fallback


def test_largest_face_is_the_largest_of_all_detections_with_the_same_embedding(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("insightface")
    from benchmarks.metrics.builtin import largest_face
    from bf_core.faces import FaceAnalyzer
    from bf_core.testing_faces import make_random_insightface_pack

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
