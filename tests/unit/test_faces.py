"""Face analysis over insightface, run on random-weight ONNX packs (offline, seconds).

The packs come from ``bf_core.testing.faces``: insightface's real detection, NMS,
alignment and embedding code runs on them; only the weights are random.
"""

from __future__ import annotations

import socket
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from bf_core.errors import (
    ConfigError,
    FaceNotFoundError,
    MissingDependencyError,
    MultipleFacesError,
)
from bf_core.faces import (
    Face,
    FaceAnalyzer,
    FaceModelsNotFoundError,
    MultipleFacesWarning,
    align_face,
    select_face,
)
from bf_core.testing.faces import make_random_antelopev2_pack, make_random_insightface_pack

pytest.importorskip("insightface")
pytest.importorskip("onnx")

SMALL = (128, 128)  # detector input: a few dozen random faces, milliseconds per image


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of waiting on it."""

    def refuse(*args, **kwargs):
        raise AssertionError("face analysis tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    import insightface.utils.storage as storage

    monkeypatch.setattr(storage, "download_file", refuse)


@pytest.fixture(scope="module")
def faces_pack(tmp_path_factory):
    return make_random_insightface_pack(tmp_path_factory.mktemp("always"), face_logit_bias=12.0)


@pytest.fixture(scope="module")
def empty_pack(tmp_path_factory):
    return make_random_insightface_pack(tmp_path_factory.mktemp("never"), face_logit_bias=-12.0)


@pytest.fixture(scope="module")
def analyzer(faces_pack):
    return FaceAnalyzer(root=faces_pack, det_size=SMALL)


def _photo(seed: int, size=(96, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_detect_returns_faces_with_documented_shapes_and_order(analyzer):
    faces = analyzer.detect(_photo(0))
    assert faces
    for face in faces:
        assert face.bbox.shape == (4,) and face.kps.shape == (5, 2)
        assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
        assert np.linalg.norm(face.normed_embedding) == pytest.approx(1.0, abs=1e-5)
        assert face.bbox[2] > face.bbox[0] and face.bbox[3] > face.bbox[1]
    scores = [f.det_score for f in faces]
    assert scores == sorted(scores, reverse=True)


def test_embedding_is_raw_and_normed_is_its_direction(analyzer):
    face = analyzer.detect(_photo(1))[0]
    norm = np.linalg.norm(face.embedding)
    assert abs(norm - 1.0) > 1e-2  # raw ArcFace output, not normalised
    np.testing.assert_allclose(face.normed_embedding, face.embedding / norm, rtol=1e-5)


def test_embeddings_are_deterministic_across_analyzers_and_regenerated_packs(
    faces_pack, tmp_path
):
    again = make_random_insightface_pack(tmp_path / "again", face_logit_bias=12.0)
    image = _photo(2)
    first = FaceAnalyzer(root=faces_pack, det_size=SMALL).detect(image)
    second = FaceAnalyzer(root=again, det_size=SMALL).detect(image)
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.bbox, b.bbox)
        np.testing.assert_array_equal(a.embedding, b.embedding)


def test_embedding_depends_on_the_image(analyzer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleFacesWarning)
        a = analyzer.embed(_photo(3), policy="highest_score")[0]
        b = analyzer.embed(_photo(4), policy="highest_score")[0]
    assert not np.allclose(a.embedding, b.embedding)


def test_align_face_is_norm_crop_in_rgb_and_feeds_the_recogniser(analyzer):
    from insightface.utils import face_align

    image = _photo(5)
    face = analyzer.detect(image)[0]
    crop = align_face(image, face.kps, size=112)
    assert crop.size == (112, 112) and crop.mode == "RGB"
    bgr_crop = face_align.norm_crop(image[:, :, ::-1].copy(), landmark=face.kps, image_size=112)
    np.testing.assert_array_equal(np.asarray(crop), bgr_crop[:, :, ::-1])
    # The face's embedding is the recogniser on exactly this crop.
    recognizer = analyzer.app.models["recognition"]
    np.testing.assert_allclose(recognizer.get_feat(bgr_crop).ravel(), face.embedding,
                               rtol=1e-5, atol=1e-5)
    assert align_face(Image.fromarray(image), face.kps, size=224).size == (224, 224)


def test_align_face_rejects_bad_size_and_keypoints():
    with pytest.raises(ConfigError, match="multiple of 112 or 128"):
        align_face(_photo(0), np.zeros((5, 2)), size=100)
    with pytest.raises(ConfigError, match=r"\(5, 2\)"):
        align_face(_photo(0), np.zeros((4, 2)))


def test_no_face_names_the_image_and_suggests_a_better_photo(empty_pack, tmp_path):
    analyzer = FaceAnalyzer(root=empty_pack, det_size=SMALL)
    path = tmp_path / "blank.png"
    Image.fromarray(_photo(6)).save(path)
    assert analyzer.detect(path) == []
    with pytest.raises(FaceNotFoundError) as info:
        analyzer.embed([path])
    message = str(info.value)
    assert "reference image 0" in message and str(path) in message
    assert "larger" in message and "frontal" in message


def test_several_faces_with_policy_error_raise(analyzer):
    assert len(analyzer.detect(_photo(8))) > 1  # the premise: a crowd of random faces
    with pytest.raises(MultipleFacesError, match="reference image 0"):
        analyzer.embed([_photo(8)], policy="error")


def test_largest_policy_picks_the_largest_box_and_warns(analyzer):
    faces = analyzer.detect(_photo(9))
    with pytest.warns(MultipleFacesWarning, match=f"{len(faces)} faces"):
        chosen = analyzer.embed(_photo(9), policy="largest")[0]
    assert chosen.area == pytest.approx(max(f.area for f in faces))
    with pytest.warns(MultipleFacesWarning):
        best = analyzer.embed(_photo(9), policy="highest_score")[0]
    assert best.det_score == max(f.det_score for f in faces)


def _face(box, score) -> Face:
    embedding = np.ones(512, dtype=np.float32)
    return Face(np.array(box, dtype=np.float32), np.zeros((5, 2), dtype=np.float32),
                score, embedding, embedding / np.linalg.norm(embedding))


def test_select_face_tie_rules_follow_the_official_scripts():
    high = _face((0, 0, 10, 10), 0.9)
    low_same_area = _face((20, 20, 30, 30), 0.8)
    small = _face((0, 0, 5, 5), 0.9)
    with pytest.warns(MultipleFacesWarning):
        # InstantID/PuLID: stable ascending sort by area, last wins among equal areas.
        assert select_face([high, low_same_area, small], "largest") is low_same_area
    with pytest.warns(MultipleFacesWarning):
        # PhotoMaker: faces[0] of the score-ordered list, first among equal scores.
        assert select_face([high, low_same_area, small], "highest_score") is high


def test_select_face_single_face_does_not_warn_and_bad_policy_is_named():
    only = _face((0, 0, 10, 10), 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_face([only], "error") is only
    with pytest.raises(ConfigError, match="largest, highest_score, error"):
        select_face([only], "biggest")
    with pytest.raises(FaceNotFoundError, match="reference image 3"):
        select_face([], "largest", 3)


def test_antelopev2_pack_in_an_insightface_root(tmp_path):
    make_random_antelopev2_pack(tmp_path / "models" / "antelopev2", face_logit_bias=12.0)
    analyzer = FaceAnalyzer("antelopev2", root=tmp_path, det_size=SMALL)
    assert analyzer.model_dir == (tmp_path / "models" / "antelopev2").resolve()
    assert analyzer.detect(_photo(10))


def test_missing_pack_lists_the_files_and_the_folder(tmp_path):
    analyzer = FaceAnalyzer("buffalo_l", root=tmp_path, det_size=SMALL)  # lazy: no error yet
    with pytest.raises(FaceModelsNotFoundError) as info:
        analyzer.detect(_photo(0))
    message = str(info.value)
    assert "det_10g.onnx" in message and "w600k_r50.onnx" in message
    assert str(tmp_path / "models" / "buffalo_l") in message
    assert "Nothing is downloaded" in message


def test_empty_folder_left_by_a_failed_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    leftover = tmp_path / ".insightface" / "models" / "antelopev2"
    leftover.mkdir(parents=True)
    with pytest.raises(FaceModelsNotFoundError) as info:
        FaceAnalyzer("antelopev2").detect(_photo(0))
    message = str(info.value)
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message
    assert f"{leftover} (exists but holds no .onnx files)" in message


def test_folder_without_a_detector_is_a_named_error(faces_pack, tmp_path):
    only_recognizer = tmp_path / "custom_pack"
    only_recognizer.mkdir()
    (only_recognizer / "w600k_r50.onnx").write_bytes((faces_pack / "w600k_r50.onnx").read_bytes())
    with pytest.raises(FaceModelsNotFoundError, match="no face detector"):
        FaceAnalyzer(only_recognizer).detect(_photo(0))


def test_missing_insightface_names_the_extra(faces_pack, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # makes the import fail
    analyzer = FaceAnalyzer(root=faces_pack, det_size=SMALL)
    with pytest.raises(MissingDependencyError, match=r"beyondfacial\[faces\]"):
        analyzer.detect(_photo(0))


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ConfigError, match="det_thresh"):
        FaceAnalyzer(det_thresh=1.5)
    with pytest.raises(ConfigError, match="multiples of 32"):
        FaceAnalyzer(det_size=(100, 100))


def test_retry_sizes_leave_the_detector_size_unchanged(empty_pack):
    analyzer = FaceAnalyzer(root=empty_pack, det_size=SMALL, retry_det_sizes=[(96, 96)])
    assert analyzer.detect(_photo(0)) == []
    assert tuple(analyzer.app.det_model.input_size) == SMALL
