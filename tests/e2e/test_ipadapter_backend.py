"""The IP-Adapter backend end to end on tiny offline pipelines: the conformance kit for every
variant (the stock diffusers call is the baseline), the lines' definitions, scales restored,
several reference images, several images per prompt, named input errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("insightface")

from PIL import Image  # noqa: E402

import bf_core  # noqa: E402
from bf_backends.ipadapter import testing  # noqa: E402
from bf_backends.ipadapter.backend import IPAdapterBackend  # noqa: E402
from bf_backends.ipadapter.state import image_projection_layers, ip_attention_processors  # noqa: E402
from bf_core.errors import ConfigError, FaceNotFoundError, MultipleFacesError  # noqa: E402
from bf_core.faces import FaceAnalyzer, align_face  # noqa: E402
from bf_core.records import Person  # noqa: E402
from bf_core.testing import (  # noqa: E402
    BackendConformance,
    opened_session,
    pipeline_fingerprint,
    tiny_sdxl_pipeline,
)
from bf_core.testing.faces import make_random_insightface_pack  # noqa: E402

# The random detector finds faces all over a random photo; which one is taken is the policy's
# business (tested below with policy "error"), not these tests'.
pytestmark = pytest.mark.filterwarnings("ignore::bf_core.faces.MultipleFacesWarning")

PROMPT = "a person is kneeling by a small lake, touching the water"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one thread (see the ``one_thread`` fixture)."""


def photo(seed: int = 0, size: int = 96) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def analyzer_for(folder, face_logit_bias: float = 10.0) -> FaceAnalyzer:
    """A random buffalo_l-shaped pack: +10 finds faces in every photo, -10 none."""
    make_random_insightface_pack(folder, seed=0, face_logit_bias=face_logit_bias)
    return FaceAnalyzer(folder, det_size=(128, 128))


def model_card_faceid_embeds(analyzer: FaceAnalyzer, photos) -> torch.Tensor:
    """The FaceID model card's recipe: faces[0].normed_embedding, stacked, zeros as negative."""
    rows = [torch.from_numpy(analyzer.detect(p)[0].normed_embedding)[None] for p in photos]
    positive = torch.stack(rows, dim=0)[None]  # (1, N, 1, 512)
    return torch.cat([torch.zeros_like(positive), positive])


def model_card_face_crops(analyzer: FaceAnalyzer, photos) -> list[np.ndarray]:
    """norm_crop of faces[0] at 224 px on the OpenCV (BGR) photo, as the model card feeds CLIP."""
    crops = []
    for p in photos:
        rgb_crop = np.asarray(align_face(p, analyzer.detect(p)[0].kps, 224))
        crops.append(np.ascontiguousarray(rgb_crop[:, :, ::-1]))
    return crops


# ---------------------------------------------------------------------------------------
# The conformance kit, once per variant
# ---------------------------------------------------------------------------------------

class _IPAdapterConformance(BackendConformance):
    backend_name = "ipadapter"
    merges_lines = True
    variant = "plus-face"

    @pytest.fixture(autouse=True)
    def _faces(self, tmp_path_factory):
        if self.variant in testing.FACEID_VARIANTS:
            self.analyzer = analyzer_for(tmp_path_factory.mktemp("buffalo_l"))

    def make_pipeline(self):
        return testing.tiny_pipeline(self.variant, seed=0)

    def identity_kwargs(self):
        if self.variant in testing.FACEID_VARIANTS:
            return {"id_images": [photo()], "face_analyzer": self.analyzer}
        return {"id_images": [photo()]}

    def stock_kwargs(self):
        if self.variant in testing.FACEID_VARIANTS:
            return {"ip_adapter_image_embeds": [model_card_faceid_embeds(self.analyzer, [photo()])]}
        return {"ip_adapter_image": photo()}

    def stock_call(self, pipe, **kwargs):
        if self.variant != "faceid-plusv2":
            return pipe(**kwargs)
        # diffusers' FaceID-Plus recipe: CLIP state set on the projection, shortcut on for v2.
        layer = image_projection_layers(pipe)[0]
        prompts = kwargs["prompt"]
        rows = kwargs.get("num_images_per_prompt", 1) * (1 if isinstance(prompts, str) else len(prompts))
        crops = model_card_face_crops(self.analyzer, [photo()])
        layer.clip_embeds = pipe.prepare_ip_adapter_image_embeds([crops], None, torch.device("cpu"),
                                                                 rows, True)[0]
        layer.shortcut = True
        try:
            return pipe(**kwargs)
        finally:
            layer.clip_embeds, layer.shortcut = None, False


class TestViTH(_IPAdapterConformance):
    variant = "vit-h"


class TestBigG(_IPAdapterConformance):
    variant = "bigG"


class TestPlus(_IPAdapterConformance):
    variant = "plus"


class TestPlusFace(_IPAdapterConformance):
    variant = "plus-face"


class TestFaceID(_IPAdapterConformance):
    variant = "faceid"


class TestFaceIDPlusV2(_IPAdapterConformance):
    variant = "faceid-plusv2"


# ---------------------------------------------------------------------------------------
# Lines, scales, several images, named errors
# ---------------------------------------------------------------------------------------

def call_kwargs(seed: int = 0, **overrides):
    kwargs = dict(prompt=PROMPT, num_inference_steps=6, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    return analyzer_for(tmp_path_factory.mktemp("faces"))


def identity_kwargs_for(variant, analyzer):
    return {"id_images": [photo()], "face_analyzer": analyzer} \
        if variant in testing.FACEID_VARIANTS else {"id_images": [photo()]}


@pytest.mark.parametrize("variant", ["vit-h", "plus-face", "faceid", "faceid-plusv2"])
def test_semantic_line_alone_is_the_pipeline_without_the_adapter(variant, analyzer):
    """IP scale 0 with the embeds still passed, and the FaceID LoRA off, is exactly no adapter."""
    pipe = testing.tiny_pipeline(variant)
    semantic_only = bf_core.wrap(pipe, config=bf_core.BFConfig(use_idaf=False, use_idap=False))
    out = semantic_only(**call_kwargs(), **identity_kwargs_for(variant, analyzer)).images
    plain = tiny_sdxl_pipeline(seed=0)(**call_kwargs()).images
    np.testing.assert_array_equal(out, plain)


def _distinct_user_scales(pipe) -> list:
    """Per-layer scales a user might set, all different; returns them."""
    for number, proc in enumerate(ip_attention_processors(pipe)):
        proc.scale = [0.25 + 0.125 * number]
    return [list(proc.scale) for proc in ip_attention_processors(pipe)]


@pytest.mark.parametrize("variant", ["plus", "faceid-plusv2"])
def test_user_scales_restored_after_a_call_and_after_a_failure_mid_loop(variant, analyzer):
    pipe = testing.tiny_pipeline(variant)
    scales = _distinct_user_scales(pipe)
    processors = ip_attention_processors(pipe)
    bf = bf_core.wrap(pipe)
    bf(**call_kwargs(), **identity_kwargs_for(variant, analyzer))  # transformers adds hooks on first use
    before = pipeline_fingerprint(pipe)
    seen = []

    def watch(pipeline, step, timestep, tensors):
        seen.append([list(proc.scale) for proc in processors])  # between UNet calls
        if step == 4:
            raise RuntimeError("forced failure mid-loop")
        return tensors

    bf(**call_kwargs(), **identity_kwargs_for(variant, analyzer))
    assert [proc.scale for proc in processors] == scales
    assert pipeline_fingerprint(pipe) == before
    with pytest.raises(RuntimeError, match="forced failure"):
        bf(**call_kwargs(), **identity_kwargs_for(variant, analyzer), callback_on_step_end=watch)
    assert len(seen) == 5 and all(step == scales for step in seen)
    assert [proc.scale for proc in processors] == scales
    assert pipeline_fingerprint(pipe) == before
    assert image_projection_layers(pipe)[0].__dict__.get("clip_embeds") is None


@pytest.mark.parametrize("variant", ["vit-h", "plus-face", "faceid-plusv2"])
def test_id_line_runs_at_the_user_scales(variant, analyzer):
    """Halving the user's IP scale changes the method's output; the baseline follows it too."""
    pipe = testing.tiny_pipeline(variant)
    bf = bf_core.wrap(pipe)
    full = bf(**call_kwargs(), **identity_kwargs_for(variant, analyzer)).images
    pipe.set_ip_adapter_scale(0.5)
    half = bf(**call_kwargs(), **identity_kwargs_for(variant, analyzer)).images
    assert np.abs(full - half).max() > 1e-4
    assert all(proc.scale == [0.5] for proc in ip_attention_processors(pipe))


def test_precomputed_embeds_give_the_stock_baseline_and_the_same_method_output():
    pipe = testing.tiny_pipeline("plus")
    embeds = pipe.prepare_ip_adapter_image_embeds([photo()], None, torch.device("cpu"), 1, True)
    stacked = [embeds[0]]  # (2, 1, 257, hidden): [negative; positive] for one prompt
    stock = pipe(**call_kwargs(), ip_adapter_image_embeds=stacked).images
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))
    np.testing.assert_array_equal(off(**call_kwargs(), ip_adapter_image_embeds=stacked).images, stock)
    bf = bf_core.wrap(pipe)
    from_embeds = bf(**call_kwargs(), ip_adapter_image_embeds=stacked).images
    from_images = bf(**call_kwargs(), id_images=[photo()]).images
    np.testing.assert_array_equal(from_embeds, from_images)


@pytest.mark.parametrize("variant", ["vit-h", "plus"])
def test_several_reference_images_are_stacked_as_diffusers_stacks_them(variant):
    pipe = testing.tiny_pipeline(variant)
    references = [photo(0), photo(1)]
    stock = pipe(**call_kwargs(), ip_adapter_image=[references]).images
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))
    np.testing.assert_array_equal(off(**call_kwargs(), id_images=references).images, stock)
    with opened_session(pipe, prompt=PROMPT) as session:
        one = session.encoder.encode(Person(references))
    tokens = testing.PLAIN_TOKENS if variant == "vit-h" else testing.PLUS_QUERIES
    assert one.tokens.shape == (1, 2 * tokens, pipe.unet.config.cross_attention_dim)
    assert one.negative_tokens.shape == one.tokens.shape
    on = bf_core.wrap(pipe)(**call_kwargs(), id_images=references).images
    assert np.isfinite(on).all() and np.abs(on - stock).max() > 1e-4


def test_several_faces_for_faceid_follow_the_model_card(analyzer):
    pipe = testing.tiny_pipeline("faceid")
    references = [photo(0), photo(1)]
    stock = pipe(**call_kwargs(),
                 ip_adapter_image_embeds=[model_card_faceid_embeds(analyzer, references)]).images
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))
    out = off(**call_kwargs(), id_images=references, face_analyzer=analyzer).images
    np.testing.assert_array_equal(out, stock)


@pytest.mark.parametrize("variant", ["plus-face", "faceid-plusv2"])
def test_several_images_per_prompt_and_several_prompts_match_the_stock_call(variant, analyzer):
    pipe = testing.tiny_pipeline(variant)
    many = dict(prompt=[PROMPT, "a person riding a bike"], num_images_per_prompt=2)
    wrapped = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))
    out = wrapped(**call_kwargs(**many), **identity_kwargs_for(variant, analyzer)).images
    conformance = TestFaceIDPlusV2() if variant == "faceid-plusv2" else TestPlusFace()
    conformance.analyzer = analyzer
    stock = conformance.stock_call(pipe, **call_kwargs(**many), **conformance.stock_kwargs()).images
    assert out.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(out, stock)
    on = bf_core.wrap(pipe)(**call_kwargs(**many), **identity_kwargs_for(variant, analyzer)).images
    assert on.shape == (4, 64, 64, 3) and np.isfinite(on).all()


def test_without_cfg_the_embeds_have_no_negative_half():
    pipe = testing.tiny_pipeline("plus-face")
    no_cfg = call_kwargs(guidance_scale=1.0)
    stock = pipe(**no_cfg, ip_adapter_image=photo()).images
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))
    np.testing.assert_array_equal(off(**call_kwargs(guidance_scale=1.0), id_images=[photo()]).images,
                                  stock)
    on = bf_core.wrap(pipe)(**call_kwargs(guidance_scale=1.0), id_images=[photo()]).images
    assert np.isfinite(on).all() and np.abs(on - stock).max() > 1e-4


def test_shared_negative_with_adapters_on_changes_nothing_beyond_round_off(analyzer):
    """With the identity machinery on in both lines, the negative branch is computed once:
    the ID line then runs its positive rows only, with the FaceID-Plus CLIP state cut to them."""
    pipe = testing.tiny_pipeline("faceid-plusv2")
    kwargs = identity_kwargs_for("faceid-plusv2", analyzer)
    config = bf_core.BFConfig(semantic_adapters="on", use_idap=False)
    separate = bf_core.wrap(pipe, config=config)(**call_kwargs(), **kwargs)
    shared = bf_core.wrap(pipe, config=bf_core.BFConfig(
        semantic_adapters="on", use_idap=False, share_negative=True))(**call_kwargs(), **kwargs)
    assert shared.diagnostics["model_rows"] < separate.diagnostics["model_rows"]
    np.testing.assert_allclose(shared.images, separate.images, atol=1e-5)


def test_face_crop_channel_order_reaches_the_clip_encoder(analyzer):
    """BGR (the official scripts' order, the default) and RGB crops give different images."""
    pipe = testing.tiny_pipeline("faceid-plusv2")
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))
    bgr = off(**call_kwargs(), **identity_kwargs_for("faceid-plusv2", analyzer)).images
    rgb = off(**call_kwargs(), **identity_kwargs_for("faceid-plusv2", analyzer),
              face_crop_channels="rgb").images
    assert np.abs(bgr - rgb).max() > 1e-4


# ---------------------------------------------------------------------------------------
# Recognition and named errors
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", testing.VARIANTS)
def test_wrap_finds_the_backend_for_every_variant(variant):
    assert bf_core.wrap(testing.tiny_pipeline(variant)).backend.name == "ipadapter"


def test_pipelines_of_other_methods_are_not_claimed():
    backend = IPAdapterBackend()
    assert not backend.recognizes(tiny_sdxl_pipeline(seed=0))
    pipe = testing.tiny_pipeline("plus")
    pipe.controlnet = object()  # an InstantID-style pipeline: IP processors plus a ControlNet
    assert not backend.recognizes(pipe)


@pytest.fixture(scope="module")
def faceless_analyzer(tmp_path_factory):
    return analyzer_for(tmp_path_factory.mktemp("no_faces"), face_logit_bias=-10.0)


@pytest.mark.parametrize(("variant", "kwargs", "error", "message"), [
    ("plus", {}, ConfigError, "exactly one identity input"),
    ("plus", {"id_images": [photo()], "ip_adapter_image": photo()}, ConfigError,
     "id_images and ip_adapter_image"),
    ("plus", {"ip_adapter_image_embeds": [torch.zeros(2, 1, 257, 7)]}, ConfigError, "has shape"),
    ("faceid", {"ip_adapter_image_embeds": [torch.zeros(2, 1, 512)]}, ConfigError, "face embeddings"),
    ("plus", {"id_images": [photo()], "ip_adapter_scael": 0.5}, ConfigError, "ip_adapter_scael"),
    ("faceid-plusv2", {"id_images": [photo()], "face_crop_channels": "hsv"}, ConfigError,
     "face_crop_channels"),
    ("faceid", "no face", FaceNotFoundError, "no face was found in reference image 0"),
    ("faceid-plusv2", "several faces", MultipleFacesError, "face policy is 'error'"),
])
def test_bad_identity_inputs_raise_named_errors_and_leave_the_pipeline_as_it_was(
        variant, kwargs, error, message, analyzer, faceless_analyzer):
    if kwargs == "no face":
        kwargs = {"id_images": [photo()], "face_analyzer": faceless_analyzer}
    elif kwargs == "several faces":
        kwargs = {"id_images": [photo()], "face_analyzer": analyzer, "face_policy": "error"}
    pipe = testing.tiny_pipeline(variant)
    before = pipeline_fingerprint(pipe)
    with pytest.raises(error, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf_core.wrap(pipe)(**call_kwargs(), **kwargs)
    assert pipeline_fingerprint(pipe) == before
