"""InstantID keypoint images and the keypoint geometry of the full-body extension.

``draw_kps`` reproduces the official drawing pixel for pixel without OpenCV: the official
code rasterises with OpenCV (``ellipse2Poly`` + ``fillConvexPoly`` for the limbs, a filled
``circle`` for the joints), so the three integer rasterisers are re-implemented here from
their documented semantics (integer ellipse polygon from a one-degree sine table,
8-connected outline plus 16.16 fixed-point scanline fill, midpoint filled circle).

Keypoint order is insightface's: 0 eye (image left), 1 eye (image right), 2 nose,
3 mouth corner (image left), 4 mouth corner (image right). Coordinates are (x, y) pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # drawn in this order, coloured by the first index
LIMB_HALF_WIDTH = 4
JOINT_RADIUS = 10
LIMB_DIMMING = 0.6

_XY_SHIFT = 16
_XY_ONE = 1 << _XY_SHIFT
# The rasteriser's sine table: sin of whole degrees 0..450 printed to 7 decimals, as float32.
_SIN_TABLE = np.array([float(f"{math.sin(math.radians(d)):.7f}") for d in range(451)],
                      dtype=np.float32)


# --------------------------------------------------------------------------- rasterisers


def ellipse_polygon(center: tuple[int, int], axes: tuple[int, int], angle: int) -> np.ndarray:
    """Integer polygon (P, 2) of a full ellipse sampled every degree (OpenCV semantics).

    Points are rounded half to even, consecutive duplicates dropped; a polygon that
    collapses to one point becomes two copies of the centre.
    """
    angle %= 360
    cos_a, sin_a = float(_SIN_TABLE[450 - angle]), float(_SIN_TABLE[angle])
    points: list[tuple[int, int]] = []
    for degree in range(361):
        x = axes[0] * float(_SIN_TABLE[450 - degree])
        y = axes[1] * float(_SIN_TABLE[degree])
        point = (int(np.rint(center[0] + x * cos_a - y * sin_a)),
                 int(np.rint(center[1] + x * sin_a + y * cos_a)))
        if not points or point != points[-1]:
            points.append(point)
    if len(points) == 1:
        points = [tuple(center), tuple(center)]
    return np.array(points, dtype=np.int64)


def _clip_segment(width: int, height: int, p1: list[int], p2: list[int]) -> bool:
    """Clip the segment to the canvas in place (OpenCV's integer clipLine); False if outside."""
    right, bottom = width - 1, height - 1

    def code(p: list[int], with_y: bool = True) -> int:
        c = (p[0] < 0) + (p[0] > right) * 2
        return c + ((p[1] < 0) * 4 + (p[1] > bottom) * 8 if with_y else 0)

    c1, c2 = code(p1), code(p2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            p1[0] += int((a - p1[1]) * (p2[0] - p1[0]) / (p2[1] - p1[1]))
            p1[1], c1 = a, code(p1, with_y=False)
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            p2[0] += int((a - p2[1]) * (p2[0] - p1[0]) / (p2[1] - p1[1]))
            p2[1], c2 = a, code(p2, with_y=False)
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                p1[1] += int((a - p1[0]) * (p2[1] - p1[1]) / (p2[0] - p1[0]))
                p1[0], c1 = a, 0
            if c2:
                a = 0 if c2 == 1 else right
                p2[1] += int((a - p2[0]) * (p2[1] - p1[1]) / (p2[0] - p1[0]))
                p2[0], c2 = a, 0
    return (c1 | c2) == 0


def _draw_segment(canvas: np.ndarray, start, end, color) -> None:
    """8-connected Bresenham segment, always walked left to right (OpenCV ``line``)."""
    height, width = canvas.shape[:2]
    p1, p2 = [int(start[0]), int(start[1])], [int(end[0]), int(end[1])]
    outside = not (0 <= p1[0] < width and 0 <= p2[0] < width
                   and 0 <= p1[1] < height and 0 <= p2[1] < height)
    if outside and not _clip_segment(width, height, p1, p2):
        return
    if p2[0] < p1[0]:
        p1, p2 = p2, p1
    dx, dy = p2[0] - p1[0], p2[1] - p1[1]
    step_x, step_y = 1, 1
    if dy < 0:
        dy, step_y = -dy, -1
    steep = dy > dx
    if steep:
        dx, dy = dy, dx
    err = dx - 2 * dy
    x, y = p1
    for _ in range(dx + 1):
        canvas[y, x] = color
        minor = err < 0
        err += -2 * dy + (2 * dx if minor else 0)
        if steep:
            y += step_y
            x += step_x if minor else 0
        else:
            x += step_x
            y += step_y if minor else 0


def _ctrunc_div(a: int, b: int) -> int:
    """Integer division rounding toward zero, as C does."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def fill_convex_polygon(canvas: np.ndarray, polygon: np.ndarray, color) -> None:
    """Fill a convex integer polygon (P, 2) in place, 8-connected, no anti-aliasing.

    OpenCV ``fillConvexPoly`` semantics: the outline is drawn with 8-connected segments,
    then the interior is filled scanline by scanline with two edges walked in 16.16 fixed
    point, each span rounded to the nearest pixel at both ends.
    """
    height, width = canvas.shape[:2]
    pts = [(int(x), int(y)) for x, y in polygon]
    count = len(pts)
    previous = pts[-1]
    for point in pts:
        _draw_segment(canvas, previous, point, color)
        previous = point
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    top = min(range(count), key=lambda i: (ys[i], i))
    ymin, ymax = ys[top], min(max(ys), height - 1)
    if count < 3 or max(xs) < 0 or max(ys) < 0 or min(xs) >= width or ymin >= height:
        return
    half = _XY_ONE >> 1
    edges = [{"idx": top, "di": 1, "x": -_XY_ONE, "dx": 0, "ye": ymin},
             {"idx": top, "di": count - 1, "x": -_XY_ONE, "dx": 0, "ye": ymin}]
    budget = count  # each polygon vertex is consumed once by one of the two edges
    y = ymin
    while True:
        for edge in edges:
            if y < edge["ye"]:
                continue
            idx0 = edge["idx"]
            idx = (idx0 + edge["di"]) % count
            while budget > 0:
                budget -= 1
                ty = pts[idx][1]
                if ty > y:
                    xs0, xe = pts[idx0][0] << _XY_SHIFT, pts[idx][0] << _XY_SHIFT
                    edge.update(ye=ty, x=xs0, idx=idx,
                                dx=_ctrunc_div((xe - xs0) * 2 + (ty - y), 2 * (ty - y)))
                    break
                idx0, idx = idx, (idx + edge["di"]) % count
            else:
                budget = -1
        if budget < 0:
            break
        if y >= 0:
            left, right = (edges[1], edges[0]) if edges[0]["x"] > edges[1]["x"] else edges
            x1, x2 = (left["x"] + half) >> _XY_SHIFT, (right["x"] + half) >> _XY_SHIFT
            if x2 >= 0 and x1 < width:
                canvas[y, max(x1, 0):min(x2, width - 1) + 1] = color
        for edge in edges:
            edge["x"] += edge["dx"]
        y += 1
        if y > ymax:
            break


def fill_circle(canvas: np.ndarray, center: tuple[int, int], radius: int, color) -> None:
    """Filled circle in place: rows of the integer midpoint circle (OpenCV ``circle``, -1)."""
    height, width = canvas.shape[:2]
    cx, cy = center
    err, dx, dy, plus, minus = 0, radius, 0, 1, 2 * radius - 1
    while dx >= dy:
        for row, half_span in ((cy - dy, dx), (cy + dy, dx), (cy - dx, dy), (cy + dx, dy)):
            x1, x2 = max(cx - half_span, 0), min(cx + half_span, width - 1)
            if 0 <= row < height and x1 <= x2:
                canvas[row, x1:x2 + 1] = color
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2


# --------------------------------------------------------------------------- drawing


def draw_kps_array(image_size: tuple[int, int], kps, *, limb_half_width: int = LIMB_HALF_WIDTH,
                   joint_radius: int = JOINT_RADIUS) -> np.ndarray:
    """The InstantID keypoint drawing as an (H, W, 3) uint8 RGB array.

    ``image_size`` is (width, height) of the image the keypoints were detected in; ``kps``
    is (5, 2) (x, y). Arithmetic keeps the keypoints' own dtype (float32 or float64), like
    the official numpy code, so truncations land on the same integers.
    """
    width, height = image_size
    kps = np.asarray(kps)
    if kps.shape != (5, 2):
        raise ValueError(f"keypoints must have shape (5, 2) (x, y per point), got {kps.shape}.")
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for first, second in LIMBS:
        x, y = kps[[first, second], 0], kps[[first, second], 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = ellipse_polygon((int(np.mean(x)), int(np.mean(y))),
                                  (int(length / 2), limb_half_width), int(angle))
        fill_convex_polygon(canvas, polygon, KEYPOINT_COLORS[first])
    canvas = (canvas * LIMB_DIMMING).astype(np.uint8)
    for index, (x, y) in enumerate(kps):
        fill_circle(canvas, (int(x), int(y)), joint_radius, KEYPOINT_COLORS[index])
    return canvas


def draw_kps(image_size: tuple[int, int], kps, **kwargs):
    """The InstantID keypoint drawing as a PIL RGB image of ``image_size`` (width, height)."""
    from PIL import Image

    return Image.fromarray(draw_kps_array(image_size, kps, **kwargs))  # (H, W, 3) uint8 -> RGB


# --------------------------------------------------------------------------- geometry


def similarity_matrix(scale: float, angle_degrees: float = 0.0,
                      translation: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """(2, 3) matrix of p -> scale * R(angle) p + translation (angle counter-clockwise in x, y)."""
    theta = math.radians(angle_degrees)
    c, s = scale * math.cos(theta), scale * math.sin(theta)
    return np.array([[c, -s, translation[0]], [s, c, translation[1]]], dtype=np.float64)


def apply_similarity(matrix: np.ndarray, points) -> np.ndarray:
    """Apply a (2, 3) matrix to (K, 2) points; returns (K, 2) float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def estimate_similarity(source, target) -> np.ndarray:
    """Least-squares similarity (no reflection) taking (K, 2) ``source`` onto (K, 2) ``target``.

    Umeyama's closed form; exact when the point sets are similar. Returns (2, 3).
    """
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    variance = (src_c**2).sum() / len(src)
    if variance == 0:
        raise ValueError("source points all coincide; a similarity transform is undefined.")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / variance
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def box_to_box_similarity(source_box: Sequence[float], target_box: Sequence[float]) -> np.ndarray:
    """(2, 3) uniform scale + translation putting ``source_box`` centred inside ``target_box``.

    Boxes are (x0, y0, x1, y1). The scale is the largest that keeps the source box inside
    the target box, so the face keeps its aspect ratio.
    """
    sx0, sy0, sx1, sy1 = map(float, source_box)
    tx0, ty0, tx1, ty1 = map(float, target_box)
    if min(sx1 - sx0, sy1 - sy0, tx1 - tx0, ty1 - ty0) <= 0:
        raise ValueError(f"boxes must have positive width and height, got {source_box} and "
                         f"{target_box} as (x0, y0, x1, y1).")
    scale = min((tx1 - tx0) / (sx1 - sx0), (ty1 - ty0) / (sy1 - sy0))
    source_centre = np.array([(sx0 + sx1) / 2, (sy0 + sy1) / 2])
    target_centre = np.array([(tx0 + tx1) / 2, (ty0 + ty1) / 2])
    return similarity_matrix(scale, 0.0, target_centre - scale * source_centre)


def keypoints_into_box(kps, target_box: Sequence[float],
                       source_box: Sequence[float] | None = None) -> np.ndarray:
    """Move (5, 2) reference keypoints so their face box fits centred in ``target_box``.

    ``source_box`` is the reference face's box (x0, y0, x1, y1), e.g. the detector's bbox;
    by default the keypoints' own bounding box. Returns (5, 2) float64; angles and distance
    ratios between the keypoints are preserved.
    """
    kps = np.asarray(kps, dtype=np.float64)
    if source_box is None:
        source_box = (*kps.min(0), *kps.max(0))
    return apply_similarity(box_to_box_similarity(source_box, target_box), kps)
