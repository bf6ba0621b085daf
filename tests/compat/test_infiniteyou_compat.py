"""InfiniteYou's checkpoints at real size, on the meta device (keys and shapes of both
published files), and the loaders' refusals: another method's file, a pickle that runs
code, a file with missing or unknown keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bf_backends.infiniteyou.loader import (
    PUBLISHED_INFUSENET_CONFIG,
    PUBLISHED_RESAMPLER,
    attach_infiniteyou,
    check_image_proj,
    check_infusenet_config,
    image_proj_shapes,
    infusenet_expected_shapes,
    load_image_proj,
    load_infusenet,
    read_image_proj,
)
from bf_backends.infiniteyou.modules import InfiniteYouResampler
from bf_backends.infiniteyou.testing import tiny_image_proj, write_tiny_checkpoints
from bf_core.checkpoints import check_state_dict, expected_shapes
from bf_core.errors import CheckpointError, ConfigError
from bf_core.testing.tiny_flux import tiny_flux_pipeline

pytestmark = pytest.mark.compat

MANIFESTS = Path(__file__).parents[1] / "fixtures" / "manifests"


def _manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def _image_proj_manifest() -> dict[str, tuple[int, ...]]:
    """The manifest's ``image_proj.``-prefixed keys, prefix removed."""
    tensors = _manifest("infiniteyou_image_proj_model")["tensors"]
    return {key.removeprefix("image_proj."): tuple(shape) for key, shape in tensors.items()}


def _meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


# --------------------------------------------------------------------------- image_proj


def test_our_resampler_has_the_published_image_proj_layout():
    manifest = _manifest("infiniteyou_image_proj_model")
    expected = _image_proj_manifest()
    assert all(key.startswith("image_proj.") for key in manifest["tensors"])
    with torch.device("meta"):
        resampler = InfiniteYouResampler(PUBLISHED_RESAMPLER)
    assert expected_shapes(resampler) == expected == image_proj_shapes(PUBLISHED_RESAMPLER)
    assert len(expected) == manifest["num_tensors"]
    assert sum(p.numel() for p in resampler.parameters()) == manifest["num_params"]
    assert manifest["io"] == {"in": "(B, 1, 512) arcface embedding", "out": "(B, 8, 4096)"}
    with torch.device("meta"):
        assert resampler(torch.empty(2, 1, 512)).shape == (2, 8, 4096)

def test_the_published_image_proj_passes_our_strict_check():
    shape = check_image_proj(_meta(_image_proj_manifest()), output_dim=4096)
    assert shape == PUBLISHED_RESAMPLER


@pytest.mark.parametrize("change", ["missing", "unknown", "wrong shape", "other width"])
def test_a_published_size_image_proj_must_match_the_manifest_exactly(change):
    shapes = _image_proj_manifest()
    if change == "missing":
        del shapes["layers.3.1.3.weight"]
    elif change == "unknown":
        shapes["layers.4.0.to_q.weight"] = (1280, 1280)
    elif change == "wrong shape":
        shapes["proj_out.weight"] = (4096, 1024)
    else:  # a 1024-wide Resampler is not the published one at T5 width
        shapes = {key: tuple(1024 if n == 1280 else n for n in shape)
                  for key, shape in shapes.items()}
    with pytest.raises(CheckpointError) as error:
        check_image_proj(_meta(shapes), output_dim=4096, where="image_proj_model.bin")
    message = str(error.value)
    assert "image_proj_model.bin" in message
    if change == "missing":
        assert "missing key(s): layers.3.1.3.weight" in message
    if change == "unknown":
        assert "unexpected key(s): layers.4.0.to_q.weight" in message


def test_a_file_with_missing_keys_is_refused_naming_the_file_and_the_keys(tmp_path):
    state = tiny_image_proj(32)
    del state["norm_out.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "image_proj_model.bin"
    torch.save({"image_proj": state}, str(path))
    with pytest.raises(CheckpointError) as error:
        load_image_proj(path, output_dim=32)
    message = str(error.value)
    assert str(path) in message and "norm_out.bias" in message and "extra.weight" in message


def test_another_method_s_checkpoint_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    instantid = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"latents": torch.zeros(1, 16, 64),
                               "proj_in.weight": torch.zeros(64, 512)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}}, str(instantid))
    with pytest.raises(CheckpointError, match=r"ip-adapter\.bin is not an InfiniteYou .*InstantID"):
        read_image_proj(instantid)
    pulid = tmp_path / "pulid_flux_v0.9.1.safetensors"
    save_file({"pulid_encoder.latents": torch.zeros(1, 32, 8),
               "pulid_ca.0.to_q.weight": torch.zeros(4, 4)}, str(pulid))
    with pytest.raises(CheckpointError, match="PuLID-FLUX"):
        read_image_proj(pulid)
    xlabs = tmp_path / "ip_adapter.safetensors"
    save_file({"ip_adapter_proj_model.proj.weight": torch.zeros(4, 4),
               "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight":
                   torch.zeros(4, 4)}, str(xlabs))
    with pytest.raises(CheckpointError, match="XLabs FLUX IP-Adapter"):
        read_image_proj(xlabs)


class _RunsCode:
    """Unpickling this would create a folder: code the loader must never execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "image_proj_model.bin"
    torch.save({"image_proj": {"latents": _RunsCode(marker)}}, str(path))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_image_proj(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- InfuseNet


def test_the_published_infusenet_config_builds_the_manifest_key_for_key():
    manifest = _manifest("infiniteyou_infusenet")
    assert manifest["config_assumed"] == PUBLISHED_INFUSENET_CONFIG
    expected = {key: tuple(shape) for key, shape in manifest["tensors"].items()}
    built = infusenet_expected_shapes(PUBLISHED_INFUSENET_CONFIG)
    assert built == expected and len(built) == manifest["num_tensors"]
    check_infusenet_config({"_class_name": "FluxControlNetModel", **PUBLISHED_INFUSENET_CONFIG},
                           "InfuseNetModel")
    check_state_dict(_meta(expected), built, "InfuseNet")  # the published tensors pass


@pytest.mark.parametrize("change, named", [
    ({"num_layers": 5}, "not InfiniteYou's InfuseNet"),
    ({"guidance_embeds": False}, "not InfiniteYou's InfuseNet"),
    ({"num_mode": 10}, "ControlNet-Union"),
    ({"conditioning_embedding_channels": 16}, "XLabs-style"),
    ({"_class_name": "ControlNetModel"}, "IdentityNet"),
    ({"_class_name": "FluxTransformer2DModel"}, "FLUX.1 base transformer"),
])
def test_another_flux_or_sdxl_controlnet_config_is_refused_by_name(change, named):
    config = {"_class_name": "FluxControlNetModel", **PUBLISHED_INFUSENET_CONFIG, **change}
    with pytest.raises(CheckpointError, match=named):
        check_infusenet_config(config, "InfuseNetModel")


def test_an_infusenet_folder_with_other_tensors_is_refused_before_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = tiny_flux_pipeline(seed=0)
    folder = write_tiny_checkpoints(tmp_path, pipe) / "InfuseNetModel"
    load_infusenet(folder)  # the folder as written loads
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["controlnet_x_embedder.weight"]
    state["input_hint_block.conv_in.weight"] = torch.zeros(2, 2)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as error:
        load_infusenet(folder)
    message = str(error.value)
    assert str(folder) in message and "controlnet_x_embedder.weight" in message
    assert "input_hint_block.conv_in.weight" in message


def test_attach_refuses_an_infusenet_that_does_not_fit_the_transformer(tmp_path):
    from diffusers import FluxControlNetModel

    pipe = tiny_flux_pipeline(seed=0)
    folder = write_tiny_checkpoints(tmp_path, pipe)
    config = {**dict(FluxControlNetModel.load_config(str(folder / "InfuseNetModel"))),
              "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="inner width"):
        attach_infiniteyou(pipe, FluxControlNetModel.from_config(config),
                           folder / "image_proj_model.bin")
    assert getattr(pipe, "infiniteyou", None) is None
