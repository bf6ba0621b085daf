"""PhotoMaker checkpoints vs our modules, at real size on the meta device (no weights)."""

from __future__ import annotations

import pytest
import torch

from bf_backends.photomaker.loader import (
    check_lora_against_unet,
    convert_lora_to_peft,
    load_id_encoder,
    read_photomaker_checkpoint,
)
from bf_backends.photomaker.modules import ENCODER_CLASSES
from bf_core.checkpoints import expected_shapes
from bf_core.hosts.sdxl import sdxl_unet_config

pytestmark = pytest.mark.compat

VERSIONS = ["v1", "v2"]

SDXL_UNET_CONFIG = sdxl_unet_config()


def meta_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def meta_checkpoint(manifest_part, version: str) -> dict[str, dict[str, torch.Tensor]]:
    name = f"photomaker-{version}"
    return {part: meta_tensors(manifest_part(name, part)) for part in ("id_encoder",
                                                                        "lora_weights")}


@pytest.fixture(scope="module")
def sdxl_unet_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.mark.parametrize("version", VERSIONS)
def test_encoder_state_dict_equals_manifest(manifest_part, version):
    expected = manifest_part(f"photomaker-{version}", "id_encoder")
    with torch.device("meta"):
        encoder = ENCODER_CLASSES[version]()
    got = expected_shapes(encoder)
    assert sorted(got.keys() - expected.keys()) == []
    assert sorted(expected.keys() - got.keys()) == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_loads_strictly_on_meta(manifest_part, version):
    with torch.device("meta"):
        encoder = ENCODER_CLASSES[version]()
    tensors = meta_tensors(manifest_part(f"photomaker-{version}", "id_encoder"))
    result = encoder.load_state_dict(tensors, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("version", VERSIONS)
def test_loader_reads_manifest_layout_and_detects_version(manifest_part, version):
    loaded = read_photomaker_checkpoint(meta_checkpoint(manifest_part, version))
    assert loaded.version == version
    encoder = load_id_encoder(loaded)  # the default path: real size, built on meta
    assert type(encoder) is ENCODER_CLASSES[version]
    # The only buffer not stored in the file must have been given its real values.
    positions = encoder.vision_model.embeddings.position_ids
    assert not positions.is_meta
    assert torch.equal(positions[0], torch.arange(positions.shape[-1]))


@pytest.mark.parametrize("version", VERSIONS)
def test_every_lora_key_maps_onto_a_matching_sdxl_linear(manifest_part, sdxl_unet_meta,
                                                         version):
    lora = meta_tensors(manifest_part(f"photomaker-{version}", "lora_weights"))
    converted = convert_lora_to_peft(lora)
    assert len(converted) == len(lora)
    for key, tensor in converted.items():
        assert key.startswith("unet.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
        linear = sdxl_unet_meta.get_submodule(key[len("unet."):].rsplit(".lora_", 1)[0])
        assert isinstance(linear, torch.nn.Linear), key
        rank = tensor.shape[0] if key.endswith("lora_A.weight") else tensor.shape[1]
        if key.endswith("lora_A.weight"):
            assert tuple(tensor.shape) == (rank, linear.in_features), key
        else:
            assert tuple(tensor.shape) == (linear.out_features, rank), key
    check_lora_against_unet(converted, sdxl_unet_meta)


@pytest.mark.parametrize("version", VERSIONS)
def test_lora_covers_every_attention_projection(manifest_part, sdxl_unet_meta, version):
    converted = convert_lora_to_peft(
        meta_tensors(manifest_part(f"photomaker-{version}", "lora_weights")))
    targets = {key[len("unet."):].rsplit(".lora_", 1)[0] for key in converted}
    expected = {f"{name.removesuffix('.processor')}.{projection}"
                for name in sdxl_unet_meta.attn_processors
                for projection in ("to_q", "to_k", "to_v", "to_out.0")}
    assert targets == expected
