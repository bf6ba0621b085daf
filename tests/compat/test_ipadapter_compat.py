"""The published IP-Adapter SDXL checkpoints against diffusers' loader, at real size on the
meta device: every key of each manifest lands on a module parameter of the same shape."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from bf_backends.ipadapter import state, testing  # noqa: E402
from bf_core.checkpoints import check_state_dict  # noqa: E402
from bf_core.hosts.sdxl import sdxl_unet_config

pytestmark = pytest.mark.compat

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "manifests"

MANIFESTS = {
    "ip-adapter_sdxl_vit-h": "vit-h",
    "ip-adapter-plus_sdxl_vit-h": "plus",
    "ip-adapter-plus-face_sdxl_vit-h": "plus-face",
    "ip-adapter-faceid_sdxl": "faceid",
    "ip-adapter-faceid-plusv2_sdxl": "faceid-plusv2",
}
PROJECTION_CLASS = {
    "vit-h": "ImageProjection",
    "bigG": "ImageProjection",
    "plus": "IPAdapterPlusImageProjection",
    "plus-face": "IPAdapterPlusImageProjection",
    "faceid": "IPAdapterFaceIDImageProjection",
    "faceid-plusv2": "IPAdapterFaceIDPlusImageProjection",
}
# CLIP width each projection reads: ViT-H projection_dim / hidden_size, bigG projection_dim.
REAL_IMAGE_EMBED_DIM = {"vit-h": 1024, "bigG": 1280, "plus": 1280, "plus-face": 1280,
                        "faceid": 1024, "faceid-plusv2": 1280}
SDXL_UNET = sdxl_unet_config()


def _sdxl_unet_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


@pytest.fixture(scope="module")
def sdxl_unet():
    return _sdxl_unet_on_meta()


def _meta_tensors(shapes: dict) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def _manifest_file(name: str) -> dict:
    """The whole manifest (counts, numbering), beside the parts the fixture reads."""
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())


def _numel(shapes) -> int:
    return sum(torch.Size(shape).numel() for shape in shapes)


@pytest.mark.parametrize(("name", "variant"), MANIFESTS.items())
def test_our_layout_rules_reproduce_the_manifest(name, variant, sdxl_unet, manifest_part):
    """The shape rules behind the tiny test adapters give exactly the published key sets."""
    image_proj = testing.image_proj_shapes(variant, 2048, REAL_IMAGE_EMBED_DIM[variant])
    check_state_dict(_meta_tensors(image_proj), manifest_part(name, "image_proj"), f"{name} image_proj")
    ip_adapter = testing.ip_adapter_shapes(sdxl_unet, variant, testing.REAL_FACEID_LORA_RANK)
    check_state_dict(_meta_tensors(ip_adapter), manifest_part(name, "ip_adapter"), f"{name} ip_adapter")


@pytest.mark.parametrize(("name", "variant"), MANIFESTS.items())
def test_image_proj_loads_into_the_diffusers_projection(name, variant, sdxl_unet, manifest_part):
    expected = manifest_part(name, "image_proj")
    with torch.device("meta"):  # the converter loads with strict=True into what it builds
        projection = sdxl_unet._convert_ip_adapter_image_proj_to_diffusers(
            _meta_tensors(expected), low_cpu_mem_usage=False)
    assert type(projection).__name__ == PROJECTION_CLASS[variant]
    # Keys are renamed and to_kv is split, so compare sizes: nothing dropped, nothing added.
    assert sum(p.numel() for p in projection.parameters()) == _numel(expected.values())
    assert sum(p.numel() for p in projection.parameters()) == \
        _manifest_file(name)["counts"]["image_proj"]["parameters"]


@pytest.mark.parametrize(("name", "variant"), MANIFESTS.items())
def test_ip_attention_keys_land_on_the_ip_processors(name, variant, sdxl_unet, manifest_part):
    expected = manifest_part(name, "ip_adapter")
    file_state = {"image_proj": _meta_tensors(manifest_part(name, "image_proj")),
                  "ip_adapter": _meta_tensors(expected)}
    with torch.device("meta"):
        processors = sdxl_unet._convert_ip_adapter_attn_to_diffusers([file_state],
                                                                     low_cpu_mem_usage=False)
    numbering = _manifest_file(name)["numbering"]["ip_adapter key number -> diffusers attention processor"]
    names_by_number = {str(number): name for number, name in enumerate(processors)}
    assert {number: names_by_number.get(number) for number in numbering} == numbering
    landed = {}
    for number, processor in enumerate(processors.values()):
        if hasattr(processor, "to_k_ip"):
            landed[f"{number}.to_k_ip.weight"] = tuple(processor.to_k_ip[0].weight.shape)
            landed[f"{number}.to_v_ip.weight"] = tuple(processor.to_v_ip[0].weight.shape)
    ip_keys = {key: shape for key, shape in expected.items() if "_ip." in key}
    assert landed == ip_keys
    assert len(landed) == 2 * 70  # one key/value pair per SDXL cross-attention layer


def _faceid_lora_targets(unet, file_state) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Each FaceID LoRA tensor, as diffusers converts it, with the Linear it would wrap."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    converted = unet._load_ip_adapter_loras([file_state])
    assert list(converted) == [0]
    # load_lora_adapter strips the "unet." prefix, then converts to PEFT names.
    peft_state = convert_unet_state_dict_to_peft(
        {key.removeprefix("unet."): value for key, value in converted[0].items()})
    targets = {}
    for key, tensor in peft_state.items():
        module_path, lora_part = key.rsplit(".lora_", 1)
        linear = unet.get_submodule(module_path)
        assert isinstance(linear, torch.nn.Linear), key
        targets[key] = (lora_part, tuple(tensor.shape), (linear.in_features, linear.out_features))
    return targets


@pytest.mark.parametrize("name", ["ip-adapter-faceid_sdxl", "ip-adapter-faceid-plusv2_sdxl"])
def test_faceid_lora_keys_map_onto_unet_linears(name, sdxl_unet, manifest_part):
    expected = manifest_part(name, "ip_adapter")
    lora_keys = [key for key in expected if "_lora." in key]
    assert len(lora_keys) == 140 * 8  # q, k, v, out x down, up on every processor
    file_state = {"image_proj": {}, "ip_adapter": _meta_tensors(expected)}
    targets = _faceid_lora_targets(sdxl_unet, file_state)
    assert len(targets) == len(lora_keys)
    for key, (part, shape, (in_features, out_features)) in targets.items():
        rank = testing.REAL_FACEID_LORA_RANK
        wanted = (rank, in_features) if part == "A.weight" else (out_features, rank)
        assert shape == wanted, f"{key}: {shape} does not fit Linear({in_features}, {out_features})"


@pytest.mark.parametrize("variant", ["vit-h", "bigG", "plus", "faceid", "faceid-plusv2"])
def test_detect_variant_at_real_size(variant, caplog):
    """bigG is not manifested; its file is vit-h's with proj.weight (8192, 1280)."""
    unet = _sdxl_unet_on_meta()
    file_state = {
        "image_proj": _meta_tensors(testing.image_proj_shapes(variant, 2048,
                                                               REAL_IMAGE_EMBED_DIM[variant])),
        "ip_adapter": _meta_tensors(testing.ip_adapter_shapes(unet, variant)),
    }
    with torch.device("meta"):
        unet._load_ip_adapter_weights([file_state], low_cpu_mem_usage=False)
    with caplog.at_level("WARNING", logger=state.__name__):
        assert state.detect_variant(SimpleNamespace(unet=unet, image_encoder=None)) == variant
    # Only the projection is loaded here, not the FaceID LoRA, which detection must notice.
    lora_missing = any("without its LoRA" in record.getMessage() for record in caplog.records)
    assert lora_missing == (variant in testing.FACEID_VARIANTS)
