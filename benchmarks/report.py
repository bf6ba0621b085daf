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
                written.append(save_sheet(images, labels, len(settings), cell,
                                          folder / f"{backend}__{identity.name}__s{seed}.png"))
    return written


def save_sheet(images: list, labels: list[str], columns: int, cell: int, path: Path) -> Path:
    """A contact sheet of ``images`` (one setting per column), written atomically to ``path``."""
    from bf_core.visualize import contact_sheet

    atomic_write_image(path, contact_sheet(images, labels, columns=columns, cell=cell))
    return path


def write_fusion_sheets(runner, raw, folder: Path) -> list[Path]:
    """Per backend, setting, identity (first seed): the fusion strips of every prompt, stacked.
    A multi item's sheet (its identity the pair) is named ``multi__...``."""
    from PIL import Image

    groups: dict[tuple, list[Path]] = defaultdict(list)
    first_seed = runner.spec.seeds[0]
    for row in raw:
        item, files = row["item"], row["image"].get("files", {})
        if "fusion_strip" in files and item.seed == first_seed:
            groups[(item.is_multi, item.backend, item.setting, item.identity)].append(
                runner.out / files["fusion_strip"]["path"])
    written = []
    for (multi, backend, setting, identity), paths in sorted(groups.items()):
        strips = []
        for path in paths:
            with Image.open(path) as handle:
                strips.append(handle.convert("RGB"))
        sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)))
        top = 0
        for strip in strips:
            sheet.paste(strip, (0, top))
            top += strip.height
        prefix = "multi__" if multi else ""
        path = folder / f"{prefix}{backend}__{setting}__{identity}.png"
        atomic_write_image(path, sheet)
        written.append(path)
    return written


def write_single_person(runner, flat, raw, folder: Path) -> tuple[list, list[str], list[str]]:
    """The single-person part: items, Table 1, speed (CSV), plots, contact sheets. Returns
    (the scenario table, the report's sections, its lines in the files list)."""
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

    paper_columns = [c for c in PAPER_COLUMNS if c in columns]
    headers, cells = ["backend", "setting"], ["backend", "setting"]
    for column in paper_columns:
        headers += [_label(runner, column), "paper"]
        cells += [column, f"{column}_paper"]
    ablation = [dict(r, **{f"{c}_paper": PAPER_TABLE2.get(r["setting"], {}).get(c)
                           for c in ("face_sim", "dino")})
                for r in table if r["backend"] == "photomaker" and r["setting"] in PAPER_TABLE2]
    paper_rows = [dict(method=name, **values) for name, values in PAPER_TABLE1.items()]
    images = sum(1 for item in runner.grid if not item.is_multi)
    text = [
        f"Grid: {images} images; backends {', '.join(runner.targets)}; settings "
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
                             ["backend", "setting", "images"] + [LABELS[c] for c in SPEED_COLUMNS])]
    files = ["- `table1.csv`, `speed.csv`, `items.csv`, `summary.json`",
             "- plots: " + ", ".join(f"`plots/{p.name}`" for p in plots),
             "- contact sheets: " + ", ".join(f"`contact_sheets/{p.name}`" for p in sheets)]
    return table, text, files


# -- several people (the multi scenario) -------------------------------------------------------
MULTI_ITEM_KEYS = ("backend", "setting", "identity", "prompt_set", "prompt_index", "seed")
MULTI_TABLE_KEYS = ("backend", "setting", "method", "images")
MULTI_SPEED_COLUMNS = ("unet_evals_per_image", "seconds_per_image")


def multi_columns(runner) -> list[str]:
    return list(runner.multi_metric.columns)


def multi_table(runner, flat, raw) -> list[dict[str, Any]]:
    """One row per (backend, setting) of the multi scenario, each column averaged over its
    images; a row left out (no native mode, too few people served) has 0 images and its
    reason in ``note``."""
    from benchmarks.multi import MULTI_SETTINGS, setting_method

    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, entry in enumerate(flat):
        groups[(entry["backend"], entry["setting"])].append(index)
    keys = set(groups) | set(runner.multi_left_out)
    table = []
    for backend, setting in sorted(keys, key=lambda k: (k[0], MULTI_SETTINGS.index(k[1]))):
        indices = groups.get((backend, setting), [])
        row: dict[str, Any] = {"backend": backend, "setting": setting,
                               "method": setting_method(backend, setting),
                               "images": len(indices),
                               "note": runner.multi_left_out.get((backend, setting))}
        if row["note"]:
            row["method"] = "left out"
        for column in multi_columns(runner):
            row[column] = _mean(flat[i].get(column) for i in indices)
        row["unet_evals_per_image"] = _mean(flat[i]["model_rows"] for i in indices)
        row["seconds_per_image"] = _mean(flat[i]["seconds"] for i in indices)
        table.append(row)
    return table


def outline_people(image, regions, faces, cell: int):
    """``image`` scaled to ``cell`` pixels wide, each person's region outlined (2 px) and
    its matched face boxed (1 px) in the person's line colour (``line_colour(j)``, j from 1).

    regions: per person (x0, y0, x1, y1) fractions, or None (not drawn); faces: per person
    its matched face box x1, y1, x2, y2 in pixels of ``image``, or None.
    """
    from PIL import ImageDraw

    from bf_core.visualize import line_colour

    scale = cell / image.width
    picture = image.convert("RGB").resize((cell, round(image.height * scale)))
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    for person, region in enumerate(regions or [], start=1):
        if region is not None:
            x0, y0, x1, y1 = region
            draw.rectangle([x0 * width, y0 * height, x1 * width - 1, y1 * height - 1],
                           outline=line_colour(person), width=2)
    for person, face in enumerate(faces or [], start=1):
        if face is not None:
            x1, y1, x2, y2 = (float(v) * scale for v in face)
            draw.rectangle([x1, y1, x2, y2], outline=line_colour(person), width=1)
    return picture


def write_multi_contact_sheets(runner, raw, folder: Path) -> list[Path]:
    """Per backend, pair and seed: rows = prompts, columns = the settings that ran (n_lines,
    native, person1_only), each image with the regions in use and the matched faces drawn."""
    from PIL import Image

    from benchmarks.multi import MULTI_SETTINGS

    seeds = list(runner.spec.seeds)[:runner.spec.contact_sheet_seeds]
    by_key = {}
    for row in raw:
        item = row["item"]
        by_key[(item.backend, item.setting, item.identity, item.prompt_index, item.seed)] = row
    cell = max(128, min(256, runner.spec.params.width))
    prompts = runner.spec.multi.prompt_set.prompts
    written = []
    for backend in sorted({r["item"].backend for r in raw}):
        settings = [s for s in MULTI_SETTINGS if any(
            r["item"].backend == backend and r["item"].setting == s for r in raw)]
        for pair in dict.fromkeys(r["item"].identity for r in raw if r["item"].backend == backend):
            for seed in seeds:
                images, labels = [], []
                for index in range(len(prompts)):
                    for setting in settings:
                        row = by_key.get((backend, setting, pair, index, seed))
                        record = row["image"] if row is not None else {}
                        if "files" not in record:  # not generated (yet)
                            images.append(Image.new("RGB", (cell, cell)))
                        else:
                            faces = [m and m["box"] for m in row["matches"] or []]
                            with Image.open(runner.out / record["files"]["image"]["path"]) as handle:
                                images.append(outline_people(handle.convert("RGB"),
                                                             record.get("regions"), faces, cell))
                        labels.append(f"{setting} {index:02d}")
                written.append(save_sheet(images, labels, len(settings), cell,
                                          folder / f"multi__{backend}__{pair}__s{seed}.png"))
    return written


def multi_sections(runner, table, pairs: list[str], sheets: list[Path]) -> list[str]:
    """The report's "Several people" section."""
    options = runner.spec.multi
    columns = multi_columns(runner) + list(MULTI_SPEED_COLUMNS)
    labels = {**LABELS, **runner.multi_metric.labels}
    text = [
        "\n## Several people (multi)\n",
        f"{len(pairs)} pair(s) ({options.pairs}: {', '.join(pairs) or 'none'}) x "
        f"{len(options.prompt_set.prompts)} prompt(s) of `{options.prompt_set.name}` x "
        f"{len(runner.spec.seeds)} seed(s); regions: {options.regions} (person 1 left, person 2 "
        "right; the native baseline always takes the halves). A face is a person's from an "
        f"ArcFace cosine of {options.match_threshold:g} %. ID recall: share of persons matched "
        "to a distinct face above it; Swap/blend: images where one face matches two persons, or "
        "a person's best face is matched to, or lies in the region of, another person; Face "
        "count OK: images with exactly two faces found; face area and height per matched face "
        "(0 for a person without one). Percent except Faces found and speed.\n",
        _markdown_table(table, ["backend", "setting", "method", "images", *columns],
                        ["backend", "setting", "method", "images"]
                        + [labels.get(c, c) for c in columns]),
    ]
    left_out = [r for r in table if r["note"]]
    if left_out or runner.multi_notes:
        text += ["\nLeft out:\n"] + [f"- `{r['backend']}` {r['setting']}: it {r['note']}"
                                      for r in left_out] + [f"- {n}" for n in runner.multi_notes]
    text += ["\nContact sheets: one per backend, pair and seed, prompts down, settings across; "
             "each person's region outlined in its colour (person 1 orange, person 2 green), "
             "its matched face boxed thinly in the same colour: "
             + (", ".join(f"`contact_sheets/{p.name}`" for p in sheets) or "none")]
    return text


def write_refine(runner, flat, refine_settings: list[str], folder: Path) -> list[str]:
    """The face-refine section: ``refine.csv`` and its table (benchmarks/refine.py)."""
    from benchmarks.refine import (
        TABLE_COLUMNS,
        pass_schedules,
        refine_pairs,
        refine_table,
        same_pass_groups,
    )
    from bf_core.config import FEW_STEP_MAIN_CALL

    main_steps = runner.spec.params.steps
    schedules = pass_schedules([s for s in runner.spec.settings if s.name in refine_settings],
                               main_steps)
    passes = (f"\nThe passes after the {main_steps}-step main call: " + "; ".join(
        f"`{name}` {steps} steps, {effective} effective, identity {identity}"
        for name, (steps, effective, identity) in schedules.items()) + ".\n")
    why_same = ""
    if main_steps <= FEW_STEP_MAIN_CALL:
        why_same = (f": a main call of at most {FEW_STEP_MAIN_CALL} steps keeps its step count "
                    "and raises the strength to at least `min_effective_steps` (docs/refine.md); "
                    f"give `--steps` above {FEW_STEP_MAIN_CALL} for a strength sweep")
    for names in same_pass_groups(schedules):
        passes += f"\n{', '.join(f'`{n}`' for n in names)} run the same pass{why_same}.\n"
    pairs = refine_pairs(flat, runner.spec.params.height, refine_settings)
    table = refine_table(pairs)
    _write_csv(folder / "refine.csv", table, TABLE_COLUMNS)
    headers = ["backend", "setting", "face px", "n", "mean delta", "median delta", "95% CI low",
               "95% CI high", "win %", "detected %", "CLIP-T"]
    note = ("" if any(e["setting"] == "full" for e in flat) else
            "\nThe refine settings pair each image with the `full` setting's image of the same "
            "call (the image before the pass); add `full` to `--settings`.\n")
    return ["\n## Face refine: face similarity before and after the pass\n",
            "Paired by backend, identity, prompt and seed with the `full` setting (the same "
            "call's image before the pass); face size is the face's height before it. Delta = "
            "after - before (Face sim points); a face lost in the pass counts against the win "
            "and detection rates. Intervals: 95% bootstrap of the mean.\n", passes, note,
            _markdown_table(table, TABLE_COLUMNS, headers)]


def write_report(runner, missing: list) -> Path:
    """Write everything under ``<out>/report``; returns that folder."""
    folder = runner.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    every_flat, every_raw = item_rows(runner)
    single = [k for k, r in enumerate(every_raw) if not r["item"].is_multi]
    flat, raw = [every_flat[k] for k in single], [every_raw[k] for k in single]
    multi_flat = [e for e, r in zip(every_flat, every_raw, strict=True) if r["item"].is_multi]
    multi_raw = [r for r in every_raw if r["item"].is_multi]
    text = ["# BeyondFacial benchmark report",
            ("\n> **Tiny offline run**: random-weight pipelines and random metric models. The "
             "numbers exercise the machinery and mean nothing about quality.\n"
             if runner.spec.tiny else ""),
            (f"\n> **Incomplete**: {len(missing)} of {len(runner.grid)} items lack an image or "
             "metric row; run the same command again to finish them.\n" if missing else "")]
    summary: dict[str, Any] = {}
    files = ["- `summary.json`"]
    if runner.spec.single:
        table, sections, files = write_single_person(runner, flat, raw, folder)
        text += sections
        summary.update({"table1": table, "paper_table1": PAPER_TABLE1,
                        "paper_table2": PAPER_TABLE2})
        refine_settings = [x.name for x in runner.spec.settings if x.refine_faces]
        if refine_settings:
            text += write_refine(runner, flat, refine_settings, folder)
            files += ["- `refine.csv` (face refine: paired face similarity by face size)"]
    fusion = write_fusion_sheets(runner, every_raw, folder / "fusion")
    if runner.spec.multi is not None:
        multi = multi_table(runner, multi_flat, multi_raw)
        columns = multi_columns(runner)
        item_columns = list(MULTI_ITEM_KEYS) + ["image", "model_rows", "id_region_final",
                                                *columns, *runner.multi_metric.detail_columns]
        _write_csv(folder / "multi_items.csv", multi_flat, item_columns)
        _write_csv(folder / "multi.csv", multi, [*MULTI_TABLE_KEYS, *columns,
                                                  *MULTI_SPEED_COLUMNS, "note"])
        sheets = write_multi_contact_sheets(runner, multi_raw, folder / "contact_sheets")
        pairs = list(dict.fromkeys(r["item"].identity for r in multi_raw))
        text += multi_sections(runner, multi, pairs, sheets)
        files += ["- `multi.csv`, `multi_items.csv` (several people)"]
        summary.update({"multi": multi, "multi_notes": runner.multi_notes})
    files += ["- fusion maps: " + (", ".join(f"`fusion/{p.name}`" for p in fusion) or "none")]
    text += ["\n## Files\n", *files]
    skipped = "".join(f"\n- `{name}` {why}" for name, why in runner.skipped.items())
    if skipped:
        text += ["\n## Backends left out\n", skipped.strip()]
    atomic_write_bytes(folder / "report.md", ("\n".join(text) + "\n").encode())
    atomic_write_json(folder / "summary.json", {
        **summary, "missing_items": [i.item_id for i in missing],
        "skipped_backends": runner.skipped, "items": len(runner.grid)})
    return folder
