"""PuLID v1 / v1.1: our modules against the official checkpoint manifests (meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from bf_backends.pulid.attention import install_pulid_attention, pulid_processor_numbering
from bf_backends.pulid.loader import load_pulid
from bf_backends.pulid.modules import IDEncoder, IDFormer
from bf_core.checkpoints import expected_shapes
from bf_core.errors import CheckpointError
from bf_core.hosts.sdxl import sdxl_unet_config

pytestmark = pytest.mark.compat

MANIFESTS = Path(__file__).parents[1] / "fixtures" / "manifests"
CASES = [("pulid_v1", "v1", IDEncoder), ("pulid_v1.1", "v1.1", IDFormer)]


def _sdxl_unet_on_meta() -> UNet2DConditionModel:
    """The SDXL base UNet architecture (stabilityai/stable-diffusion-xl-base-1.0 config)."""
    with torch.device("meta"):
        return UNet2DConditionModel(**sdxl_unet_config())


@pytest.fixture(scope="module")
def sdxl_unet():
    return _sdxl_unet_on_meta()


def _group(flat: dict, prefix: str) -> dict:
    return {key[len(prefix) + 1:]: shape for key, shape in flat.items()
            if key.startswith(prefix + ".")}


def _assert_same_layout(got: dict, expected: dict) -> None:
    missing, unexpected = expected.keys() - got.keys(), got.keys() - expected.keys()
    wrong = {k: (got[k], expected[k]) for k in expected.keys() & got.keys() if got[k] != expected[k]}
    assert not (missing or unexpected or wrong), (sorted(missing)[:5], sorted(unexpected)[:5],
                                                  list(wrong.items())[:5])


@pytest.mark.parametrize(("name", "version", "encoder_class"), CASES)
def test_encoder_state_dict_matches_manifest(manifest_part, name, version, encoder_class):
    with torch.device("meta"):
        encoder = encoder_class()
    _assert_same_layout(expected_shapes(encoder), _group(manifest_part(name, ""), "id_adapter"))


@pytest.mark.parametrize(("name", "version", "encoder_class"), CASES)
def test_attention_layers_match_manifest(manifest_part, sdxl_unet, name, version, encoder_class):
    with install_pulid_attention(sdxl_unet) as installation:
        layers = installation.numbered_layers()
        assert len(layers) == len(sdxl_unet.attn_processors) == 140
        _assert_same_layout(expected_shapes(layers),
                            _group(manifest_part(name, ""), "id_adapter_attn_layers"))


@pytest.mark.parametrize(("name", "version", "encoder_class"), CASES)
def test_numbering_equals_manifest(sdxl_unet, name, version, encoder_class):
    (numbering,) = json.loads((MANIFESTS / f"{name}.json").read_text())["numbering"].values()
    ours = pulid_processor_numbering(sdxl_unet)
    assert {str(number): processor for number, processor in ours.items()} == numbering


@pytest.mark.parametrize(("name", "version", "encoder_class"), CASES)
def test_loader_accepts_the_official_layout(manifest_part, sdxl_unet, name, version,
                                            encoder_class):
    flat = manifest_part(name, "")
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in flat.items()}
    before = dict(sdxl_unet.attn_processors)
    loaded = load_pulid(state_dict, sdxl_unet)
    try:
        assert loaded.version == version
        assert isinstance(loaded.encoder, encoder_class)
        assert len(loaded.attention.processors) == 70
        counted = sum(t.numel() for t in loaded.encoder.state_dict().values()) + sum(
            t.numel() for t in loaded.attention.numbered_layers().state_dict().values())
        assert counted == sum(torch.Size(shape).numel() for shape in flat.values())
    finally:
        loaded.attention.uninstall()
    assert all(sdxl_unet.attn_processors[key] is value for key, value in before.items())


@pytest.mark.parametrize(("name", "version", "other"), [("pulid_v1", "v1", "v1.1"),
                                                        ("pulid_v1.1", "v1.1", "v1")])
def test_loader_names_a_version_mismatch(manifest_part, sdxl_unet, name, version, other):
    state_dict = {key: torch.empty(shape, device="meta")
                  for key, shape in manifest_part(name, "").items()}
    with pytest.raises(CheckpointError, match=f"PuLID {version} checkpoint but version '{other}'"):
        load_pulid(state_dict, sdxl_unet, version=other)
