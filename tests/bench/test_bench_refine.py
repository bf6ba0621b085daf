"""The benchmark's face-refine settings: pairing with the `full` images, the face-size
buckets, the paired statistics, and the tiny run's table."""

from __future__ import annotations

import csv

import numpy as np

from benchmarks.cli import main
from benchmarks.refine import (
    bootstrap_ci,
    bucket_of,
    pass_schedules,
    refine_pairs,
    refine_table,
    same_pass_groups,
)
from benchmarks.scenarios import Setting


def test_face_sizes_fall_in_the_specs_buckets():
    assert [bucket_of(px) for px in (0, 47.9, 48, 79, 80, 128, 191.9, 192, 900)] == [
        "<48", "<48", "48-80", "48-80", "80-128", "128-192", "128-192", ">=192", ">=192"]


def test_pairs_read_the_face_size_before_the_pass_and_count_lost_faces_as_failures():
    base = dict(backend="b", identity="p", prompt_set="s", seed=0)
    flat = [dict(base, setting="full", prompt_index=0, face_sim=50.0, face_box_height=25.0),
            dict(base, setting="refine", prompt_index=0, face_sim=58.0, clip_t=30.0),
            dict(base, setting="full", prompt_index=1, face_sim=40.0, face_box_height=50.0),
            dict(base, setting="refine", prompt_index=1, face_sim=None, clip_t=20.0),
            dict(base, setting="full", prompt_index=2, face_sim=None, face_box_height=0.0),
            dict(base, setting="refine", prompt_index=2, face_sim=10.0)]
    pairs = refine_pairs(flat, 256, ["refine"])
    # no face before the pass (prompt 2): nothing to refine, left out
    assert [(p["bucket"], p["before"], p["after"]) for p in pairs] == [
        ("48-80", 50.0, 58.0), ("128-192", 40.0, None)]
    rows = {r["bucket"]: r for r in refine_table(pairs)}
    assert rows["all"]["n"] == 2 and rows["all"]["mean_delta"] == 8.0
    assert rows["all"]["win_rate"] == 50.0 and rows["all"]["detection_rate"] == 50.0
    assert rows["128-192"]["mean_delta"] is None and rows["128-192"]["win_rate"] == 0.0
    assert rows["all"]["clip_t"] == 25.0


def test_the_bootstrap_interval_holds_the_mean_and_is_reproducible():
    deltas = np.random.default_rng(1).normal(3.0, 2.0, 40)
    low, high = bootstrap_ci(deltas)
    assert low < deltas.mean() < high and (low, high) == bootstrap_ci(deltas)
    assert bootstrap_ci([2.0]) == (2.0, 2.0)


def test_refine_settings_run_the_pass_with_their_own_refine_config():
    setting = Setting.named("refine_strength_030")
    assert setting.refine_faces and setting.config.refine.strength == 0.3
    assert not Setting.named("full").refine_faces
    off = Setting.named("refine_identity_off")
    assert off.refine_faces and off.config.refine.identity == "off"


def test_a_strength_sweep_after_a_few_step_call_is_one_pass_and_the_report_says_so():
    names = ["refine", "refine_strength_030", "refine_strength_060", "refine_identity_off"]
    settings = [Setting.named(name) for name in names]
    few = pass_schedules(settings, 3)  # 3 steps: the pass keeps them, >= 2 effective
    assert few["refine"] == few["refine_strength_060"] == (3, 2, "on")
    assert few["refine_identity_off"] == (3, 2, "off")
    assert same_pass_groups(few) == [names[:3]]
    many = pass_schedules(settings, 30)  # ceil(20 / strength) steps, ~20 effective each
    assert [many[name][0] for name in names[:3]] == [45, 67, 34]
    assert same_pass_groups(many) == []


def test_a_tiny_run_with_refine_writes_the_bucket_table(tmp_path):
    """Also on InstantID, whose SDXL ControlNet pipeline class has no default size."""
    out = tmp_path / "run"
    assert main(["--tiny", "--out", str(out), "--no-progress", "--backends",
                 "dreambooth,instantid", "--settings", "full,refine,refine_strength_060",
                 "--prompts-per-set", "1"]) == 0
    with open(out / "report" / "refine.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["backend"], r["setting"]) for r in rows} == {
        (backend, setting) for backend in ("dreambooth", "instantid")
        for setting in ("refine", "refine_strength_060")}
    for backend in ("dreambooth", "instantid"):
        every = next(r for r in rows if r["bucket"] == "all" and r["backend"] == backend)
        assert int(every["n"]) == 2 * 2  # 2 identities x 2 prompt sets x 1 prompt x 1 seed
    report = (out / "report" / "report.md").read_text()
    assert "Face refine: face similarity before and after" in report
    assert "`refine`, `refine_strength_060` run the same pass" in report  # 3 tiny steps


def test_without_the_full_setting_the_report_says_what_to_add(tmp_path):
    out = tmp_path / "run"
    assert main(["--tiny", "--out", str(out), "--no-progress", "--backends", "dreambooth",
                 "--settings", "refine", "--prompts-per-set", "1"]) == 0
    assert "add `full` to `--settings`" in (out / "report" / "report.md").read_text()
