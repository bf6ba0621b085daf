"""PuLID backend end to end on the tiny pipeline: conformance kit, baseline parity, ID state.

The reference for the baseline is the official v1 call (docs/backends/pulid.md): the stock diffusers pipeline with ``cross_attention_kwargs={"id_embedding":
[E_neg ; E], "id_scale": s}``, a text-encoded negative prompt, and E / E_neg computed here
step by step as the official code does (largest face, FFHQ alignment, parsing, whitened grey crop,
bicubic without antialias, CLIP normalisation, hidden states of blocks 3/7/11/15/19).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bf_core
from bf_backends.pulid.attention import PULID_MODES, PuLIDAttentionConfig
from bf_backends.pulid.testing import tiny_face_image, tiny_pipeline
from bf_core.errors import ConfigError
from bf_core.testing import BackendConformance, add_tiny_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
STEPS, SIZE = 4, 64  # SDXL-Lightning's 4 steps


# ------------------------------------------------------------------ the spec's reference

def _spec_features(pipe, image) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """id_cond (1, 512 + E) and five hidden states, following the official face pipeline literally."""
    import cv2

    extractor = pipe.pulid.features
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    faces = extractor.analyzer.app.get(bgr)
    face = sorted(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1]
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(face.kps, np.float32), FFHQ_512,
                                            method=cv2.LMEDS)
    aligned_bgr = cv2.warpAffine(bgr, matrix, (512, 512), borderMode=cv2.BORDER_CONSTANT,
                                 borderValue=(135, 133, 132))
    rgb = torch.from_numpy(aligned_bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    imagenet = (rgb - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    labels = extractor.parser(imagenet)[0].argmax(dim=1, keepdim=True)
    removed = sum(labels == i for i in (0, 16, 18, 7, 8, 9, 14, 15)).bool()
    grey = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).repeat(1, 3, 1, 1)
    masked = torch.where(removed, torch.ones_like(grey), grey)
    tower = extractor.vision.tower
    side = extractor.vision.image_size
    pixels = F.interpolate(masked, (side, side), mode="bicubic", align_corners=False,
                           antialias=False)
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1)
    # The stand-in tower's forward written out, keeping the outputs of blocks 3, 7, ..., 19.
    tokens = tower.patch_embed(pixels).flatten(2).transpose(1, 2)
    tokens = torch.cat([tower.cls_token, tokens], dim=1) + tower.pos_embed
    hidden = []
    for index, block in enumerate(tower.blocks):
        tokens = block(tokens)
        if index in (3, 7, 11, 15, 19):
            hidden.append(tokens)
    clip = tower.head(tower.norm(tokens)[:, 0])
    arcface = torch.from_numpy(np.asarray(face.embedding, np.float32))[None]
    return torch.cat([arcface, clip / clip.norm(dim=1, keepdim=True)], dim=1), hidden


@functools.lru_cache(maxsize=4)
def spec_embeddings(version: str, images: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, E_neg) of the tiny pipeline ``version`` for ``images`` copies of test photos."""
    pipe = tiny_pipeline(version)
    encoder = pipe.pulid.encoder
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = [_spec_features(pipe, tiny_face_image(seed)) for seed in range(images)]
        zero_hidden = [torch.zeros_like(h) for h in feats[0][1]]
        negative = encoder(torch.zeros_like(feats[0][0]), zero_hidden)
        if version == "v1.1":
            id_cond = torch.stack([f[0][0] for f in feats])[None]
            hidden = [torch.cat([f[1][s] for f in feats], dim=1) for s in range(5)]
            return encoder(id_cond, hidden), negative
        # v1 without ID Mix: supplementary images add their first five tokens only.
        positive = torch.cat([encoder(*f)[:, : (10 if i == 0 else 5)] for i, f in
                              enumerate(feats)], dim=1)
        negatives = torch.cat([negative[:, : (10 if i == 0 else 5)] for i in range(images)], 1)
        return positive, negatives


def official_call(pipe, embedding, config: PuLIDAttentionConfig, **kwargs):
    """The stock pipeline with the ID tokens passed as the official code passes them."""
    with pipe.pulid.state.using(None, config):
        return pipe(negative_prompt="", cross_attention_kwargs={"id_embedding": embedding,
                                                                "id_scale": config.id_scale},
                    **kwargs).images


def call_kwargs(seed: int = 0, **overrides):
    kwargs = dict(prompt="a person is kneeling by a small lake", num_inference_steps=STEPS,
                  height=SIZE, width=SIZE, output_type="np", guidance_scale=1.2,
                  generator=torch.Generator().manual_seed(seed))
    kwargs.update(overrides)
    return kwargs


def identity_kwargs(images: int = 1):
    return {"id_images": [tiny_face_image(seed) for seed in range(images)]}


# ------------------------------------------------------------------ conformance kit

class TestPuLIDConformance(BackendConformance):
    backend_name = "pulid"
    merges_lines = True

    def make_pipeline(self):
        return tiny_pipeline("v1.1")

    def identity_kwargs(self):
        return identity_kwargs()

    def stock_kwargs(self):
        positive, negative = spec_embeddings("v1.1")
        return {"negative_prompt": "", "cross_attention_kwargs": {
            "id_embedding": torch.cat([negative, positive]), "id_scale": 0.8}}


# ------------------------------------------------------------------ must show

@pytest.mark.parametrize("version", ["v1", "v1.1"])
@pytest.mark.parametrize("mode", sorted(PULID_MODES))
def test_baseline_is_the_official_algorithm_bit_for_bit_and_dli_differs(version, mode):
    pipe = tiny_pipeline(version)
    positive, negative = spec_embeddings(version)
    assert positive.shape[1] == (10 if version == "v1" else 32)  # T_id
    config = PuLIDAttentionConfig.from_mode(mode)
    official = official_call(pipe, torch.cat([negative, positive]), config, **call_kwargs())
    bf = bf_core.wrap(pipe)
    baseline = bf(**call_kwargs(), **identity_kwargs(), pulid_mode=mode,
                  config=bf_core.BFConfig(enabled=False)).images
    np.testing.assert_array_equal(baseline, official)
    dual = bf(**call_kwargs(), **identity_kwargs(), pulid_mode=mode).images
    assert np.isfinite(dual).all() and np.abs(dual - baseline).max() > 1e-3


def test_supplementary_images_extend_v1_tokens_as_the_demo_does():
    pipe = tiny_pipeline("v1")
    positive, negative = spec_embeddings("v1", images=2)
    assert positive.shape[1] == 15  # 10 + the second image's 5 global tokens (ID Mix off)
    config = PuLIDAttentionConfig.from_mode("fidelity")
    official = official_call(pipe, torch.cat([negative, positive]), config, **call_kwargs())
    baseline = bf_core.wrap(pipe)(**call_kwargs(), **identity_kwargs(2),
                                  config=bf_core.BFConfig(enabled=False)).images
    np.testing.assert_array_equal(baseline, official)


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_guidance_one_uses_the_official_single_sequence_per_sample(images_per_prompt):
    # At CFG 1.0 the official processors see [E_neg ; 0_Z ; E ; 0_Z] with NUM_ZERO 0 on the
    # one positive branch; with several samples the official code splits that sequence
    # across them, we give each sample all of it.
    pipe = tiny_pipeline("v1")
    positive, negative = spec_embeddings("v1")
    zeros = torch.zeros(1, 8, positive.shape[-1])
    sequence = torch.cat([negative, zeros, positive, zeros], dim=1)
    config = PuLIDAttentionConfig(num_zero=0, ortho="ortho_v2", id_scale=0.8)
    kwargs = call_kwargs(guidance_scale=1.0, num_images_per_prompt=images_per_prompt)
    official = official_call(pipe, sequence, config, **kwargs)
    baseline = bf_core.wrap(pipe)(**call_kwargs(guidance_scale=1.0,
                                                num_images_per_prompt=images_per_prompt),
                                  **identity_kwargs(), config=bf_core.BFConfig(enabled=False))
    np.testing.assert_array_equal(baseline.images, official)


def test_lightning_four_steps_give_m1_m2_one_and_two_id_steps():
    # One UNet call per line, so the calls show where the ID line runs.
    out = bf_core.wrap(tiny_pipeline("v1"), config=bf_core.BFConfig(batch_lines=False))(
        **call_kwargs(), **identity_kwargs())
    assert (out.diagnostics["idaf_start"], out.diagnostics["idap_start"]) == (1, 1)
    assert out.diagnostics["model_calls"] == STEPS + 2  # ID line at steps 2 and 3 only


def test_semantic_line_is_plain_sdxl():
    # Only the semantic line (IdAF and IdAP off) must be the untouched SDXL pipeline,
    # with its own zeroed negative prompt and no ID tokens anywhere.
    pipe = tiny_pipeline("v1.1")
    plain = pipe(**call_kwargs()).images
    semantic = bf_core.wrap(pipe)(**call_kwargs(), **identity_kwargs(), config=bf_core.BFConfig(
        use_idaf=False, use_idap=False)).images
    np.testing.assert_array_equal(semantic, plain)


def _state_snapshot(pipe):
    state = pipe.pulid.state
    return ([(name, id(p)) for name, p in pipe.unet.attn_processors.items()],
            state.id_embedding, state.config, state.enabled)


def test_processors_and_id_state_restored_after_a_forced_failure_mid_loop():
    pipe = tiny_pipeline("v1")
    before = _state_snapshot(pipe)
    reference = pipe(**call_kwargs()).images

    def fail_after_the_id_line_started(pipeline, step, timestep, tensors):
        assert pipeline.pulid.state.enabled  # the ID line's state is live mid-loop
        if step == STEPS - 1:
            raise RuntimeError("forced failure")
        return tensors

    with pytest.raises(RuntimeError, match="forced failure"):
        bf_core.wrap(pipe)(**call_kwargs(), **identity_kwargs(), pulid_mode="extremely_style",
                           id_scale=2.0, callback_on_step_end=fail_after_the_id_line_started)
    assert _state_snapshot(pipe) == before
    np.testing.assert_array_equal(pipe(**call_kwargs()).images, reference)


def test_user_lora_keeps_working_in_every_line():
    pipe = tiny_pipeline("v1")
    no_lora = bf_core.wrap(pipe)(**call_kwargs(), **identity_kwargs(),
                                 config=bf_core.BFConfig(enabled=False)).images
    add_tiny_lora(pipe, adapter_name="style")
    positive, negative = spec_embeddings("v1")
    official = official_call(pipe, torch.cat([negative, positive]),
                             PuLIDAttentionConfig.from_mode("fidelity"), **call_kwargs())
    baseline = bf_core.wrap(pipe)(**call_kwargs(), **identity_kwargs(),
                                  config=bf_core.BFConfig(enabled=False)).images
    np.testing.assert_array_equal(baseline, official)
    assert np.abs(baseline - no_lora).max() > 1e-4


def test_shared_negative_matches_unshared_when_the_id_stays_on():
    pipe = tiny_pipeline("v1")
    bf = bf_core.wrap(pipe)
    kwargs = dict(**call_kwargs(guidance_scale=3.0), **identity_kwargs())
    config = bf_core.BFConfig(semantic_adapters="on", use_idap=False)
    separate = bf(**kwargs, config=config)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    shared = bf(**kwargs, config=bf_core.BFConfig(semantic_adapters="on", use_idap=False,
                                                  share_negative=True))
    assert shared.diagnostics["model_rows"] < separate.diagnostics["model_rows"]
    np.testing.assert_allclose(shared.images, separate.images, atol=1e-5)


def test_dual_line_without_reference_photos_is_a_named_error():
    with pytest.raises(ConfigError, match="id_images"):
        bf_core.wrap(tiny_pipeline("v1"))(**call_kwargs())


def test_baseline_without_reference_photos_is_plain_sdxl():
    # With the method off the photos are optional: no ID tokens, so the ID attention stays
    # off; the prompt is encoded as for every line with ID (a missing negative is "").
    pipe = tiny_pipeline("v1")
    plain = pipe(negative_prompt="", **call_kwargs()).images
    baseline = bf_core.wrap(pipe)(**call_kwargs(), config=bf_core.BFConfig(enabled=False))
    np.testing.assert_array_equal(baseline.images, plain)
