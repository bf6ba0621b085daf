"""Where each person's ID line may compete: a region on the latent grid.

A region is given as a box ``(x0, y0, x1, y1)`` in fractions of the image, or as a mask
(PIL image, array or tensor of any size: resized to the latent grid, threshold 0.5), or
None for the whole frame. A latent cell belongs to a box when its centre lies inside it, so
a box never depends on how the image size rounds to the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bf_core.errors import ConfigError

#: the threshold a resized mask is cut at
MASK_THRESHOLD = 0.5
AUTO = "auto"


def _is_box(region: Any) -> bool:
    return isinstance(region, (tuple, list)) and len(region) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in region)


def check_region(region: Any, index: int) -> None:
    """Refuse a region that is none of a box, a mask, ``"auto"`` or None, naming person ``index``."""
    if region is None or isinstance(region, (np.ndarray, torch.Tensor)) or _is_pil(region):
        return
    if isinstance(region, str):
        if region != AUTO:
            raise ConfigError(f"person {index}: region {region!r} is unknown; give a box "
                              "(x0, y0, x1, y1) in fractions of the image, a mask, or None")
        raise ConfigError(f"person {index}: region='auto' (regions found from faces in the "
                          "semantic line's preview) is not available in this version; give a "
                          "box (x0, y0, x1, y1) in fractions of the image or a mask")
    if not _is_box(region):
        raise ConfigError(f"person {index}: a region is a box (x0, y0, x1, y1) of 4 numbers in "
                          f"fractions of the image, a mask (PIL image, array, tensor) or None; "
                          f"got {region!r:.60}")
    x0, y0, x1, y1 = region
    if not all(math.isfinite(v) for v in region) or not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ConfigError(f"person {index}: box {tuple(region)} must have 0 <= x0 < x1 <= 1 and "
                          "0 <= y0 < y1 <= 1 (fractions of the image width and height)")


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


def box_mask(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """(height, width) bool: the cells whose centre lies in ``box`` (fractions, x0 y0 x1 y1)."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    rows = (ys >= y0) & (ys < y1)
    cols = (xs >= x0) & (xs < x1)
    return rows[:, None] & cols[None, :]


def resized_mask(mask: Any, height: int, width: int) -> torch.Tensor:
    """A mask of any size (PIL, array or tensor; values in [0, 1] or 0/255) as a
    (height, width) bool grid: bilinear resize, then the threshold 0.5."""
    if _is_pil(mask):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    values = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    values = values.detach().to("cpu", torch.float32).squeeze()
    if values.ndim == 3 and values.shape[-1] in (3, 4):  # an RGB(A) array: its mean
        values = values[..., :3].mean(-1)
    if values.ndim != 2:
        raise ConfigError(f"a region mask must be 2-D (H, W), got shape {tuple(values.shape)}")
    if values.numel() and values.max() > 1:
        values = values / 255.0
    grid = F.interpolate(values[None, None], size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0]
    return grid >= MASK_THRESHOLD


def latent_regions(regions: Sequence[Any], height: int, width: int
                   ) -> list[torch.Tensor | None] | None:
    """Each person's region on the (height, width) latent grid as a (1, 1, h, w) bool mask,
    None for the whole frame; None overall when every region is the whole frame (then the
    fusion is the paper's, bit for bit)."""
    if all(region is None for region in regions):
        return None
    masks: list[torch.Tensor | None] = []
    for index, region in enumerate(regions):
        if region is None:
            masks.append(None)
            continue
        grid = (box_mask(region, height, width) if _is_box(region)
                else resized_mask(region, height, width))
        if not grid.any():
            raise ConfigError(f"person {index}: the region covers no cell of the {height} x "
                              f"{width} latent grid; give a larger box or mask")
        masks.append(grid[None, None])
    return masks
