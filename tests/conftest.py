"""Shared test set-up: offline, deterministic, manifests located in the repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Nothing in the suite may touch a model hub; fail fast instead of retrying for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

MANIFEST_DIR = Path(__file__).parent / "fixtures" / "manifests"


def load_manifest_part(name: str, part: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of one part of an official checkpoint manifest."""
    data = json.loads((MANIFEST_DIR / f"{name}.json").read_text())
    return {k: tuple(v) for k, v in data["parts"][part].items()}


@pytest.fixture
def manifest_part():
    return load_manifest_part


def pytest_configure(config):
    # Under pytest-xdist (`-n`) every worker is a process of its own: one torch thread
    # each, so that the workers share the cores instead of fighting over them.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
