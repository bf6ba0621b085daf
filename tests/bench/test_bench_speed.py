"""The speed benchmark's CPU variant runs and reports what it measured (no timing asserts)."""

from __future__ import annotations

import json

from benchmarks import cli


def test_speed_benchmark_on_the_tiny_pipeline(tmp_path, capsys):
    assert cli.main(["--speed", "--size", "tiny", "--device", "cpu", "--steps", "6",
                     "--resolution", "64", "--repeats", "1", "--idaf-iterations", "5",
                     "--no-progress", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    variants = {m["variant"]: m for m in result["measurements"]}
    assert set(variants) == {"stock", "wrapped (one call per step)", "wrapped (one call per line)"}
    m1 = round(0.2 * 6)
    assert variants["stock"]["unet_rows"] == 2 * 6
    assert variants["wrapped (one call per step)"]["unet_rows"] == 2 * 6 + 2 * (6 - m1 - 1)
    assert all(m["seconds"] > 0 and 0 < m["unet_seconds"] <= m["seconds"]
               for m in result["measurements"])
    assert result["idaf_ms"] > 0
    table = (tmp_path / "speed.md").read_text()
    assert "| eager | stock |" in table and table in capsys.readouterr().out
