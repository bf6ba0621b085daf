"""The tiny offline benchmark end to end: report, kill-and-resume, two ranks, metric plugins.

One uninterrupted run (module fixture) is the reference every other run must reproduce
byte for byte. The grid is the smallest that still takes every path: two backends (a
pipeline switch), baseline and full (contact sheets, fusion strips, the speed gap), both
prompt sets (Face sim on one, the rest on the other), two identities (two action images
per scenario, the least FID needs) and two base-model reference images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("insightface")
pytest.importorskip("matplotlib")

from benchmarks.cli import build_parser, spec_from_args  # noqa: E402
from benchmarks.runner import EXIT_AFTER_ENV, KILLED_EXIT_CODE, run_benchmark  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("dreambooth", "ipadapter")
ARGS = ["--tiny", "--backends", ",".join(BACKENDS), "--prompts-per-set", "1",
        "--fid-reference-per-prompt", "2", "--no-progress"]
PER_BACKEND = 2 * 2 * 2  # identities x settings x prompt sets (one prompt each, one seed)
ITEMS = len(BACKENDS) * PER_BACKEND + 2  # + the FID reference images
REPORT_TABLES = ("table1.csv", "items.csv")


def _spec(out: Path):
    return spec_from_args(build_parser().parse_args([*ARGS, "--out", str(out)]))


def _events(out: Path, kind: str) -> Counter:
    counts: Counter = Counter()
    for path in out.glob("events-rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["event"] == kind:
                counts[record["item"]] += 1
    return counts


def _assert_same_tables(out: Path, reference: Path) -> None:
    for name in REPORT_TABLES:
        assert (out / "report" / name).read_text() == (reference / "report" / name).read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = run_benchmark(_spec(out), rank=0, world_size=1)
    assert result.generated == ITEMS and result.scored == ITEMS
    assert result.report_dir == out / "report"
    return out


def test_tiny_run_writes_the_full_report(uninterrupted):
    report = uninterrupted / "report"
    text = (report / "report.md").read_text()
    assert "Table 1" in text and "58.67" in text  # the paper's numbers beside ours
    table = (report / "table1.csv").read_text().splitlines()
    header = table[0].split(",")
    for column in ("face_sim", "face_sim_paper", "dino", "clip_i", "clip_t", "fid",
                   "face_detected", "face_area_fraction", "face_box_height"):
        assert column in header
    rows = [dict(zip(header, line.split(","), strict=True)) for line in table[1:]]
    assert [(r["backend"], r["setting"]) for r in rows] == [
        (b, s) for b in BACKENDS for s in ("baseline", "full")]
    for row in rows:  # every scenario got a number in each paper column
        assert all(row[c] != "" for c in ("face_sim", "dino", "clip_i", "clip_t", "fid")), row
    assert (report / "plots" / "fid.png").stat().st_size > 0
    assert sorted(p.name for p in (report / "contact_sheets").iterdir()) == [
        f"{b}__person{k}__s0.png" for b in BACKENDS for k in (0, 1)]
    for backend in BACKENDS:
        assert list((report / "fusion").glob(f"{backend}__full__*.png"))
    speed = [line.split(",") for line in (report / "speed.csv").read_text().splitlines()[1:]]
    evals = {(r[0], r[1]): float(r[4]) for r in speed}
    for backend in BACKENDS:  # the ID line costs UNet evaluations
        assert evals[(backend, "full")] > evals[(backend, "baseline")]


def test_killed_run_resumes_without_redoing_anything(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # The one subprocess: the launcher, killed with SIGKILL once the first pipeline's items
    # and one of the second's are on disk. Loading only the two backends it runs keeps it short.
    killed_after = PER_BACKEND + 1
    command = [sys.executable, "-m", "bf_core.cli", "bench", *ARGS, "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               BEYONDFACIAL_ALLOW_PLUGINS=",".join(BACKENDS),
               **{EXIT_AFTER_ENV: str(killed_after)})
    first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == KILLED_EXIT_CODE, first.stderr[-2000:]
    assert sum(_events(out, "generated").values()) == killed_after
    assert not _events(out, "scored")
    # A crash can also leave a damaged file behind: it must be found and redone.
    damaged = sorted((out / "images").rglob("*.png"))[0]
    damaged.write_bytes(damaged.read_bytes()[:50])
    # Resumed in this process, the way the same command run again would: from the disk alone.
    resumed = run_benchmark(_spec(out), rank=0, world_size=1)
    assert resumed.generated == ITEMS - killed_after + 1 and resumed.scored == ITEMS
    generated = _events(out, "generated")
    assert len(generated) == ITEMS
    redone = [item for item, n in generated.items() if n > 1]
    assert redone == [str(damaged.relative_to(out / "images").with_suffix(""))]
    assert set(_events(out, "scored").values()) == {1}
    _assert_same_tables(out, uninterrupted)


def test_two_ranks_merge_into_the_single_process_table(uninterrupted, tmp_path):
    out = tmp_path / "sharded"
    second = run_benchmark(_spec(out), rank=1, world_size=2, report=False)
    first = run_benchmark(_spec(out), rank=0, world_size=2, wait_timeout=0)
    assert first.report_dir is not None and second.report_dir is None
    assert first.generated + second.generated == ITEMS
    assert {p.name for p in out.glob("manifest-rank*.jsonl")} == {
        "manifest-rank00000.jsonl", "manifest-rank00001.jsonl"}
    _assert_same_tables(out, uninterrupted)


def test_two_processes_under_accelerate_launch_give_the_single_process_table(uninterrupted,
                                                                             tmp_path):
    """Two real processes started by ``accelerate launch`` (its torchrun launcher; no GPU
    is used) write one merged table equal to the one-process run."""
    pytest.importorskip("accelerate")
    out = tmp_path / "launched"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "benchmarks", *ARGS, "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               BEYONDFACIAL_ALLOW_PLUGINS=",".join(BACKENDS))
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.glob("manifest-rank*.jsonl")} == {
        "manifest-rank00000.jsonl", "manifest-rank00001.jsonl"}
    assert sum(_events(out, "generated").values()) == ITEMS  # each item once, across ranks
    _assert_same_tables(out, uninterrupted)


class _ImageWidth:
    name, kind, columns = "image_width", "image", ("image_width",)

    def score(self, sample, context):
        return {"image_width": float(sample.image.width)}


class _Plugin:
    from bf_core.hookspecs import hookimpl

    @hookimpl
    def bf_register_metrics(self, register):
        register(_ImageWidth())


def test_a_third_party_metric_plugs_in_through_the_hook():
    from benchmarks.metrics import installed_metrics
    from bf_core.plugins import register_plugin, unregister_plugin

    name = register_plugin(_Plugin(), name="test-width-metric")
    try:
        metrics = installed_metrics()
        assert {"face", "dino", "clip_i", "clip_t", "fid", "image_width"} <= set(metrics)
    finally:
        unregister_plugin(name)
    assert "image_width" not in installed_metrics()
