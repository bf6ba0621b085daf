"""InstantID checkpoints at real size, on the meta device: keys and shapes of both files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bf_backends.instantid.loader import (
    check_instantid_adapter,
    config_for_identitynet,
    cross_attention_numbering,
    ip_adapter_shapes,
    resampler_shapes,
)
from bf_core.checkpoints import expected_shapes
from bf_core.hosts.sdxl import sdxl_unet_config

pytestmark = pytest.mark.compat

SDXL_UNET_CONFIG = sdxl_unet_config()


def _meta_sdxl_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def _meta_state(shapes: dict, dtype=torch.float32) -> dict:
    return {key: torch.empty(shape, device="meta", dtype=dtype) for key, shape in shapes.items()}


def _manifest(name: str) -> dict:
    path = Path(__file__).parents[1] / "fixtures" / "manifests" / f"{name}.json"
    return json.loads(path.read_text())


def test_resampler_layout_equals_the_manifest(manifest_part):
    assert resampler_shapes() == manifest_part("instantid-ip-adapter", "image_proj")


def test_ip_adapter_layout_and_numbering_equal_the_manifest(manifest_part):
    unet = _meta_sdxl_unet()
    assert ip_adapter_shapes(unet) == manifest_part("instantid-ip-adapter", "ip_adapter")
    numbering = _manifest("instantid-ip-adapter")["numbering"]
    (table,) = numbering.values()
    ours = {str(k): f"{path}.processor" for k, path in cross_attention_numbering(unet).items()}
    assert ours == table
    assert len(ours) == 70 and min(map(int, ours)) == 1 and max(map(int, ours)) == 139


def test_published_adapter_passes_our_strict_check(manifest_part):
    state = {part: _meta_state(manifest_part("instantid-ip-adapter", part))
             for part in ("image_proj", "ip_adapter")}
    check_instantid_adapter(state, _meta_sdxl_unet())  # raises on any mismatch


def test_diffusers_builds_the_instantid_modules_from_the_published_layout(manifest_part):
    """diffusers' own conversion takes every key onto the modules it builds, by the same k."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    ip_part = manifest_part("instantid-ip-adapter", "ip_adapter")
    state = {"image_proj": _meta_state(manifest_part("instantid-ip-adapter", "image_proj"),
                                       torch.float16),
             "ip_adapter": _meta_state(ip_part, torch.float16)}
    unet = _meta_sdxl_unet()
    numbering = cross_attention_numbering(unet)
    with torch.device("meta"):
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    (projection,) = unet.encoder_hid_proj.image_projection_layers
    assert isinstance(projection, IPAdapterPlusImageProjection)
    assert (projection.proj_in.in_features, projection.proj_out.out_features) == (512, 2048)
    assert tuple(projection.latents.shape) == (1, 16, 1280)
    assert len(projection.layers) == 4 and projection.layers[0].attn.heads == 20
    # 51 official keys become 55 parameters: each to_kv splits into to_k and to_v.
    assert len(projection.state_dict()) == len(state["image_proj"]) + 4
    processors = unet.attn_processors
    for k, path in numbering.items():
        proc = processors[f"{path}.processor"]
        assert isinstance(proc, IPAdapterAttnProcessor2_0)
        assert tuple(proc.to_k_ip[0].weight.shape) == ip_part[f"{k}.to_k_ip.weight"]
        assert tuple(proc.to_v_ip[0].weight.shape) == ip_part[f"{k}.to_v_ip.weight"]
        assert proc.num_tokens == [16]


def test_identitynet_config_builds_the_published_controlnet_key_for_key(manifest_part):
    from diffusers import ControlNetModel

    with torch.device("meta"):
        net = ControlNetModel.from_config(config_for_identitynet())
    assert expected_shapes(net) == manifest_part("instantid-controlnet", "")
    published = {k: v for k, v in _manifest("instantid-controlnet")["config"].items()
                 if not k.startswith("_")}
    assert config_for_identitynet() == published
