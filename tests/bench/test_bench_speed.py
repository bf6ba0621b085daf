"""The speed benchmark's CPU variant runs and reports what it measured (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from benchmarks import cli, speed

VARIANTS = {"stock", "wrapped (one call per step)", "wrapped (one call per line)"}


def run_speed(tmp_path, *options: str) -> dict:
    assert cli.main(["--speed", "--size", "tiny", "--device", "cpu", "--resolution", "64",
                     "--repeats", "1", "--idaf-iterations", "5", "--no-progress",
                     "--out", str(tmp_path), *options]) == 0
    return json.loads((tmp_path / "speed.json").read_text())


def test_speed_benchmark_on_the_tiny_pipeline(tmp_path, capsys):
    result = run_speed(tmp_path, "--steps", "6")
    assert result["backends"] == ["dreambooth"] and result["errors"] == {}
    variants = {m["variant"]: m for m in result["measurements"]}
    assert set(variants) == VARIANTS
    assert {m["backend"] for m in result["measurements"]} == {"dreambooth"}
    m1 = round(0.2 * 6)
    assert variants["stock"]["model_rows"] == 2 * 6
    assert variants["wrapped (one call per step)"]["model_rows"] == 2 * 6 + 2 * (6 - m1 - 1)
    assert all(m["seconds"] > 0 and 0 < m["unet_seconds"] <= m["seconds"]
               for m in result["measurements"])
    assert result["idaf_ms"] > 0
    table = (tmp_path / "speed.md").read_text()
    assert "| dreambooth | eager | stock |" in table and table in capsys.readouterr().out


def test_speed_benchmark_times_each_backend_against_its_own_baseline(tmp_path):
    """Two backends with ID modules sized for the pipeline: every backend gets the three
    variants, its baseline runs one line (two CFG rows per step) and the wrapped runs add
    the ID line until the IdAF start."""
    steps = 5
    result = run_speed(tmp_path, "--steps", str(steps), "--backends", "ipadapter,pulid")
    assert result["backends"] == ["ipadapter", "pulid"] and result["errors"] == {}
    rows = {(m["backend"], m["variant"]): m for m in result["measurements"]}
    assert set(rows) == {(backend, variant) for backend in ("ipadapter", "pulid")
                         for variant in VARIANTS}
    m1 = round(0.2 * steps)
    for backend in ("ipadapter", "pulid"):
        assert rows[backend, "stock"]["model_rows"] == 2 * steps
        for variant in VARIANTS - {"stock"}:
            assert rows[backend, variant]["model_rows"] == 2 * steps + 2 * (steps - m1 - 1)
    assert all(m["mode"] == "eager" and m["seconds"] > 0 and 0 < m["unet_seconds"] <= m["seconds"]
               for m in result["measurements"])
    table = (tmp_path / "speed.md").read_text()
    for backend in ("ipadapter", "pulid"):
        assert f"| {backend} | eager | stock | " in table
        assert f"| {backend} | eager | wrapped (one call per line) | " in table


def test_the_speed_benchmark_on_the_tiny_flux_pipeline(tmp_path):
    """``--host flux``: the FLUX backends on the tiny FluxPipeline. No CFG, so the baseline
    runs T transformer rows and the wrapped runs T + (T - M1 - 1), M1 floored on FLUX."""
    steps = 5
    backends = ("dreambooth", "xlabs_ipadapter", "pulid_flux", "infiniteyou")
    result = run_speed(tmp_path, "--host", "flux", "--steps", str(steps), "--backends",
                       ",".join(backends))
    assert result["host"] == "flux" and result["errors"] == {}
    rows = {(m["backend"], m["variant"]): m for m in result["measurements"]}
    assert set(rows) == {(b, v) for b in backends for v in VARIANTS}
    m1 = int(0.2 * steps)
    for backend in backends:
        assert rows[backend, "stock"]["model_rows"] == steps
        for variant in VARIANTS - {"stock"}:
            assert rows[backend, variant]["model_rows"] == steps + (steps - m1 - 1)
    assert "FLUX tiny size" in (tmp_path / "speed.md").read_text()


def test_an_unknown_backend_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        speed.build_parser().parse_args(["--backends", "ipadapter,faceswap"])
    message = capsys.readouterr().err
    assert "faceswap" in message and "photomaker" in message


def test_an_unknown_mode_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        speed.build_parser().parse_args(["--modes", "eager,jit"])
    assert "eager,compiled" in capsys.readouterr().err


def test_results_are_saved_after_each_measurement(tmp_path, monkeypatch):
    """A run stopped part-way (a time limit on a lent GPU) keeps what it had measured: here
    the second backend's set-up dies and the first one's numbers are already on disk."""
    saved: list[int] = []
    real_measure = speed.measure

    def measure_and_watch(args, save=None):
        def watching(result):
            save(result)
            saved.append(len(json.loads((tmp_path / "speed.json").read_text())["measurements"]))
        return real_measure(args, watching)

    real_setup = speed.speed_setup

    def setup_or_break(name, *args, **kwargs):
        if name == "pulid":
            raise RuntimeError("out of memory while building the ID modules")
        return real_setup(name, *args, **kwargs)

    monkeypatch.setattr(speed, "measure", measure_and_watch)
    monkeypatch.setattr(speed, "speed_setup", setup_or_break)
    assert speed.main(["--size", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "4",
                       "--repeats", "1", "--idaf-iterations", "5", "--no-progress",
                       "--backends", "dreambooth,pulid", "--out", str(tmp_path)]) == 1
    assert saved == [1, 2, 3, 3]  # one save per measurement, then one for the failure
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [m["backend"] for m in result["measurements"]] == ["dreambooth"] * 3
    assert "out of memory" in result["errors"]["pulid"]
    assert "- pulid: RuntimeError: out of memory" in (tmp_path / "speed.md").read_text()
