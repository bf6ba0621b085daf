"""The report: the paper's Table 1 layout with the paper's numbers beside ours, the ablation
table, close-up and speed tables (markdown + CSV), plots, contact sheets, fusion strips.

One CSV/JSON schema: ``items.csv`` has one row per image (``ITEM_KEYS`` + image stats +
metric columns); ``table1.csv`` one row per scenario (backend, setting) with
``<column>`` and ``<column>_paper``; ``speed.csv`` the timing and memory per scenario
(the only numbers that differ between runs); ``summary.json`` all tables as lists.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.storage import atomic_write_bytes, atomic_write_image, atomic_write_json, load_array

ITEM_KEYS = ("backend", "setting", "identity", "prompt_set", "prompt_index", "seed")
PAPER_COLUMNS = ("face_sim", "dino", "clip_i", "clip_t", "fid")
CLOSEUP_COLUMNS = ("face_detected", "face_area_fraction", "face_box_height", "id_region_final")
SPEED_COLUMNS = ("seconds_per_image", "unet_evals_per_image", "peak_memory_mb")
LABELS = {"face_sim": "Face sim", "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T",
          "fid": "FID", "face_detected": "Face found %", "face_area_fraction": "Face area %",
          "face_box_height": "Face height %", "id_region_final": "ID region %",
          "seconds_per_image": "s / image", "unet_evals_per_image": "UNet evals / image",
          "peak_memory_mb": "peak MB"}
#: which prompt set each paper column is averaged over (the paper's protocol)
COLUMN_PROMPT_SET = {"face_sim": "expression"}
DEFAULT_PROMPT_SET = "action"

#: the paper's Table 1 (percent; FID lower is better)
PAPER_TABLE1 = {
    "PuLID": {"face_sim": 57.07, "dino": 47.14, "clip_i": 52.94, "clip_t": 32.33, "fid": 134.03},
    "InstantID": {"face_sim": 54.68, "dino": 51.93, "clip_i": 54.18, "clip_t": 27.21, "fid": 127.80},
    "IP-Adapter + PhotoMaker": {"face_sim": 58.10, "dino": 47.79, "clip_i": 79.28, "clip_t": 28.72,
                                "fid": 211.68},
    "PhotoMaker V2 (baseline)": {"face_sim": 52.01, "dino": 46.46, "clip_i": 62.09, "clip_t": 28.46,
                                 "fid": 117.90},
    "BeyondFacial (PhotoMaker V2)": {"face_sim": 58.67, "dino": 51.24, "clip_i": 64.87,
                                     "clip_t": 31.47, "fid": 54.62},
}
#: the paper's Table 2 (ablation on PhotoMaker V2)
PAPER_TABLE2 = {"no_idaf": {"face_sim": 36.34, "dino": 45.58},
                "no_idap": {"face_sim": 54.17, "dino": 37.37},
                "full": {"face_sim": 58.67, "dino": 51.24}}
#: our scenario -> the paper's row it reproduces
PAPER_ROW = {("photomaker", "baseline"): "PhotoMaker V2 (baseline)",
             ("photomaker", "full"): "BeyondFacial (PhotoMaker V2)",
             ("pulid", "baseline"): "PuLID", ("instantid", "baseline"): "InstantID"}


def _mean(values) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else None


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def item_rows(runner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of flat item dicts for the CSV, the runner's raw rows)."""
    raw = runner.collect_rows()
    flat = []
    for row in raw:
        item, image = row["item"], row["image"]
        entry = {key: getattr(item, key) for key in ITEM_KEYS}
        entry["image"] = image.get("files", {}).get("image", {}).get("path")
        entry["model_rows"] = image.get("model_rows")
        entry["id_region_final"] = image.get("id_region_final")
        entry["seconds"] = image.get("seconds")
        entry["peak_memory_mb"] = image.get("peak_memory_mb")
        entry.update(row["values"])
        flat.append(entry)
    return flat, raw


def metric_columns(runner) -> list[str]:
    columns = []
    for metric in runner.metric_list:
        columns += [c for c in metric.columns if c not in columns]
    return columns


def scenario_table(runner, flat, raw) -> list[dict[str, Any]]:
    """One row per (backend, setting): each column averaged over its prompt set, FID per set."""
    prompt_sets = {p.name for p in runner.spec.prompt_sets}
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, entry in enumerate(flat):
        if entry["setting"] != "reference":
            groups[(entry["backend"], entry["setting"])].append(index)
    set_columns = {c for m in runner.metric_list if m.kind == "set" for c in m.columns}
    image_columns = [c for c in metric_columns(runner) if c not in set_columns]
    set_metrics = [m for m in runner.metric_list if m.kind == "set"]
    references = {m.name: runner.reference_features(m, raw) for m in set_metrics}
    table = []
    for (backend, setting), indices in groups.items():
        row: dict[str, Any] = {"backend": backend, "setting": setting, "images": len(indices)}
        for column in image_columns + ["id_region_final"]:
            wanted = COLUMN_PROMPT_SET.get(column, DEFAULT_PROMPT_SET)
            chosen = [i for i in indices if flat[i]["prompt_set"] == wanted] \
                if wanted in prompt_sets else indices
            row[column] = _mean(flat[i].get(column) for i in chosen)
        for metric in set_metrics:
            chosen = [i for i in indices if flat[i]["prompt_set"] == DEFAULT_PROMPT_SET] \
                if DEFAULT_PROMPT_SET in prompt_sets else indices
            features = [load_array(runner.out / raw[i]["features"][metric.name]) for i in chosen
                        if metric.name in raw[i]["features"]]
            generated = np.stack(features) if features else np.zeros((0, 1))
            row.update(metric.score_set(generated, references[metric.name]))
        row["unet_evals_per_image"] = _mean(flat[i]["model_rows"] for i in indices)
        row["seconds_per_image"] = _mean(flat[i]["seconds"] for i in indices)
        row["peak_memory_mb"] = max((flat[i]["peak_memory_mb"] or 0.0 for i in indices), default=None)
        paper = PAPER_TABLE1.get(PAPER_ROW.get((backend, setting), ""), {})
        for column in PAPER_COLUMNS:
            row[f"{column}_paper"] = paper.get(column)
        table.append(row)
    order = {s.name: n for n, s in enumerate(runner.spec.settings)}
    return sorted(table, key=lambda r: (r["backend"], order.get(r["setting"], 99)))


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(c)) for c in columns])
    atomic_write_bytes(path, buffer.getvalue().encode())


def _markdown_table(rows: list[dict[str, Any]], columns: list[str], headers: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _label(runner, column: str) -> str:
    for metric in runner.metric_list:
        if column in getattr(metric, "labels", {}):
            return metric.labels[column]
    return LABELS.get(column, column)


def quality_columns(runner) -> list[str]:
    present = set(metric_columns(runner))
    paper = [c for c in PAPER_COLUMNS if c in present]
    closeup = [c for c in CLOSEUP_COLUMNS if c in present or c == "id_region_final"]
    extra = [c for c in metric_columns(runner) if c not in paper and c not in closeup]
    return paper + closeup + extra


def write_plots(runner, table, columns, folder: Path) -> list[Path]:
    """One bar chart per column: value against setting, one bar group per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s.name for s in runner.spec.settings]
    backends = sorted({r["backend"] for r in table})
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for column in columns:
        figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(settings), 3.2))
        width = 0.8 / max(1, len(backends))
        for k, backend in enumerate(backends):
            values = [next((r.get(column) for r in table
                            if r["backend"] == backend and r["setting"] == s), None) for s in settings]
            positions = np.arange(len(settings)) + k * width
            axis.bar(positions, [v if v is not None else 0.0 for v in values], width, label=backend)
        axis.set_xticks(np.arange(len(settings)) + width * (len(backends) - 1) / 2)
        axis.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(_label(runner, column))
        axis.set_title(f"{_label(runner, column)} by setting")
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = folder / f"{column}.png"
        tmp = path.with_name(path.name + ".partial.png")
        figure.savefig(tmp, dpi=100)
        plt.close(figure)
        tmp.replace(path)
        written.append(path)
    return written


def write_contact_sheets(runner, flat, folder: Path) -> list[Path]:
    """Per backend, identity and seed: rows = prompts, columns = settings (baseline first)."""
    from PIL import Image

    from bf_core.visualize import contact_sheet

    settings = [s.name for s in runner.spec.settings]
    seeds = list(runner.spec.seeds)[:runner.spec.contact_sheet_seeds]
    by_key = {(e["backend"], e["setting"], e["identity"], e["prompt_set"], e["prompt_index"],
               e["seed"]): e for e in flat if e["image"]}
    written = []
    cell = max(128, min(256, runner.spec.params.width))
    for backend in sorted({e["backend"] for e in flat if e["setting"] != "reference"}):
        for identity in runner.spec.identities:
            for seed in seeds:
                images, labels = [], []
                for prompt_set in runner.spec.prompt_sets:
                    for index in range(len(prompt_set.prompts)):
                        for setting in settings:
                            entry = by_key.get((backend, setting, identity.name, prompt_set.name,
                                                index, seed))
                            if entry is None:
                                images.append(Image.new("RGB", (cell, cell)))
                            else:
                                with Image.open(runner.out / entry["image"]) as handle:
                                    images.append(handle.convert("RGB"))
                            labels.append(f"{setting} {prompt_set.name}-{index:02d}")
                sheet = contact_sheet(images, labels, columns=len(settings), cell=cell)
                path = folder / f"{backend}__{identity.name}__s{seed}.png"
                atomic_write_image(path, sheet)
                written.append(path)
    return written


def write_fusion_sheets(runner, raw, folder: Path) -> list[Path]:
    """Per backend, setting, identity (first seed): the fusion strips of every prompt, stacked."""
    from PIL import Image

    groups: dict[tuple, list[Path]] = defaultdict(list)
    first_seed = runner.spec.seeds[0]
    for row in raw:
        item, files = row["item"], row["image"].get("files", {})
        if "fusion_strip" in files and item.seed == first_seed:
            groups[(item.backend, item.setting, item.identity)].append(
                runner.out / files["fusion_strip"]["path"])
    written = []
    for (backend, setting, identity), paths in sorted(groups.items()):
        strips = []
        for path in paths:
            with Image.open(path) as handle:
                strips.append(handle.convert("RGB"))
        sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)))
        top = 0
        for strip in strips:
            sheet.paste(strip, (0, top))
            top += strip.height
        path = folder / f"{backend}__{setting}__{identity}.png"
        atomic_write_image(path, sheet)
        written.append(path)
    return written


def write_report(runner, missing: list) -> Path:
    """Write everything under ``<out>/report``; returns that folder."""
    folder = runner.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    flat, raw = item_rows(runner)
    table = scenario_table(runner, flat, raw)
    columns = quality_columns(runner)

    item_columns = list(ITEM_KEYS) + ["image", "model_rows", "id_region_final"] + [
        c for c in metric_columns(runner) if c not in ("id_region_final",)]
    _write_csv(folder / "items.csv", [e for e in flat if e["setting"] != "reference"], item_columns)
    table1_columns = ["backend", "setting", "images"] + [
        c for col in columns for c in ((col, f"{col}_paper") if col in PAPER_COLUMNS else (col,))]
    _write_csv(folder / "table1.csv", table, table1_columns)
    _write_csv(folder / "speed.csv", table, ["backend", "setting", "images", *SPEED_COLUMNS])

    plots = write_plots(runner, table, columns + ["unet_evals_per_image"], folder / "plots")
    sheets = write_contact_sheets(runner, flat, folder / "contact_sheets")
    fusion = write_fusion_sheets(runner, raw, folder / "fusion")

    paper_columns = [c for c in PAPER_COLUMNS if c in columns]
    headers, cells = ["backend", "setting"], ["backend", "setting"]
    for column in paper_columns:
        headers += [_label(runner, column), "paper"]
        cells += [column, f"{column}_paper"]
    ablation = [dict(r, **{f"{c}_paper": PAPER_TABLE2.get(r["setting"], {}).get(c)
                           for c in ("face_sim", "dino")})
                for r in table if r["backend"] == "photomaker" and r["setting"] in PAPER_TABLE2]
    tiny_note = ("\n> **Tiny offline run**: random-weight pipelines and random metric models. The "
                 "numbers exercise the machinery and mean nothing about quality.\n"
                 if runner.spec.tiny else "")
    incomplete = (f"\n> **Incomplete**: {len(missing)} of {len(runner.grid)} items lack an image or "
                  "metric row; run the same command again to finish them.\n" if missing else "")
    skipped = "".join(f"\n- `{name}` {why}" for name, why in runner.skipped.items())
    paper_rows = [dict(method=name, **values) for name, values in PAPER_TABLE1.items()]
    text = [
        "# BeyondFacial benchmark report", tiny_note, incomplete,
        f"Grid: {len(runner.grid)} images; backends {', '.join(runner.targets)}; settings "
        f"{', '.join(s.name for s in runner.spec.settings)}; {len(runner.spec.identities)} "
        f"identities; prompt sets {', '.join(p.name for p in runner.spec.prompt_sets)}; seeds "
        f"{', '.join(map(str, runner.spec.seeds))}; {runner.spec.params.steps} steps at "
        f"{runner.spec.params.width}x{runner.spec.params.height}.",
        "\nFace sim is averaged over the expression prompts, the other columns over the action "
        "prompts (the paper's protocol; every set when that set is absent). FID compares each "
        "scenario's action images with the reference set. Percent throughout; FID lower is "
        "better. `paper` is the paper's Table 1 value for the matching row.",
        "\n## Table 1: ours beside the paper's\n",
        _markdown_table(table, cells, headers),
        "\n### The paper's Table 1\n",
        _markdown_table(paper_rows, ["method", *PAPER_COLUMNS],
                        ["method"] + [LABELS[c] for c in PAPER_COLUMNS]),
    ]
    if ablation:
        text += ["\n## Table 2: ablation (PhotoMaker V2)\n", _markdown_table(
            ablation, ["setting", "face_sim", "face_sim_paper", "dino", "dino_paper"],
            ["setting", "Face sim", "paper", "DINO", "paper"])]
    closeup = [c for c in columns if c not in PAPER_COLUMNS]
    text += ["\n## Close-up measures (the paper's claim)\n",
             _markdown_table(table, ["backend", "setting", *closeup],
                             ["backend", "setting"] + [_label(runner, c) for c in closeup]),
             "\n## Speed and memory\n",
             _markdown_table(table, ["backend", "setting", "images", *SPEED_COLUMNS],
                             ["backend", "setting", "images"] + [LABELS[c] for c in SPEED_COLUMNS]),
             "\n## Files\n",
             "- `table1.csv`, `speed.csv`, `items.csv`, `summary.json`",
             "- plots: " + ", ".join(f"`plots/{p.name}`" for p in plots),
             "- contact sheets: " + ", ".join(f"`contact_sheets/{p.name}`" for p in sheets),
             "- fusion maps: " + (", ".join(f"`fusion/{p.name}`" for p in fusion) or "none")]
    if skipped:
        text += ["\n## Backends left out\n", skipped.strip()]
    atomic_write_bytes(folder / "report.md", ("\n".join(text) + "\n").encode())
    atomic_write_json(folder / "summary.json", {
        "table1": table, "paper_table1": PAPER_TABLE1, "paper_table2": PAPER_TABLE2,
        "missing_items": [i.item_id for i in missing], "skipped_backends": runner.skipped,
        "items": len(runner.grid)})
    return folder
