"""IdAP: Identity Aggregation Prepending (paper eq. 11-12), as pure tensor functions.

K fixed queries attend over the N identity tokens and pool them into K tokens, which are
prepended to the scene prompt's tokens on the semantic line. The method is tuning-free:
the queries are drawn once from N(0, 1) with a seeded CPU generator, so every machine
gets the same Q.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bf_core.errors import CheckpointError, ConfigError


def idap_query(num_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """The fixed query Q, shape (K, D), float32, on the CPU.

    Exactly ``torch.randn(K, D)`` drawn from a CPU ``torch.Generator`` seeded with ``seed``.
    """
    if num_tokens < 1 or dim < 1:
        raise ConfigError(f"idap_query needs num_tokens >= 1 and dim >= 1, got {num_tokens}, {dim}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(num_tokens, dim, generator=generator, dtype=torch.float32)


def load_idap_query(path: str | Path, num_tokens: int, dim: int) -> torch.Tensor:
    """A trained Q from a safetensors file holding ``idap_query`` of shape (K, D)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "idap_query" not in tensors:
        raise CheckpointError(f"{path}: no 'idap_query' tensor; keys are {sorted(tensors)[:8]}")
    query = tensors["idap_query"].float()
    if tuple(query.shape) != (num_tokens, dim):
        raise CheckpointError(f"{path}: idap_query has shape {tuple(query.shape)}, expected "
                              f"(K={num_tokens}, D={dim})")
    return query


def _logit_scale(temperature: float | str | None, dim: int) -> float:
    if temperature is None:
        return 1.0
    if temperature == "sqrt_d":
        return 1.0 / math.sqrt(dim)
    if isinstance(temperature, (str, bool)) or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"IdAP temperature must be None, 'sqrt_d' or > 0, got {temperature!r}")
    return 1.0 / float(temperature)


def idap_weights(
    t_id: torch.Tensor, query: torch.Tensor, temperature: float | str | None = None
) -> torch.Tensor:
    """The aggregation weights I = softmax over N of (T_id @ Q^T) (eq. 11).

    t_id: (B, N, D); query: (K, D). Returns (B, N, K) float32; each column sums to 1 over N.
    """
    if t_id.ndim != 3:
        raise ConfigError(f"IdAP: T_id must be (B, N, D), got shape {tuple(t_id.shape)}")
    if query.ndim != 2 or query.shape[1] != t_id.shape[2]:
        raise ConfigError(f"IdAP: query of shape {tuple(query.shape)} does not fit T_id tokens of "
                          f"width D={t_id.shape[2]}; the query must be (K, {t_id.shape[2]})")
    scores = t_id.float() @ query.to(t_id.device, torch.float32).T  # (B, N, K)
    scores = scores * _logit_scale(temperature, t_id.shape[2])
    return torch.softmax(scores, dim=1)


def idap_aggregate(
    t_id: torch.Tensor, query: torch.Tensor, temperature: float | str | None = None
) -> torch.Tensor:
    """Pool the N identity tokens into K tokens: T_id^s = I^T @ T_id (eq. 11-12).

    t_id: (B, N, D) in any float dtype; query: (K, D). Returns (B, K, D) in t_id's dtype,
    computed in float32.
    """
    weights = idap_weights(t_id, query, temperature)  # (B, N, K)
    pooled = weights.transpose(1, 2) @ t_id.float()  # (B, K, D)
    return pooled.to(t_id.dtype)


def idap_prepend(t_id_s: torch.Tensor, t_sem: torch.Tensor) -> torch.Tensor:
    """concat([T_id^s, T_sem], dim=1): (B, K, D) + (B, L, D) -> (B, K + L, D)."""
    if t_id_s.shape[2] != t_sem.shape[2]:
        raise ConfigError(f"IdAP: ID tokens have width D={t_id_s.shape[2]} but the scene prompt's "
                          f"tokens have D={t_sem.shape[2]}; the backend's T_id must live in the "
                          "UNet's cross-attention space")
    if t_id_s.shape[0] != t_sem.shape[0]:
        raise ConfigError(f"IdAP: batch of ID tokens ({t_id_s.shape[0]}) and scene tokens "
                          f"({t_sem.shape[0]}) differ")
    return torch.cat([t_id_s.to(t_sem.dtype), t_sem], dim=1)


def idap_selection(t_id: torch.Tensor, query: torch.Tensor,
                   temperature: float | str | None = None) -> torch.Tensor:
    """Diagnostics: for each query, the ID token position it weights most. (B, K) int64."""
    return idap_weights(t_id, query, temperature).argmax(dim=1)
