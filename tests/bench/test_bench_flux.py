"""The benchmark on FLUX.1: `bench --tiny --host flux` runs the FLUX backends on the tiny
FluxPipeline and writes the report; SDXL-only backends are left out with the reason."""

from __future__ import annotations

import csv
import json

from benchmarks.cli import main
from bf_core.config import BFConfig


def test_a_tiny_flux_run_writes_its_tables_with_the_flux_cost(tmp_path):
    out = tmp_path / "run"
    code = main(["--tiny", "--host", "flux", "--out", str(out), "--no-progress",
                 "--backends", "dreambooth,photomaker", "--prompts-per-set", "1"])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["host"] == "flux" and "not flux" in run["skipped_backends"]["photomaker"]
    with open(out / "report" / "speed.csv") as handle:
        speed = {row["setting"]: row for row in csv.DictReader(handle)}
    steps = 3  # the tiny run's
    m1 = BFConfig().thresholds(steps, "floor")[0]
    # No CFG on FLUX: T evaluations for the baseline, T + (T - M1 - 1) with both lines.
    assert float(speed["baseline"]["unet_evals_per_image"]) == steps
    assert float(speed["full"]["unet_evals_per_image"]) == steps + (steps - m1 - 1)
    report = (out / "report" / "report.md").read_text()
    assert "photomaker" in report and "not flux" in report  # left out, with the reason
    images = list((out / "images" / "dreambooth").rglob("*.png"))
    assert images and all(png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for png in images)
