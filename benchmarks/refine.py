"""The face-refine setting's report: face similarity before and after the pass, paired.

A ``refine`` setting's image is its call's image after the pass; the same call's image
before it is, bit for bit, the ``full`` setting's image of the same backend, identity,
prompt and seed (``unrefined_images`` equals the call without ``refine_faces``, tested). So
each refine item is paired with its ``full`` item, and the pair's face-size bucket is read
from the image before the pass (the face box height in pixels, the metric's
``face_box_height`` of the image height).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from bf_core.config import effective_steps

#: face-size buckets (face height in pixels), the spec's
BUCKETS = ((0, 48, "<48"), (48, 80, "48-80"), (80, 128, "80-128"), (128, 192, "128-192"),
           (192, math.inf, ">=192"))
BASE_SETTING = "full"
PAIR_KEYS = ("backend", "identity", "prompt_set", "prompt_index", "seed")
TABLE_COLUMNS = ["backend", "setting", "bucket", "n", "mean_delta", "median_delta", "ci_low",
                 "ci_high", "win_rate", "detection_rate", "clip_t"]


def bucket_of(face_px: float) -> str:
    return next(label for low, high, label in BUCKETS if low <= face_px < high)


def bootstrap_ci(deltas: Sequence[float], rounds: int = 1000, seed: int = 0
                 ) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean of ``deltas`` (fixed seed: reproducible)."""
    values = np.asarray(deltas, dtype=np.float64)
    if len(values) < 2:
        return (float(values.mean()),) * 2 if len(values) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (rounds, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def refine_pairs(flat: Sequence[dict[str, Any]], height: int,
                 refine_settings: Sequence[str]) -> list[dict[str, Any]]:
    """One row per refine item with its ``full`` twin: the face size before, the face
    similarity before and after (None after: the face was lost), CLIP-T after."""
    base = {tuple(e[k] for k in PAIR_KEYS): e for e in flat if e["setting"] == BASE_SETTING}
    pairs = []
    for entry in flat:
        if entry["setting"] not in refine_settings:
            continue
        before = base.get(tuple(entry[k] for k in PAIR_KEYS))
        if before is None or before.get("face_sim") is None:
            continue  # no face before the pass: nothing was there to refine
        face_px = (before.get("face_box_height") or 0.0) * height / 100.0
        pairs.append({"backend": entry["backend"], "setting": entry["setting"],
                      "bucket": bucket_of(face_px), "before": before["face_sim"],
                      "after": entry.get("face_sim"), "clip_t": entry.get("clip_t")})
    return pairs


def refine_table(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (backend, setting, bucket), and per (backend, setting) over all buckets ("all"):
    n, mean and median paired delta (after - before; a lost face counts as a failure and
    is left out of the deltas), its 95% bootstrap interval, the win rate (after > before,
    lost faces counting as losses), the detection rate and CLIP-T after."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for pair in pairs:
        groups[(pair["backend"], pair["setting"], pair["bucket"])].append(pair)
        groups[(pair["backend"], pair["setting"], "all")].append(pair)
    order = {label: n for n, (_, _, label) in enumerate(BUCKETS)} | {"all": len(BUCKETS)}
    rows = []
    for (backend, setting, bucket), members in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        found = [p for p in members if p["after"] is not None]
        deltas = [p["after"] - p["before"] for p in found]
        low, high = bootstrap_ci(deltas)
        clip = [p["clip_t"] for p in members if p["clip_t"] is not None]
        rows.append({
            "backend": backend, "setting": setting, "bucket": bucket, "n": len(members),
            "mean_delta": float(np.mean(deltas)) if deltas else None,
            "median_delta": float(np.median(deltas)) if deltas else None,
            "ci_low": low if deltas else None, "ci_high": high if deltas else None,
            "win_rate": 100.0 * sum(d > 0 for d in deltas) / len(members),
            "detection_rate": 100.0 * len(found) / len(members),
            "clip_t": float(np.mean(clip)) if clip else None})
    return rows


def pass_schedules(settings: Sequence[Any], main_steps: int) -> dict[str, tuple[int, int, str]]:
    """Per refine setting, the pass it runs after a main call of ``main_steps`` steps:
    (pass steps, effective steps, identity "on"/"off"), by ``RefineConfig.steps``."""
    schedules = {}
    for setting in settings:
        refine = setting.config.refine
        steps, strength = refine.steps(main_steps)
        schedules[setting.name] = (steps, effective_steps(steps, strength), refine.identity)
    return schedules


def same_pass_groups(schedules: dict[str, tuple[int, int, str]]) -> list[list[str]]:
    """The settings that run one and the same pass, in groups of two or more: a strength
    sweep after a few-step main call collapses, since the pass keeps the call's steps and
    raises the strength to at least ``min_effective_steps``."""
    groups: dict[tuple[int, int, str], list[str]] = defaultdict(list)
    for name, schedule in schedules.items():
        groups[schedule].append(name)
    return [names for names in groups.values() if len(names) > 1]
