"""FID's Frechet distance against closed forms, and the Inception network's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.metrics.fid import fid_from_features, frechet_distance, psd_sqrt
from benchmarks.metrics.inception import FID_CLASSES, FIDInception, InceptionConfig


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    # S1 = R diag(a) R^T, S2 = R diag(b) R^T commute, so
    # Tr((S1 S2)^1/2) = sum sqrt(a b) and FID = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    rotation = _rotation(6, 1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, rotation @ np.diag(a) @ rotation.T,
                           mu2, rotation @ np.diag(b) @ rotation.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_non_commuting_covariances_matches_scaled_case():
    # S2 = c^2 S1 gives Tr((S1 S2)^1/2) = c Tr(S1): FID = (1 - c)^2 Tr(S1) for equal means.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 5))
    sigma = x @ x.T
    assert frechet_distance(np.zeros(5), sigma, np.zeros(5), 9.0 * sigma) == pytest.approx(
        4.0 * np.trace(sigma), rel=1e-9)


def test_psd_sqrt_squares_back_and_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 4))
    sigma = x @ x.T
    root = psd_sqrt(sigma)
    np.testing.assert_allclose(root @ root, sigma, atol=1e-10)
    features = rng.normal(size=(50, 8))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(features, features + 1.0) == pytest.approx(8.0, rel=1e-9)


@pytest.mark.compat
def test_full_size_inception_has_the_fid_networks_parameters():
    # torchvision's inception_v3 without the auxiliary head has 23,834,568 parameters with a
    # 1000-way classifier; the FID file's 1008-way fc adds 8 x 2048 + 8.
    with torch.device("meta"):
        model = FIDInception()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 23_834_568 + 8 * 2048 + 8
    assert shapes["fc.weight"] == (FID_CLASSES, 2048)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert model.feature_dim == 2048


def test_tiny_inception_gives_one_feature_vector_per_image():
    torch.manual_seed(0)
    model = FIDInception(InceptionConfig(width=1 / 16, input_size=75)).eval()
    with torch.no_grad():
        features = model(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, model.feature_dim)
    assert torch.isfinite(features).all()
