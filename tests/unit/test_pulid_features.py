"""PuLID's face-feature steps, the ID token layout, and the named errors for missing extras."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bf_backends.pulid.encoder import encode_identity, guidance_off_sequence
from bf_backends.pulid.eva import EVAFeatures, build_eva_tower
from bf_backends.pulid.features import (
    FFHQ_TEMPLATE_512,
    align_ffhq,
    clip_pixels,
    id_condition,
    load_bisenet_parser,
    parse_face,
    whitened_grey_face,
)
from bf_backends.pulid.testing import (
    TINY_ID_COND_DIM,
    TinyFaceParser,
    TinyVisionTower,
    tiny_encoder_config,
    tiny_face_features,
    tiny_face_image,
)
from bf_core.errors import ConfigError, FaceNotFoundError, MissingDependencyError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_whitening_keeps_face_labels_as_grey_and_whitens_the_rest():
    crop = torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[[0, 1, 2, 16, 17], [18, 7, 8, 9, 10], [14, 15, 11, 12, 13],
                            [3, 4, 5, 6, 1]]])
    out = whitened_grey_face(crop, labels)
    grey = 0.299 * crop[0, 0] + 0.587 * crop[0, 1] + 0.114 * crop[0, 2]
    removed = torch.isin(labels[0], torch.tensor([0, 7, 8, 9, 14, 15, 16, 18]))
    for channel in range(3):
        assert torch.equal(out[0, channel][removed], torch.ones(int(removed.sum())))
        assert torch.equal(out[0, channel][~removed], grey[~removed])


def test_clip_resize_has_no_antialias_and_no_clamp():
    face = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    face[:, :, ::2] = 1.0  # stripes: antialiasing and overshoot would both show
    out = clip_pixels(face, 28, mean=(0, 0, 0), std=(1, 1, 1))
    expected = F.interpolate(face, (28, 28), mode="bicubic", align_corners=False)
    assert torch.equal(out, expected)
    smoothed = F.interpolate(face, (28, 28), mode="bicubic", align_corners=False,
                             antialias=True)
    assert (out - smoothed).abs().max() > 1e-2
    assert out.max() > 1.0  # bicubic overshoot kept, as the pinned torchvision did


def test_alignment_of_template_keypoints_is_the_identity_warp():
    rgb = np.asarray(tiny_face_image(3, size=512))
    aligned = align_ffhq(rgb, FFHQ_TEMPLATE_512)
    assert aligned.shape == (512, 512, 3) and aligned.dtype == np.uint8
    assert np.abs(aligned.astype(int) - rgb.astype(int)).max() <= 1


def test_alignment_maps_a_shifted_face_back_onto_the_template():
    rgb = np.zeros((600, 600, 3), np.uint8)
    shifted = FFHQ_TEMPLATE_512 - np.array([40.0, 30.0], np.float32)
    for x, y in shifted.astype(int):
        rgb[y - 2:y + 3, x - 2:x + 3] = 255  # white dots at the keypoints
    aligned = align_ffhq(rgb, shifted)
    for x, y in FFHQ_TEMPLATE_512.astype(int):
        assert aligned[y, x].min() > 200
    assert tuple(aligned[0, 0]) == (132, 133, 135)  # facexlib's grey border, in RGB


def test_id_condition_puts_raw_arcface_first_and_unit_clip_second():
    arcface = torch.randn(2, 512) * 7
    clip = torch.randn(2, 16) * 3
    cond = id_condition(arcface, clip)
    assert torch.equal(cond[:, :512], arcface)
    torch.testing.assert_close(cond[:, 512:].norm(dim=1), torch.ones(2))


def test_parser_output_shape_is_checked():
    with pytest.raises(ConfigError, match="19"):
        parse_face(torch.nn.Conv2d(3, 5, 1), torch.rand(1, 3, 8, 8))
    labels = parse_face(TinyFaceParser(), torch.rand(1, 3, 8, 8))
    assert labels.shape == (1, 8, 8) and labels.dtype == torch.int64


def test_eva_features_returns_cls_first_block_outputs_and_removes_its_hooks():
    tower = TinyVisionTower().eval()
    features = EVAFeatures(tower, image_size=28)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    embedding, hidden = features(pixels)
    assert embedding.shape == (2, 16) and [h.shape for h in hidden] == [(2, 5, 16)] * 5
    tokens = torch.cat([tower.cls_token.expand(2, -1, -1),
                        tower.patch_embed(pixels).flatten(2).transpose(1, 2)], 1)
    tokens = tokens + tower.pos_embed
    for block in tower.blocks[:4]:
        tokens = block(tokens)
    torch.testing.assert_close(hidden[0], tokens, rtol=0, atol=0)
    assert all(not block._forward_hooks for block in tower.blocks)
    with pytest.raises(ConfigError, match="at least 20"):
        EVAFeatures(TinyVisionTower(depth=12))


def _features_of_images(version, images):
    extractor = tiny_face_features()
    return [extractor(tiny_face_image(seed), seed) for seed in range(images)]


@pytest.mark.parametrize("version, images, id_mix, tokens", [
    ("v1", 1, False, 10), ("v1", 2, False, 15), ("v1", 2, True, 20), ("v1.1", 2, False, 32)])
def test_id_token_counts(version, images, id_mix, tokens):
    from bf_backends.pulid.modules import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(version, tiny_encoder_config(version, 64, TINY_ID_COND_DIM)).eval()
    positive, negative = encode_identity(encoder, _features_of_images(version, images), id_mix)
    assert positive.shape == negative.shape == (1, tokens, 64)
    assert positive.dtype == torch.float32


def test_guidance_off_sequence_layout():
    positive, negative = torch.ones(1, 3, 4), -torch.ones(1, 3, 4)
    sequence = guidance_off_sequence(positive, negative, num_zero=2)
    assert sequence.shape == (1, 10, 4)
    assert torch.equal(sequence[0, :3], negative[0]) and torch.equal(sequence[0, 5:8], positive[0])
    assert not sequence[0, 3:5].any() and not sequence[0, 8:].any()


def test_a_photo_without_a_face_is_a_named_error(tmp_path):
    from bf_backends.pulid.features import PuLIDFaceFeatures
    from bf_core.faces import FaceAnalyzer
    from bf_core.testing.faces import make_random_antelopev2_pack

    pack = make_random_antelopev2_pack(tmp_path, face_logit_bias=-20.0)
    extractor = PuLIDFaceFeatures(FaceAnalyzer(pack, det_size=(128, 128)), TinyFaceParser(),
                                  EVAFeatures(TinyVisionTower(), image_size=28))
    with pytest.raises(FaceNotFoundError, match="reference image 0"):
        extractor(tiny_face_image(), 0)


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an absent package looks like
    with pytest.raises(MissingDependencyError, match=r"beyondfacial\[pulid\]"):
        build_eva_tower()


def test_missing_facexlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "facexlib", None)
    monkeypatch.setitem(sys.modules, "facexlib.parsing", None)
    monkeypatch.setitem(sys.modules, "facexlib.parsing.bisenet", None)
    with pytest.raises(MissingDependencyError, match=r"beyondfacial\[pulid\]"):
        load_bisenet_parser(tmp_path / "parsing_bisenet.pth")
