"""PhotoMaker inputs that must fail with named errors, and the official pipeline wrapped.

No official package is imported: the official ``PhotoMakerStableDiffusionXLPipeline`` is
imitated by its attributes (``bf_backends.photomaker.testing.official_like``), with an ID
encoder that has the official call signature and, like the official one, overwrites the
prompt embedding it is given.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import bf_core
from bf_backends.photomaker.backend import PhotoMakerBackend
from bf_backends.photomaker.encoder import official_tokens_per_image
from bf_backends.photomaker.loader import load_photomaker
from bf_backends.photomaker.testing import (
    build_tiny_encoder,
    make_tiny_lora_weights,
    official_like,
    reference_photo_path,
    tiny_pipeline,
    write_tiny_checkpoint,
)
from bf_core.errors import CheckpointError, ConfigError, FaceNotFoundError, ImageInputError
from bf_core.faces import FaceAnalyzer
from bf_core.testing import pipeline_fingerprint, tiny_sdxl_pipeline
from bf_core.testing.faces import make_random_insightface_pack
from bf_core.testing.faults import RunsCodeWhenUnpickled

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PROMPT = "a person img walking on a beach"


def generate(pipe, **kwargs):
    kwargs = {"prompt": PROMPT, "id_images": [reference_photo_path()], "num_inference_steps": 4,
              "height": 64, "width": 64, "output_type": "np",
              "generator": torch.Generator().manual_seed(0), **kwargs}
    return bf_core.wrap(pipe)(**kwargs)


# --------------------------------------------------------------------------------------
# Named errors
# --------------------------------------------------------------------------------------


def test_a_photo_without_a_face_is_named(tmp_path):
    pipe = tiny_pipeline(version=2)
    no_faces = make_random_insightface_pack(tmp_path / "buffalo_l", face_logit_bias=-20.0)
    # transformers installs its hidden-state capture hooks on a text encoder's first call
    # and keeps them; make that call before taking the fingerprint.
    pipe.encode_prompt("warm up", device="cpu", num_images_per_prompt=1,
                       do_classifier_free_guidance=False)
    before = pipeline_fingerprint(pipe)
    analyzer = FaceAnalyzer(model=no_faces, providers=["CPUExecutionProvider"],
                            det_size=(128, 128))
    with pytest.raises(FaceNotFoundError, match=r"no face was found in reference image 0 \("):
        generate(pipe, face_analyzer=analyzer)
    assert pipeline_fingerprint(pipe) == before


def test_an_unreadable_image_is_named(tmp_path):
    broken = tmp_path / "me.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageInputError, match=r"reference image 1 \(.*me\.jpg\)"):
        generate(tiny_pipeline(version=1), id_images=[reference_photo_path(), broken])


def test_no_reference_images_is_named():
    with pytest.raises(ImageInputError, match="id_images"):
        generate(tiny_pipeline(version=1), id_images=None)


def test_v2_needs_one_face_embedding_per_image():
    with pytest.raises(ConfigError, match="one per image"):
        generate(tiny_pipeline(version=2), id_embeds=np.zeros((2, 512), np.float32))


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="start_merge_stp"):
        generate(tiny_pipeline(version=1), start_merge_stp=3)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photomaker")
    unet = tiny_sdxl_pipeline().unet
    return {version: write_tiny_checkpoint(folder / f"photomaker-{version}.bin", version,
                                           build_tiny_encoder(version), unet)
            for version in ("v1", "v2")}


def test_wrong_version_is_named(tiny_files):
    pipe = tiny_sdxl_pipeline()
    with pytest.raises(CheckpointError, match=r"version='v1' was asked for but .* is PhotoMaker "
                                              r"v2 \(its id_encoder has qformer_perceiver"):
        load_photomaker(pipe, tiny_files["v2"], version="v1", encoder=build_tiny_encoder("v1"))
    assert not hasattr(pipe, "photomaker")


def test_a_foreign_checkpoint_says_what_it_looks_like(tmp_path):
    path = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}}, path)
    with pytest.raises(CheckpointError, match="not a PhotoMaker checkpoint: it looks like an "
                                              "IP-Adapter"):
        load_photomaker(tiny_sdxl_pipeline(), path)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "photomaker-v2.bin"
    with open(path, "wb") as handle:
        pickle.dump({"id_encoder": RunsCodeWhenUnpickled(marker), "lora_weights": {}}, handle)
    with pytest.raises(CheckpointError):
        load_photomaker(tiny_sdxl_pipeline(), path)
    assert not marker.exists()


def test_offline_hub_id_names_the_file_to_place(monkeypatch):
    from bf_backends.photomaker.loader import resolve_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"photomaker-v2\.bin.*huggingface\.co/TencentARC"):
        resolve_checkpoint("TencentARC/PhotoMaker-V2")


# --------------------------------------------------------------------------------------
# The official pipeline, by duck typing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_official_pipeline_is_served_and_gives_our_pipeline_s_images(version):
    ours = tiny_pipeline(version=version)
    official = official_like(ours)
    assert official_tokens_per_image(official.id_encoder) == version  # not num_tokens
    assert not hasattr(official, "photomaker")
    assert bf_core.wrap(official).backend.name == "photomaker"
    extra = {} if version == 1 else {
        "face_analyzer": ours.photomaker.face_analyzer}
    for enabled in (True, False):
        config = bf_core.BFConfig(enabled=enabled)
        kwargs = dict(prompt=PROMPT, id_images=[reference_photo_path()], num_inference_steps=4,
                      height=64, width=64, output_type="np", start_merge_step=1, **extra)
        got = bf_core.wrap(official, config=config)(
            generator=torch.Generator().manual_seed(0), **kwargs).images
        expected = bf_core.wrap(ours, config=config)(
            generator=torch.Generator().manual_seed(0), **kwargs).images
        np.testing.assert_array_equal(got, expected)


def test_plain_sdxl_and_ip_adapter_pipelines_are_not_claimed():
    backend = PhotoMakerBackend()
    assert not backend.recognizes(tiny_sdxl_pipeline())
    pipe = tiny_pipeline(version=1)
    assert backend.recognizes(pipe)
    pipe.unet.encoder_hid_proj = torch.nn.Identity()  # what an IP-Adapter load leaves
    assert not backend.recognizes(pipe)


def test_encoder_follows_the_pipeline_dtype():
    pipe = tiny_pipeline(version=1)
    pipe.to(torch.float64)
    generate(pipe)
    assert pipe.photomaker.encoder.visual_projection.weight.dtype == torch.float64


def test_lora_is_loaded_unfused_under_its_own_name():
    pipe = tiny_pipeline(version=1)
    lora = make_tiny_lora_weights(pipe.unet, rank=4)
    assert pipe.get_list_adapters() == {"unet": ["photomaker"]}
    merged = [name for name, module in pipe.unet.named_modules() if getattr(module, "merged", False)]
    assert merged == []
    assert sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n) == sum(
        t.numel() for t in lora.values())
