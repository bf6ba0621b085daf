"""Scenario grid, sharding and loss-free storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.scenarios import (
    BenchIdentity,
    GenerationParams,
    PromptSet,
    Setting,
    build_grid,
    load_prompt_set,
    load_settings,
    shard,
)
from benchmarks.storage import Manifest, atomic_write_image
from bf_core.errors import ConfigError


def _grid(steps: int = 4):
    identities = [BenchIdentity("a", ()), BenchIdentity("b", ())]
    return build_grid(["x", "y"], load_settings(["baseline", "full"]), identities,
                      [PromptSet("action", ("p0", "p1"))], [0, 1], GenerationParams(steps=steps))


def test_shipped_prompt_sets_hold_twenty_action_prompts_and_an_expression_set():
    action, expression = load_prompt_set("action"), load_prompt_set("expression")
    assert len(action.prompts) == 20 and len(set(action.prompts)) == 20
    assert "kneeling by a small lake" in action.prompts[0]
    assert len(expression.prompts) >= 10


def test_grid_is_complete_unique_and_pipeline_major():
    items = _grid()
    assert len(items) == 2 * 2 * 2 * 2 * 2
    assert len({i.item_id for i in items}) == len(items)
    backends = [i.backend for i in items]
    assert backends == sorted(backends)  # one pipeline load per backend


def test_fingerprint_follows_what_decides_the_pixels():
    same, other = _grid(), _grid(steps=5)
    assert [i.fingerprint for i in same] == [i.fingerprint for i in _grid()]
    assert all(a.fingerprint != b.fingerprint for a, b in zip(same, other, strict=True))


def test_shards_are_disjoint_and_cover_the_grid():
    items = _grid()
    shares = [shard(items, rank, 3) for rank in range(3)]
    ids = [i.item_id for share in shares for i in share]
    assert sorted(ids) == sorted(i.item_id for i in items)
    with pytest.raises(ConfigError):
        shard(items, 3, 3)


def test_custom_settings_are_validated_by_bfconfig(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"k4": {"idap": {"num_tokens": 4}}, "bad": {"idaf": {"lambda_id": -1}}}))
    assert load_settings(["k4"], path)[0].config.idap.num_tokens == 4
    with pytest.raises(ConfigError, match="lambda_id"):
        load_settings(["bad"], path)
    with pytest.raises(ConfigError, match="unknown setting"):
        Setting.named("nope")


def test_manifest_rejects_corrupt_partial_and_stale_files(tmp_path):
    manifest = Manifest(tmp_path, rank=0)
    image = Image.fromarray(np.full((8, 8, 3), 7, np.uint8))
    sha = atomic_write_image(tmp_path / "img.png", image)
    manifest.append({"kind": "image", "item": "i", "fingerprint": "f",
                     "files": {"image": {"path": "img.png", "sha256": sha}}})
    assert manifest.verified("image", "i", "f", (8, 8)) is not None
    assert manifest.verified("image", "i", "other-config", (8, 8)) is None
    assert manifest.verified("image", "i", "f", (16, 16)) is None  # size mismatch
    data = (tmp_path / "img.png").read_bytes()
    (tmp_path / "img.png").write_bytes(data[: len(data) // 2])  # a crash mid-write
    assert manifest.verified("image", "i", "f", (8, 8)) is None


def test_torn_manifest_line_is_skipped_and_later_records_survive(tmp_path):
    manifest = Manifest(tmp_path, rank=1)
    manifest.append({"kind": "image", "item": "a", "fingerprint": "f", "files": {}})
    with open(manifest.path, "a") as handle:
        handle.write('{"kind": "image", "item": "b", "fingerp')  # killed mid-append
    with pytest.warns(UserWarning, match="incomplete manifest line"):
        Manifest(tmp_path, rank=1).append({"kind": "image", "item": "c", "fingerprint": "f",
                                           "files": {}})
    with pytest.warns(UserWarning, match="incomplete manifest line"):
        reread = Manifest(tmp_path, rank=0)
    assert set(reread.records("image")) == {"a", "c"}


def test_rank_and_world_come_from_the_launchers_environment(monkeypatch):
    from benchmarks.runner import rank_and_world

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert rank_and_world() == (2, 3)
    monkeypatch.setenv("RANK", "1")  # the global rank wins over the local one
    assert rank_and_world() == (1, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_and_world() == (0, 1)


def test_a_single_process_cpu_launch_is_recognised(monkeypatch):
    from benchmarks.cli import lone_cpu_launch

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert lone_cpu_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real multi-process launch
    assert not lone_cpu_launch()


def test_each_rank_takes_its_own_gpu_unless_the_launcher_shows_it_only_one(monkeypatch):
    import torch

    from benchmarks.cli import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device(None) == "cuda"  # one process: the default GPU
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert rank_device(None) == "cuda:2" and rank_device("cuda") == "cuda:2"
    assert rank_device("cuda:0") == "cuda:0" and rank_device("cpu") == "cpu"  # as given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES per rank
    assert rank_device(None) == "cuda"
