"""The tiny offline benchmark end to end: report, kill-and-resume, two ranks, metric plugins."""

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
ARGS = ["--tiny", "--backends", "dreambooth", "--prompts-per-set", "1",
        "--fid-reference-per-prompt", "2", "--no-progress"]
ITEMS = 2 * 2 * 2 + 2  # identities x settings x (action + expression) + FID references


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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = run_benchmark(_spec(out), rank=0, world_size=1)
    assert result.generated == ITEMS and result.report_dir == out / "report"
    return out


def test_tiny_run_writes_the_full_report(uninterrupted):
    report = uninterrupted / "report"
    text = (report / "report.md").read_text()
    assert "Table 1" in text and "58.67" in text  # the paper's numbers beside ours
    header = (report / "table1.csv").read_text().splitlines()[0].split(",")
    for column in ("face_sim", "face_sim_paper", "dino", "clip_i", "clip_t", "fid",
                   "face_detected", "face_area_fraction", "face_box_height"):
        assert column in header
    rows = (report / "table1.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["baseline", "full"]
    assert (report / "plots" / "fid.png").stat().st_size > 0
    assert sorted(p.name for p in (report / "contact_sheets").iterdir()) == [
        "dreambooth__person0__s0.png", "dreambooth__person1__s0.png"]
    assert list((report / "fusion").glob("dreambooth__full__*.png"))
    speed = (report / "speed.csv").read_text().splitlines()
    evals = {r.split(",")[1]: float(r.split(",")[4]) for r in speed[1:]}
    assert evals["full"] > evals["baseline"]  # the ID line costs UNet evaluations


def test_killed_run_resumes_without_redoing_anything(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "bf_core.cli", "bench", *ARGS, "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{EXIT_AFTER_ENV: "3"})
    first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == KILLED_EXIT_CODE, first.stderr[-2000:]
    assert sum(_events(out, "generated").values()) == 3
    # A crash can also leave a damaged file behind: it must be found and redone.
    done = sorted((out / "images").rglob("*.png"))
    damaged = done[0]
    damaged.write_bytes(damaged.read_bytes()[:50])
    env.pop(EXIT_AFTER_ENV)
    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    generated = _events(out, "generated")
    assert len(generated) == ITEMS
    redone = [item for item, n in generated.items() if n > 1]
    assert redone == [str(damaged.relative_to(out / "images").with_suffix(""))]
    assert set(_events(out, "scored").values()) == {1}
    for name in ("table1.csv", "items.csv"):
        assert (out / "report" / name).read_text() == (uninterrupted / "report" / name).read_text()


def test_two_ranks_merge_into_the_single_process_table(uninterrupted, tmp_path):
    out = tmp_path / "sharded"
    second = run_benchmark(_spec(out), rank=1, world_size=2, report=False)
    first = run_benchmark(_spec(out), rank=0, world_size=2, wait_timeout=0)
    assert first.generated + second.generated == ITEMS
    assert {p.name for p in out.glob("manifest-rank*.jsonl")} == {
        "manifest-rank00000.jsonl", "manifest-rank00001.jsonl"}
    for name in ("table1.csv", "items.csv"):
        assert (out / "report" / name).read_text() == (uninterrupted / "report" / name).read_text()


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
