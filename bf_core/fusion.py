"""IdAF: Identity Adaptive Fusion (paper eq. 6-10), as pure tensor functions.

The ID line and the semantic line each predict a guided noise for the same latent. IdAF
picks, per sample and latent position, the line whose (smoothed, channel-averaged)
saliency is relatively stronger, and takes that line's signed noise at that position for
all channels. See ``docs/method.md`` for the decisions behind each step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bf_core.config import IdAFConfig
from bf_core.errors import ConfigError


def smooth_saliency(saliency: torch.Tensor, smoothing: str, kernel: int) -> torch.Tensor:
    """Spatially smooth saliency maps, keeping their size (paper eq. 7-8, S1 then S2).

    saliency: (B, C, H, W), float32. Returns (B, C, H, W).
    ``"avgpool"``: k x k box average, stride 1, zero padding 1 counted in the average
    (H -> H + 3 - k), then bilinear back to (H, W). ``"downup"``: bilinear down by a factor
    k, then back up. ``"none"``: unchanged.
    """
    if smoothing == "none":
        return saliency
    height, width = saliency.shape[-2:]
    if smoothing == "avgpool":
        if kernel > min(height, width) + 2:
            raise ConfigError(f"IdAFConfig.smooth_kernel={kernel} is larger than the padded latent "
                              f"({height}x{width} plus padding 1); use a kernel <= {min(height, width) + 2}")
        # Pad explicitly: the zeros count in every average, and a 1x1 box stays valid.
        pooled = F.avg_pool2d(F.pad(saliency, (1, 1, 1, 1)), kernel_size=kernel, stride=1)
    elif smoothing == "downup":
        small = (max(1, height // kernel), max(1, width // kernel))
        pooled = F.interpolate(saliency, size=small, mode="bilinear", align_corners=False)
    else:
        raise ConfigError(f"unknown smoothing {smoothing!r}")
    return F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False)


def spatial_log_weights(saliency_map: torch.Tensor, lam: float) -> torch.Tensor:
    """log softmax of ``lam * saliency`` over all H*W positions of each sample (eq. 9).

    saliency_map: (N, 1, H, W) float32. Returns (N, 1, H, W) float32. Taken in log space
    so that a near-uniform softmax over 16,384 positions never underflows.
    """
    n = saliency_map.shape[0]
    flat = (lam * saliency_map).reshape(n, -1)
    return F.log_softmax(flat, dim=1).reshape(saliency_map.shape)


def id_decision_map(
    saliency_id: torch.Tensor, saliency_sem: torch.Tensor, config: IdAFConfig
) -> torch.Tensor:
    """Where the ID line wins (eq. 9-10). Ties go to the semantic line.

    saliency_id, saliency_sem: (N, C, H, W) raw saliency sources (their absolute value is
    taken here). Returns a bool tensor (N, 1, H, W), True where the ID line wins.
    """
    n = saliency_id.shape[0]
    stacked = torch.cat([saliency_id, saliency_sem], dim=0).abs().float()  # (2N, C, H, W)
    smoothed = smooth_saliency(stacked, config.smoothing, config.smooth_kernel)
    channel_mean = smoothed.mean(dim=1, keepdim=True)  # (2N, 1, H, W)
    abar_id, abar_sem = channel_mean[:n], channel_mean[n:]
    if config.lambda_mode == "temperature":
        return spatial_log_weights(abar_id, config.lambda_id) > spatial_log_weights(abar_sem,
                                                                                   config.lambda_sem)
    # "weight": lambda scales the softmax output; compared in log space, log(l) + log W.
    score_id = math.log(config.lambda_id) + spatial_log_weights(abar_id, 1.0)
    score_sem = math.log(config.lambda_sem) + spatial_log_weights(abar_sem, 1.0)
    return score_id > score_sem


def idaf(
    eps_id: torch.Tensor,
    eps_sem: torch.Tensor,
    config: IdAFConfig | None = None,
    *,
    saliency_id: torch.Tensor | None = None,
    saliency_sem: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the two lines' guided noises (paper eq. 6-10).

    eps_id, eps_sem: (N, C, H, W) guided noise of the ID and semantic lines.
    saliency_id, saliency_sem: optional (N, C, H, W) saliency sources; by default the
        guided noises themselves (``saliency="guided"``). ``"cfg_delta"`` needs both given.
    Returns ``(eps_fused, id_wins)``: (N, C, H, W) in the inputs' dtype, gathered from the
    original signed noises; and the bool decision map (N, 1, H, W). Inputs are not mutated.
    """
    config = config or IdAFConfig()
    if eps_id.shape != eps_sem.shape:
        raise ConfigError(f"idaf: eps_id {tuple(eps_id.shape)} and eps_sem {tuple(eps_sem.shape)} "
                          "must have the same (N, C, H, W) shape")
    if eps_id.ndim != 4:
        raise ConfigError(f"idaf: expected (N, C, H, W) noise, got {eps_id.ndim} dimensions")
    if (saliency_id is None) != (saliency_sem is None):
        raise ConfigError("idaf: give both saliency_id and saliency_sem, or neither")
    if saliency_id is None:
        if config.saliency == "cfg_delta":
            raise ConfigError("idaf: saliency='cfg_delta' needs saliency_id and saliency_sem "
                              "(the scaled guidance responses); the DLI loop passes them")
        saliency_id, saliency_sem = eps_id, eps_sem
    elif saliency_id.shape != eps_id.shape or saliency_sem.shape != eps_id.shape:
        raise ConfigError("idaf: saliency tensors must have the noise shape "
                          f"{tuple(eps_id.shape)}, got {tuple(saliency_id.shape)} and "
                          f"{tuple(saliency_sem.shape)}")
    id_wins = id_decision_map(saliency_id, saliency_sem, config)
    return torch.where(id_wins, eps_id, eps_sem), id_wins
