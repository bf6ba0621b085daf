"""IdAF: Identity Adaptive Fusion (paper eq. 6-10), as pure tensor functions.

The semantic line and one or more ID lines each predict a guided noise for the same
latent. IdAF picks, per sample and latent position, the line whose (smoothed,
channel-averaged) saliency is relatively strongest, and takes that line's signed noise at
that position for all channels. An ID line may be limited to a region where it competes
(several people, one ID line each); with one ID line competing everywhere this is the
paper's two-line IdAF exactly. See ``docs/method.md`` for the decisions behind each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def line_log_weights(abar: torch.Tensor, lam: float, lambda_mode: str) -> torch.Tensor:
    """One line's score at every position (eq. 9), in log space: (N, 1, H, W) float32.

    ``"temperature"``: log softmax of ``lam * abar``. ``"weight"``: lambda scales the
    softmax output, so the score is log(lam) + log softmax of ``abar``.
    """
    if lambda_mode == "temperature":
        return spatial_log_weights(abar, lam)
    return math.log(lam) + spatial_log_weights(abar, 1.0)


def winning_lines(saliency_sem: torch.Tensor, saliency_ids: Sequence[torch.Tensor],
                  config: IdAFConfig, regions: Sequence[torch.Tensor | None] | None = None
                  ) -> torch.Tensor:
    """Which line wins each position (eq. 9-10 over a stack of lines).

    saliency_sem: (N, C, H, W); saliency_ids: one (N, C, H, W) per ID line (their absolute
    value is taken here); regions: per ID line a bool (N or 1, 1, H, W) mask of where it may
    compete, or None for everywhere. Returns (N, 1, H, W) int64: 0 where the semantic line
    wins, j where ID line j (1-based) wins. Ties go to the semantic line, then to the
    lowest j.
    """
    count, n = len(saliency_ids), saliency_sem.shape[0]
    stacked = torch.cat([*saliency_ids, saliency_sem], dim=0).abs().float()  # ((J+1)N, C, H, W)
    smoothed = smooth_saliency(stacked, config.smoothing, config.smooth_kernel)
    channel_mean = smoothed.mean(dim=1, keepdim=True)  # ((J+1)N, 1, H, W)
    score_sem = line_log_weights(channel_mean[count * n:], config.lambda_sem, config.lambda_mode)
    best, winner = None, None
    for j in range(count):
        score = line_log_weights(channel_mean[j * n:(j + 1) * n], config.lambda_id,
                                 config.lambda_mode)
        if regions is not None and regions[j] is not None:
            score = torch.where(regions[j], score, -math.inf)
        if best is None:
            best, winner = score, torch.ones_like(score, dtype=torch.long)
        else:  # strictly better: a tie keeps the lower j
            better = score > best
            best, winner = torch.where(better, score, best), torch.where(better, j + 1, winner)
    return torch.where(best > score_sem, winner, 0)


def fuse_lines(eps_sem: torch.Tensor, eps_ids: Sequence[torch.Tensor],
               config: IdAFConfig | None = None, *,
               saliency_sem: torch.Tensor | None = None,
               saliency_ids: Sequence[torch.Tensor] | None = None,
               regions: Sequence[torch.Tensor | None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the semantic line's guided noise with one or more ID lines' (eq. 6-10).

    eps_sem and each of eps_ids: (N, C, H, W) guided noises. saliency_*: the optional
    saliency sources (default: the guided noises, ``saliency="guided"``). regions: see
    ``winning_lines``. Returns ``(eps_fused, winner)``: (N, C, H, W) gathered from the
    winners' signed noises, and the (N, 1, H, W) int64 map of winning lines (0 semantic).
    Inputs are not mutated.
    """
    config = config or IdAFConfig()
    _check_fusion_inputs(eps_sem, eps_ids, saliency_sem, saliency_ids, config)
    if saliency_sem is None:
        saliency_sem, saliency_ids = eps_sem, eps_ids
    winner = winning_lines(saliency_sem, saliency_ids, config, regions)
    fused = eps_sem
    for j, eps_id in enumerate(eps_ids, start=1):
        fused = torch.where(winner == j, eps_id, fused)
    return fused, winner


def _check_fusion_inputs(eps_sem, eps_ids, saliency_sem, saliency_ids, config) -> None:
    if not eps_ids:
        raise ConfigError("fusion needs at least one ID line's noise")
    for eps_id in eps_ids:
        if eps_id.shape != eps_sem.shape:
            raise ConfigError(f"idaf: eps_id {tuple(eps_id.shape)} and eps_sem "
                              f"{tuple(eps_sem.shape)} must have the same (N, C, H, W) shape")
    if eps_sem.ndim != 4:
        raise ConfigError(f"idaf: expected (N, C, H, W) noise, got {eps_sem.ndim} dimensions")
    if (saliency_sem is None) != (saliency_ids is None):
        raise ConfigError("idaf: give both saliency_id and saliency_sem, or neither")
    if saliency_sem is None:
        if config.saliency in ("cfg_delta", "x0"):
            raise ConfigError(f"idaf: saliency={config.saliency!r} needs saliency_id and "
                              "saliency_sem (the scaled guidance responses, or the lines' x0 "
                              "estimates); the DLI loop passes them")
        return
    if any(s.shape != eps_sem.shape for s in (saliency_sem, *saliency_ids)) \
            or len(saliency_ids) != len(eps_ids):
        raise ConfigError("idaf: saliency tensors must have the noise shape "
                          f"{tuple(eps_sem.shape)}, one per line, got "
                          f"{[tuple(s.shape) for s in (*saliency_ids, saliency_sem)]}")


def cfg_delta_saliency(cond: torch.Tensor, reference: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """The ``"cfg_delta"`` saliency source: s * (eps_cond - eps_uncond_sem), (N, C, H, W).

    reference: the semantic line's negative prediction, shared by every line (MagicFusion's
    reading); None without CFG, where the reference is zero.
    """
    if reference is None:
        reference = torch.zeros_like(cond)
    return scale * (cond - reference)


def id_decision_map(
    saliency_id: torch.Tensor, saliency_sem: torch.Tensor, config: IdAFConfig
) -> torch.Tensor:
    """Where the single ID line wins (eq. 9-10). Ties go to the semantic line.

    saliency_id, saliency_sem: (N, C, H, W) raw saliency sources (their absolute value is
    taken here). Returns a bool tensor (N, 1, H, W), True where the ID line wins.
    """
    return winning_lines(saliency_sem, [saliency_id], config) == 1


def idaf(
    eps_id: torch.Tensor,
    eps_sem: torch.Tensor,
    config: IdAFConfig | None = None,
    *,
    saliency_id: torch.Tensor | None = None,
    saliency_sem: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the two lines' guided noises (paper eq. 6-10): ``fuse_lines`` with one ID line.

    eps_id, eps_sem: (N, C, H, W) guided noise of the ID and semantic lines.
    saliency_id, saliency_sem: optional (N, C, H, W) saliency sources; by default the
        guided noises themselves (``saliency="guided"``). ``"cfg_delta"`` needs both given.
    Returns ``(eps_fused, id_wins)``: (N, C, H, W) in the inputs' dtype, gathered from the
    original signed noises; and the bool decision map (N, 1, H, W). Inputs are not mutated.
    """
    if (saliency_id is None) != (saliency_sem is None):
        raise ConfigError("idaf: give both saliency_id and saliency_sem, or neither")
    fused, winner = fuse_lines(
        eps_sem, [eps_id], config, saliency_sem=saliency_sem,
        saliency_ids=None if saliency_id is None else [saliency_id])
    return fused, winner == 1
