"""PuLID-FLUX: our modules against the official checkpoint manifest (meta device), and the
loader's refusals of other methods' files and of a file that does not match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from bf_backends.pulid.modules import IDFormer
from bf_backends.pulid_flux.loader import (
    expected_pulid_flux_shapes,
    load_pulid_flux,
    read_pulid_flux_weights,
)
from bf_backends.pulid_flux.modules import PuLIDFluxConfig, positions_for
from bf_core.checkpoints import expected_shapes
from bf_core.errors import CheckpointError
from bf_core.hosts.flux import flux_dev_transformer_config

pytestmark = pytest.mark.compat

MANIFESTS = Path(__file__).parents[1] / "fixtures" / "manifests"


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def manifest_tensors(name: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in manifest(name)["tensors"].items()}


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def flux_dev_transformer():
    """FLUX.1-dev's transformer architecture on the meta device."""
    with torch.device("meta"):
        return FluxTransformer2DModel(**flux_dev_transformer_config())


def _assert_same_layout(got: dict, expected: dict) -> None:
    missing, unexpected = expected.keys() - got.keys(), got.keys() - expected.keys()
    wrong = {k: (got[k], expected[k]) for k in expected.keys() & got.keys()
             if got[k] != expected[k]}
    assert not (missing or unexpected or wrong), (sorted(missing)[:5], sorted(unexpected)[:5],
                                                  list(wrong.items())[:5])


def test_our_layout_is_the_manifest(flux_dev_transformer):
    ours = expected_pulid_flux_shapes(flux_dev_transformer.config, PuLIDFluxConfig())
    _assert_same_layout(ours, manifest_tensors("pulid_flux_v0.9.1"))


def test_the_encoder_is_pulids_idformer_with_its_defaults():
    with torch.device("meta"):
        encoder = IDFormer()
    flux_encoder = {key.split(".", 1)[1]: shape
                    for key, shape in manifest_tensors("pulid_flux_v0.9.1").items()
                    if key.startswith("pulid_encoder.")}
    _assert_same_layout(expected_shapes(encoder), flux_encoder)


def test_the_modules_follow_the_manifests_blocks(flux_dev_transformer):
    positions = positions_for(flux_dev_transformer.config, PuLIDFluxConfig())
    injection = manifest("pulid_flux_v0.9.1")["ca_injection"]
    assert [p.index for p in positions if p.blocks == "transformer_blocks"] == \
        injection["double_blocks"]
    assert [p.index for p in positions if p.blocks == "single_transformer_blocks"] == \
        injection["single_blocks"]
    assert len(positions) == manifest("pulid_flux_v0.9.1")["num_ca"]


def test_the_loader_accepts_the_official_layout_strictly(flux_dev_transformer):
    data = manifest("pulid_flux_v0.9.1")
    loaded = load_pulid_flux(meta_state_dict(manifest_tensors("pulid_flux_v0.9.1")),
                             flux_dev_transformer)
    assert len(loaded.cross_attention) == data["num_ca"]
    counted = sum(t.numel() for t in loaded.encoder.state_dict().values()) + sum(
        t.numel() for t in loaded.cross_attention.state_dict().values())
    assert counted == data["num_params"]
    assert all(p.is_meta for p in loaded.cross_attention.parameters())


def test_a_missing_and_an_unknown_key_are_named_with_the_file(tmp_path):
    from safetensors.torch import save_file

    from bf_backends.pulid_flux.testing import tiny_config, tiny_pulid_flux_state_dict
    from bf_core.testing.tiny_flux import tiny_flux_pipeline

    transformer = tiny_flux_pipeline().transformer
    state_dict = tiny_pulid_flux_state_dict(transformer)
    del state_dict["pulid_ca.1.to_out.weight"]
    state_dict["pulid_ca.2.to_q.weight"] = torch.zeros(2, 2)
    path = tmp_path / "pulid_flux_v0.9.1.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(CheckpointError) as error:
        load_pulid_flux(path, transformer, config=tiny_config())
    message = str(error.value)
    assert str(path) in message
    assert "missing key(s): pulid_ca.1.to_out.weight" in message
    assert "unexpected key(s): pulid_ca.2.to_q.weight" in message


def test_the_official_file_does_not_fit_a_transformer_of_another_size():
    from bf_core.testing.tiny_flux import tiny_flux_pipeline

    transformer = tiny_flux_pipeline().transformer
    with pytest.raises(CheckpointError, match="needs FLUX.1"):
        load_pulid_flux(meta_state_dict(manifest_tensors("pulid_flux_v0.9.1")), transformer)


@pytest.mark.parametrize(("flat", "says"), [
    (lambda: manifest_tensors("xlabs_flux_ip_adapter"), "XLabs FLUX IP-Adapter"),
    (lambda: {key: tuple(shape) for key, shape in manifest("pulid_v1.1")["parts"][""].items()},
     "SDXL PuLID checkpoint"),
    (lambda: manifest_tensors("infiniteyou_image_proj_model"), "InfiniteYou"),
    (lambda: {"double_blocks.0.img_attn.qkv.weight": (9216, 3072)},
     "FLUX transformer weights"),
], ids=["xlabs ip-adapter", "sdxl pulid v1.1", "infiniteyou resampler", "flux transformer"])
def test_another_methods_checkpoint_is_refused_by_name(flat, says):
    with pytest.raises(CheckpointError, match=says):
        read_pulid_flux_weights(meta_state_dict(flat()))


def test_a_file_with_extra_groups_or_a_missing_group_is_refused():
    shapes = manifest_tensors("pulid_flux_v0.9.1")
    extra = meta_state_dict({**shapes, "lora.weight": (4, 4)})
    with pytest.raises(CheckpointError, match=r"outside 'pulid_encoder.' and 'pulid_ca.'"):
        read_pulid_flux_weights(extra)
    encoder_only = meta_state_dict({k: s for k, s in shapes.items()
                                    if k.startswith("pulid_encoder.")})
    with pytest.raises(CheckpointError, match="no 'pulid_ca.' keys"):
        read_pulid_flux_weights(encoder_only)
