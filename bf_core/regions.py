"""Where each person's ID line may compete: a region on the latent grid.

A region is given as a box ``(x0, y0, x1, y1)`` in fractions of the image, or as a mask
(PIL image, array or tensor of any size: resized to the latent grid, threshold 0.5), or
None for the whole frame, or ``"auto"``: found from the faces in the semantic line's
preview at step M1 (``auto_regions``). A latent cell belongs to a box when its centre lies
inside it, so a box never depends on how the image size rounds to the grid.

Regions found per image (``"auto"``) are ``PerImage``: one box or ``Band`` per output image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bf_core.errors import ConfigError, RegionNotFoundError

logger = logging.getLogger(__name__)

#: the threshold a resized mask is cut at
MASK_THRESHOLD = 0.5
AUTO = "auto"
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Band:
    """A full-height vertical band made of x-intervals (fractions of the width): the
    ``"bands"`` fallback's share of the free width, which may skip other people's boxes."""

    intervals: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class PerImage:
    """A region found separately for each output image: one box or ``Band`` per image."""

    regions: tuple[Box | Band, ...]


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
                              "(x0, y0, x1, y1) in fractions of the image, a mask, 'auto' "
                              "or None")
        return
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


def band_mask(band: Band, height: int, width: int) -> torch.Tensor:
    """(height, width) bool: the cells whose centre x lies in one of the band's intervals."""
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    cols = torch.zeros(width, dtype=torch.bool)
    for x0, x1 in band.intervals:
        cols |= (xs >= x0) & (xs < x1)
    return cols[None, :].expand(height, width).clone()


def grid_mask(region: Any, height: int, width: int) -> torch.Tensor:
    """One region (box, ``Band`` or mask) as a (height, width) bool grid."""
    if isinstance(region, Band):
        return band_mask(region, height, width)
    return box_mask(region, height, width) if _is_box(region) else resized_mask(region, height,
                                                                                width)


def latent_regions(regions: Sequence[Any], height: int, width: int
                   ) -> list[torch.Tensor | None] | None:
    """Each person's region on the (height, width) latent grid as a (1, 1, h, w) bool mask,
    or (R, 1, h, w) for a ``PerImage`` region, None for the whole frame; None overall when
    every region is the whole frame (then the fusion is the paper's, bit for bit)."""
    if all(region is None for region in regions):
        return None
    masks: list[torch.Tensor | None] = []
    for index, region in enumerate(regions):
        if region is None:
            masks.append(None)
            continue
        if isinstance(region, str):  # "auto" before the preview: nothing has been found yet
            raise ConfigError(f"person {index}: region='auto' is found at step M1; it has no "
                              "grid before that")
        per_image = region.regions if isinstance(region, PerImage) else (region,)
        grid = torch.stack([grid_mask(one, height, width) for one in per_image])
        if not grid.flatten(1).any(1).all():
            raise ConfigError(f"person {index}: the region covers no cell of the {height} x "
                              f"{width} latent grid; give a larger box or mask")
        masks.append(grid[:, None])
    return masks


# -- "auto": regions from the faces in the preview ------------------------------------------------
def face_region(face_box: Sequence[float], image_size: tuple[int, int], scale: float) -> Box:
    """A face box (x0, y0, x1, y1) in pixels of an image of ``image_size`` (width, height),
    scaled by ``scale`` about its centre and clipped to the frame, in fractions."""
    width, height = image_size
    x0, y0, x1, y1 = (float(v) for v in face_box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    return (max(0.0, (cx - half_w) / width), max(0.0, (cy - half_h) / height),
            min(1.0, (cx + half_w) / width), min(1.0, (cy + half_h) / height))


def box_area(box: Sequence[float]) -> float:
    """(x1 - x0) * (y1 - y0) of a box (x0, y0, x1, y1): the key of "the largest face"."""
    return (float(box[2]) - float(box[0])) * (float(box[3]) - float(box[1]))


def faces_left_to_right(face_boxes: Sequence[Sequence[float]], count: int) -> list[Sequence[float]]:
    """The ``count`` largest boxes (x0, y0, x1, y1), ordered by their centre's x."""
    chosen = sorted(face_boxes, key=box_area, reverse=True)[:count]
    return sorted(chosen, key=lambda b: (float(b[0]) + float(b[2])) / 2)


def free_intervals(taken: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of [0, 1] that no interval of ``taken`` covers; the whole width when the
    taken intervals cover it all (bands then share the frame)."""
    free, start = [], 0.0
    for x0, x1 in sorted(taken):
        if x0 > start:
            free.append((start, x0))
        start = max(start, x1)
    if start < 1.0:
        free.append((start, 1.0))
    return free or [(0.0, 1.0)]


def equal_bands(free: Sequence[tuple[float, float]], count: int) -> list[Band]:
    """Split the free width (sorted disjoint x-intervals) into ``count`` bands of equal total
    width, left to right; a band may span a gap."""
    total = sum(x1 - x0 for x0, x1 in free)
    bands = []
    for k in range(count):
        lo, hi = total * k / count, total * (k + 1) / count
        pieces, offset = [], 0.0
        for x0, x1 in free:
            end = offset + x1 - x0
            a, b = max(lo, offset), min(hi, end)
            if b > a:  # interval ends stay exact where the band takes them whole
                pieces.append((x0 if a == offset else x0 + a - offset,
                               x1 if b == end else x0 + b - offset))
            offset = end
        bands.append(Band(tuple(pieces)))
    return bands


def taken_x_intervals(regions: Sequence[Any]) -> list[tuple[float, float]]:
    """The x-extent of every given box (the regions that are not ``"auto"``): what the
    ``"bands"`` fallback leaves to their persons. Masks and the whole frame take nothing."""
    return [(float(r[0]), float(r[2])) for r in regions if _is_box(r)]


def auto_regions(regions: Sequence[Any], faces_per_image: Sequence[Sequence[Sequence[float]]] | None,
                 image_size: tuple[int, int], scale: float, fallback: str, step: int
                 ) -> tuple[list[Any], list[list[Box | None]]]:
    """Resolve every ``"auto"`` region from the faces found in each preview image.

    regions: each person's region as given; faces_per_image: per output image the face
    boxes (x0, y0, x1, y1) in pixels of the preview (None: no preview was possible).
    Per image, the largest faces, as many as there are ``"auto"`` persons, are ordered left
    to right and given to those persons in the order they were given; each region is the
    face box scaled by ``scale``. With too few faces, ``fallback`` decides: ``"bands"``
    splits the free width into equal vertical bands (warning), ``"error"`` raises
    ``RegionNotFoundError``. Returns (the regions with each ``"auto"`` one a ``PerImage``,
    per image per person the face box used or None).
    """
    wanted = [j for j, region in enumerate(regions) if isinstance(region, str)]
    if not wanted:
        return list(regions), []
    images = faces_per_image if faces_per_image is not None else [None]
    per_person: list[list[Any]] = [[] for _ in wanted]
    used: list[list[Box | None]] = []
    for index, faces in enumerate(images):
        chosen = faces_left_to_right(faces or [], len(wanted))
        if len(chosen) < len(wanted):
            shares = _fallback(regions, len(chosen), len(wanted), fallback, step, index,
                               faces is None)
            used.append([None] * len(regions))
        else:
            shares = [face_region(box, image_size, scale) for box in chosen]
            used.append([None] * len(regions))
            for j, box in zip(wanted, chosen, strict=True):
                used[-1][j] = tuple(float(v) for v in box)
        for slot, share in zip(per_person, shares, strict=True):
            slot.append(share)
    resolved = list(regions)
    for j, per_image in zip(wanted, per_person, strict=True):
        resolved[j] = PerImage(tuple(per_image))
    return resolved, used


def _fallback(regions: Sequence[Any], found: int, needed: int, fallback: str, step: int,
              image: int, no_preview: bool) -> list[Band]:
    where = (f"no preview of step {step} could be made (the scheduler gives no x0 estimate)"
             if no_preview else f"{found} face(s) found in the step-{step} preview of image "
             f"{image}, {needed} needed")
    if fallback == "error":
        raise RegionNotFoundError(f"region='auto': {where}. Give those people boxes (x0, y0, "
                                  "x1, y1), or BFConfig(auto_region_fallback='bands')")
    logger.warning("region='auto': %s; the free width is split into %d equal vertical bands.",
                   where, needed)
    return equal_bands(free_intervals(taken_x_intervals(regions)), needed)


def region_bounds(region: Any, image: int) -> Box:
    """The bounding box (fractions) of ``region`` for output image ``image``: a box itself,
    a band's x-extent at full height, a mask's cells on a 256 x 256 resize."""
    if isinstance(region, PerImage):
        region = region.regions[image]
    if isinstance(region, Band):
        return (min(a for a, _ in region.intervals), 0.0,
                max(b for _, b in region.intervals), 1.0)
    if _is_box(region):
        return tuple(float(v) for v in region)
    rows, cols = torch.nonzero(resized_mask(region, 256, 256), as_tuple=True)
    if rows.numel() == 0:
        return (0.0, 0.0, 1.0, 1.0)
    return (cols.min().item() / 256, rows.min().item() / 256, (cols.max().item() + 1) / 256,
            (rows.max().item() + 1) / 256)


def region_contains(region: Any, x: float, y: float, image: int) -> bool:
    """Whether the point (x, y) (fractions of the frame) lies in ``region`` for output image
    ``image``; None is the whole frame. A mask is read at the point's cell of a 256 x 256
    resize."""
    if region is None:
        return True
    if isinstance(region, PerImage):
        region = region.regions[image]
    if isinstance(region, Band):
        return any(x0 <= x < x1 for x0, x1 in region.intervals)
    if _is_box(region):
        x0, y0, x1, y1 = region
        return x0 <= x < x1 and y0 <= y < y1
    grid = resized_mask(region, 256, 256)
    return bool(grid[min(int(y * 256), 255), min(int(x * 256), 255)])


def person_face_boxes(regions: Sequence[Any], faces_per_image: Sequence[Sequence[Sequence[float]]],
                      used: Sequence[Sequence[Box | None]], image_size: tuple[int, int]
                      ) -> list[list[Box | None]]:
    """Per image, per person: the face (x0, y0, x1, y1 pixels) that person is drawn at: the
    face its ``"auto"`` region was found around, else the largest face whose centre lies in
    its region (the whole frame for None), else None.

    regions: the regions in use (``"auto"`` ones resolved); used: ``auto_regions``' record,
    or empty when no region was ``"auto"``.
    """
    width, height = image_size
    boxes: list[list[Box | None]] = []
    for image, faces in enumerate(faces_per_image):
        by_size = sorted(faces, key=box_area, reverse=True)
        row: list[Box | None] = []
        for j, region in enumerate(regions):
            found = used[image][j] if used else None
            if found is None:
                found = next((tuple(float(v) for v in b) for b in by_size if region_contains(
                    region, (float(b[0]) + float(b[2])) / 2 / width,
                    (float(b[1]) + float(b[3])) / 2 / height, image)), None)
            row.append(found)
        boxes.append(row)
    return boxes
