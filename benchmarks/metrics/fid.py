"""Frechet distance between two Gaussians fitted to image features (FID), numpy only.

FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

The matrix square root is never formed. S1 S2 is similar to the symmetric PSD matrix
M = S1^(1/2) S2 S1^(1/2) (conjugate by S1^(1/2)), so both have the same eigenvalues and
Tr((S1 S2)^(1/2)) = sum_k sqrt(eig_k(M)). S1^(1/2) and the eigenvalues of M come from
``numpy.linalg.eigh`` of symmetric matrices, which is stable where a general ``sqrtm``
of the non-symmetric product is not (and needs no scipy). Eigenvalues that round-off
pushes below zero are clipped to zero: both matrices are PSD by construction.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of features (n, d), n >= 2, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows of shape (n, d), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root (d, d) of a symmetric PSD matrix (d, d) by eigendecomposition."""
    symmetric = (matrix + matrix.T) / 2  # remove round-off asymmetry before eigh
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for PSD S1, S2 (d, d), via the eigenvalues of S1^½ S2 S1^½."""
    root = psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Squared Frechet distance of N(mu1, S1) and N(mu2, S2): mu (d,), S (d, d)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    difference = mu1 - mu2
    distance = (difference @ difference + np.trace(sigma1) + np.trace(sigma2)
                - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(float(distance), 0.0)  # round-off may dip just below zero for equal sets


def fid_from_features(generated: np.ndarray, reference: np.ndarray) -> float:
    """FID between two feature sets (n1, d) and (n2, d)."""
    return frechet_distance(*gaussian_stats(generated), *gaussian_stats(reference))
