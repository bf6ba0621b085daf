"""The official XLabs FLUX IP-Adapter (``ip_adapter.safetensors``) at FLUX.1-dev size, on the
meta device: our strict layout equals the manifest, the manifest's keys pass our check and
land, through diffusers' own ``load_ip_adapter`` safetensors branch, on the IP processors
and the image projection; other files are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from bf_backends.xlabs_ipadapter import loader  # noqa: E402
from bf_core.errors import CheckpointError  # noqa: E402
from bf_core.hosts.flux import flux_dev_transformer_config  # noqa: E402

pytestmark = pytest.mark.compat

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "manifests"
XLABS = "xlabs_flux_ip_adapter"
DEV_CLIP_WIDTH = 768  # openai/clip-vit-large-patch14 image_embeds


def _manifest(name: str) -> dict:
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())


def _meta_tensors(shapes: dict) -> dict[str, torch.Tensor]:
    return {key: torch.empty(tuple(shape), device="meta") for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def manifest() -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in _manifest(XLABS)["tensors"].items()}


@pytest.fixture()
def dev_transformer():
    """FLUX.1-dev's transformer on the meta device (a fresh one: the loader installs into it)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**flux_dev_transformer_config())


def test_our_layout_at_flux_dev_size_is_the_manifest(manifest, dev_transformer):
    ours = loader.xlabs_shapes_for(dev_transformer, DEV_CLIP_WIDTH)
    assert ours == manifest
    counts = _manifest(XLABS)
    assert len(ours) == counts["num_tensors"] == 80
    assert sum(torch.Size(shape).numel() for shape in ours.values()) == counts["num_params"]


def test_the_manifest_passes_the_strict_check(manifest, dev_transformer):
    loader.check_xlabs_checkpoint(_meta_tensors(manifest),
                                  loader.xlabs_shapes_for(dev_transformer, DEV_CLIP_WIDTH),
                                  "ip_adapter.safetensors")


def test_missing_unknown_and_mis_shaped_keys_are_named(manifest, dev_transformer):
    expected = loader.xlabs_shapes_for(dev_transformer, DEV_CLIP_WIDTH)
    tensors = _meta_tensors(manifest)
    del tensors["double_blocks.7.processor.ip_adapter_double_stream_v_proj.bias"]
    tensors["double_blocks.19.processor.ip_adapter_double_stream_k_proj.weight"] = torch.empty(
        (3072, 4096), device="meta")
    tensors["ip_adapter_proj_model.proj.weight"] = torch.empty((16384, 1024), device="meta")
    with pytest.raises(CheckpointError) as raised:
        loader.check_xlabs_checkpoint(tensors, expected, "models/ip_adapter.safetensors")
    message = str(raised.value)
    assert "models/ip_adapter.safetensors" in message
    assert "1 missing key(s): double_blocks.7.processor.ip_adapter_double_stream_v_proj.bias" \
        in message
    assert "1 unexpected key(s): double_blocks.19.processor.ip_adapter_double_stream_k_proj" \
        ".weight" in message
    assert "ip_adapter_proj_model.proj.weight is (16384, 1024) but must be (16384, 768)" in message


def test_a_vit_h_image_encoder_is_refused_against_the_768_wide_file(manifest, dev_transformer):
    """The projection reads CLIP ViT-L/14's 768-d embeds: a 1024-d encoder does not fit."""
    with pytest.raises(CheckpointError, match=r"proj.weight is \(16384, 768\) but must be "
                                              r"\(16384, 1024\)"):
        loader.check_xlabs_checkpoint(_meta_tensors(manifest),
                                      loader.xlabs_shapes_for(dev_transformer, 1024), "file")


def _flat_sdxl_ip_adapter() -> dict[str, torch.Tensor]:
    parts = _manifest("ip-adapter_sdxl_vit-h")["parts"]
    return _meta_tensors({f"{part}.{key}": shape for part, tensors in parts.items()
                          for key, shape in tensors.items()})


@pytest.mark.parametrize(("tensors", "named"), [
    (_meta_tensors({"pulid_encoder.id_embedding_mapping.0.weight": (1024, 1280),
                    "pulid_ca.0.to_q.weight": (2048, 3072)}), "a PuLID-FLUX checkpoint"),
    (_flat_sdxl_ip_adapter(), "an SDXL IP-Adapter"),
    ({"image_proj": {}, "ip_adapter": {}}, "an SDXL IP-Adapter or InstantID .bin"),
    (_meta_tensors({"id_adapter.body.0.weight": (1024, 1280)}), "a PuLID SDXL checkpoint"),
    (_meta_tensors({"double_blocks.0.processor.qkv_lora1.down.weight": (16, 3072)}),
     "an XLabs FLUX LoRA"),
], ids=["pulid-flux", "sdxl-ip-adapter", "sdxl-ip-adapter-bin", "pulid-sdxl", "xlabs-lora"])
def test_checkpoints_of_other_methods_are_refused_by_name(tensors, named, dev_transformer):
    expected = loader.xlabs_shapes_for(dev_transformer, DEV_CLIP_WIDTH)
    with pytest.raises(CheckpointError, match=f"not an XLabs FLUX IP-Adapter: it looks like {named}"):
        loader.check_xlabs_checkpoint(tensors, expected, "some.safetensors")


class _MetaSafetensors:
    """What ``safe_open`` gives diffusers' loader, with meta tensors of the manifest's shapes."""

    def __init__(self, shapes: dict):
        self.shapes = shapes

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        return list(self.shapes)

    def get_tensor(self, key):
        return torch.empty(self.shapes[key], device="meta")


def test_diffusers_loader_puts_every_manifest_key_on_the_ip_modules(manifest, dev_transformer,
                                                                    tmp_path, monkeypatch):
    """diffusers' own ``load_ip_adapter`` (safetensors branch, key renames, strict loads) on
    the meta device: 19 IP processors with biased 4096 -> 3072 k/v, a 4-token projection,
    every parameter of the manifest and nothing else."""
    from diffusers.loaders import ip_adapter as diffusers_ip_adapter
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from bf_backends.xlabs_ipadapter.state import ip_attention_processors

    (tmp_path / "ip_adapter.safetensors").write_bytes(b"")  # found on disk, read through the fake
    monkeypatch.setattr(diffusers_ip_adapter, "safe_open", _MetaSafetensors(manifest))
    pipe = SimpleNamespace(transformer=dev_transformer)
    with torch.device("meta"):
        diffusers_ip_adapter.FluxIPAdapterMixin.load_ip_adapter(
            pipe, str(tmp_path), weight_name="ip_adapter.safetensors",
            image_encoder_pretrained_model_name_or_path=None, local_files_only=True,
            low_cpu_mem_usage=False)
    processors = ip_attention_processors(dev_transformer)
    assert len(processors) == 19
    assert all(name.startswith("transformer_blocks.") for name in processors)
    assert all(isinstance(p, FluxIPAdapterAttnProcessor) for p in processors.values())
    for proc in processors.values():
        for linear in (proc.to_k_ip[0], proc.to_v_ip[0]):
            assert (tuple(linear.weight.shape), tuple(linear.bias.shape)) == ((3072, 4096), (3072,))
    projection = dev_transformer.encoder_hid_proj.image_projection_layers[0]
    assert projection.num_image_text_embeds == loader.NUM_TOKENS
    loaded = sum(p.numel() for p in projection.parameters()) + sum(
        p.numel() for proc in processors.values() for p in proc.parameters())
    assert loaded == _manifest(XLABS)["num_params"]
