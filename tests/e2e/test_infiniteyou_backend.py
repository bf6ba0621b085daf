"""The InfiniteYou backend end to end on the tiny FLUX.1 pipeline (6 steps, 64 px, CPU).

Baseline parity is against ``reference_infiniteyou_call`` below: the official
``InfUFluxPipeline`` / ``FluxInfuseNetPipeline`` call restated from the spec (flux.md 4.3)
with diffusers' pieces, as diffusers' ``FluxControlNetPipeline`` would run with InfuseNet as
its ControlNet and T_id as the ControlNet's prompt embeddings. One documented difference
from both: the control image's VAE posterior sample is drawn from the call's generator
after the latents (the official pipeline draws it from the global RNG, diffusers' before
the latents), so the latents are those of the stock FluxPipeline.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import bf_core
from bf_backends.infiniteyou.control import black_canvas
from bf_backends.infiniteyou.loader import detach_infiniteyou
from bf_backends.infiniteyou.testing import reference_photo, tiny_face_analyzer, tiny_pipeline
from bf_backends.instantid.keypoints import draw_kps
from bf_core.errors import ConfigError, FaceNotFoundError
from bf_core.records import Person
from bf_core.testing import BackendConformance, batch_invariant_kernels, pipeline_fingerprint
from bf_core.testing.faces import ScriptedFaceDetector
from bf_core.testing.tiny_flux import tiny_flux_pipeline

# The random detector finds many overlapping "faces"; choosing the largest warns each time.
pytestmark = pytest.mark.filterwarnings("ignore::bf_core.faces.MultipleFacesWarning")

SIZE, STEPS = 64, 6
SHORT_TEXT = {"max_sequence_length": 64}  # T5 padded to 64 tokens, not 512: a faster suite
TRUE_CFG = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
REFERENCE = reference_photo(0)
OTHER_REFERENCE = reference_photo(5, size=(96, 80))
PROMPT = "a person is kneeling by a small lake, touching the water"


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    return tiny_face_analyzer(tmp_path_factory.mktemp("faces"), finds_faces=True)


@pytest.fixture(scope="module")
def pipe(analyzer, tmp_path_factory):
    return tiny_pipeline(seed=0, face_analyzer=analyzer, folder=tmp_path_factory.mktemp("infu"))


def call_kwargs(seed=0, **overrides):
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                  output_type="np", generator=torch.Generator().manual_seed(seed), **SHORT_TEXT)
    kwargs.update(overrides)
    return kwargs


def wrapped(pipe, **config):
    return bf_core.wrap(pipe, backend="infiniteyou", config=bf_core.BFConfig(**config))


def id_tokens(pipe, analyzer, photo=REFERENCE):
    """T_id as the official pipeline makes it: the largest face's normalised embedding
    (1, 1, 512) through the Resampler."""
    face = analyzer.embed([photo])[0]
    resampler = pipe.infiniteyou.resampler
    with torch.no_grad():
        return resampler(torch.from_numpy(face.normed_embedding)[None, None].float())


# --------------------------------------------------------------------------- the reference


def reference_infiniteyou_call(pipe, *, prompt, num_inference_steps, height, width, generator,
                               id_tokens, control_image, guidance_scale=3.5,
                               num_images_per_prompt=1, negative_prompt=None, true_cfg_scale=1.0,
                               max_sequence_length=512, output_type="np",
                               conditioning_scale=1.0, guidance_start=0.0, guidance_end=1.0,
                               infusenet_guidance_scale=1.0):
    """The official InfiniteYou call (spec flux.md 4.3), written out with diffusers' pieces."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    infusenet, transformer, vae = pipe.infiniteyou.infusenet, pipe.transformer, pipe.vae
    device = pipe._execution_device
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=max_sequence_length)
    true_cfg = true_cfg_scale > 1 and negative_prompt is not None
    if true_cfg:
        negative, negative_pooled, negative_ids = pipe.encode_prompt(
            prompt=negative_prompt, prompt_2=None, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
    rows = embeds.shape[0]
    tokens = id_tokens.expand(rows, -1, -1)
    token_ids = torch.zeros(tokens.shape[1], 3).to(device=device, dtype=pipe.text_encoder.dtype)
    latents, image_ids = pipe.prepare_latents(rows, transformer.config.in_channels // 4, height,
                                              width, embeds.dtype, device, generator)
    control = pipe.image_processor.preprocess(control_image, height=height, width=width)
    control = control.repeat_interleave(rows, dim=0).to(device=device, dtype=vae.dtype)
    control = vae.encode(control).latent_dist.sample(generator)
    control = (control - vae.config.shift_factor) * vae.config.scaling_factor
    control = pipe._pack_latents(control, rows, *control.shape[1:])
    config = pipe.scheduler.config
    mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device,
                                      sigmas=sigmas, mu=mu)
    total = len(timesteps)
    keep = [1.0 - float(i / total < guidance_start or (i + 1) / total > guidance_end)
            for i in range(total)]
    for i, t in enumerate(timesteps):
        timestep = t.expand(rows).to(latents.dtype)
        control_guidance = torch.tensor([infusenet_guidance_scale], device=device).expand(rows)
        block, single = infusenet(
            hidden_states=latents, controlnet_cond=control,
            conditioning_scale=conditioning_scale * keep[i], timestep=timestep / 1000,
            guidance=control_guidance if infusenet.config.guidance_embeds else None,
            pooled_projections=pooled, encoder_hidden_states=tokens, txt_ids=token_ids,
            img_ids=image_ids, joint_attention_kwargs={}, return_dict=False)
        guidance = torch.tensor([guidance_scale], device=device).expand(rows)
        noise = transformer(
            hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=embeds,
            controlnet_block_samples=block, controlnet_single_block_samples=single,
            txt_ids=text_ids, img_ids=image_ids, joint_attention_kwargs={}, return_dict=False,
            controlnet_blocks_repeat=False)[0]
        if true_cfg:  # the official negative pass: no InfuseNet residuals
            uncond = transformer(
                hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                pooled_projections=negative_pooled, encoder_hidden_states=negative,
                controlnet_block_samples=None, controlnet_single_block_samples=None,
                txt_ids=negative_ids, img_ids=image_ids, joint_attention_kwargs={},
                return_dict=False, controlnet_blocks_repeat=False)[0]
            noise = uncond + true_cfg_scale * (noise - uncond)
        latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return SimpleNamespace(images=pipe.image_processor.postprocess(image, output_type=output_type))


def official_call(pipe, analyzer, control_image=None, **kwargs):
    with torch.no_grad():
        return reference_infiniteyou_call(
            pipe, id_tokens=id_tokens(pipe, analyzer),
            control_image=control_image or black_canvas((kwargs["width"], kwargs["height"])),
            **kwargs)


# --------------------------------------------------------------------------- conformance


class TestInfiniteYouConformance(BackendConformance):
    backend_name = "infiniteyou"
    merges_lines = True
    steps, size = STEPS, SIZE

    @pytest.fixture(autouse=True)
    def _analyzer(self, analyzer, tmp_path, one_thread):
        self.analyzer, self.folder = analyzer, tmp_path

    def make_pipeline(self):
        return tiny_pipeline(seed=0, face_analyzer=self.analyzer, folder=self.folder)

    def identity_kwargs(self):
        return {"id_images": [REFERENCE], **SHORT_TEXT}

    def stock_kwargs(self):
        return dict(SHORT_TEXT)

    def stock_call(self, pipe, **kwargs):
        return official_call(pipe, self.analyzer, **kwargs)


class TestInfiniteYouTrueCFGConformance(TestInfiniteYouConformance):
    """With ``true_cfg_scale > 1`` and a negative prompt every line runs its negative pass,
    without InfuseNet."""

    def identity_kwargs(self):
        return {**super().identity_kwargs(), **TRUE_CFG}

    def stock_kwargs(self):
        return {**super().stock_kwargs(), **TRUE_CFG}


# --------------------------------------------------------------------------- the baseline


def test_baseline_is_the_official_call_with_a_window_a_scale_and_two_images(pipe, analyzer,
                                                                             one_thread):
    settings = dict(infusenet_conditioning_scale=0.7, infusenet_guidance_start=0.3,
                    infusenet_guidance_end=0.9)
    ours = wrapped(pipe, enabled=False)(**call_kwargs(num_images_per_prompt=2, **TRUE_CFG),
                                         id_images=[REFERENCE], **settings).images
    official = official_call(pipe, analyzer, conditioning_scale=0.7, guidance_start=0.3,
                             guidance_end=0.9,
                             **call_kwargs(num_images_per_prompt=2, **TRUE_CFG)).images
    assert ours.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(ours, official)


def test_baseline_with_reference_keypoints_is_the_official_call_with_that_control_image(
        pipe, analyzer, one_thread):
    face = analyzer.embed([REFERENCE])[0]
    # The official resize-and-pad of the 80 x 96 photo onto 64 x 64: 64 x 76, 6 rows up.
    moved = face.kps.astype(np.float64) * [64 / 80, 76 / 96] + [0, -6]
    ours = wrapped(pipe, enabled=False)(**call_kwargs(), id_images=[REFERENCE],
                                         kps="reference").images
    official = official_call(pipe, analyzer, control_image=draw_kps((SIZE, SIZE), moved),
                             **call_kwargs()).images
    np.testing.assert_array_equal(ours, official)
    black = official_call(pipe, analyzer, **call_kwargs()).images
    assert np.abs(official - black).max() > 1e-4  # the keypoints matter


class _Calls:
    """Records InfuseNet's inputs for each call (hook removed afterwards)."""

    def __init__(self, module):
        self.inputs: list[dict] = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.inputs.append({k: v.clone() if isinstance(v, torch.Tensor) else v
                            for k, v in kwargs.items()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_baseline_at_conditioning_scale_zero_is_the_stock_flux_pipeline(pipe, one_thread):
    """InfuseNet still runs (as officially), but its residuals are exact zeros and x + 0
    == x: the stock FluxPipeline's image, bit for bit, with the same latents."""
    stock = tiny_flux_pipeline(seed=0)(**call_kwargs()).images
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        off = wrapped(pipe, enabled=False)(**call_kwargs(), id_images=[REFERENCE],
                                            infusenet_conditioning_scale=0.0).images
    assert len(calls.inputs) == STEPS and {c["conditioning_scale"] for c in calls.inputs} == {0.0}
    np.testing.assert_array_equal(off, stock)
    on = wrapped(pipe, enabled=False)(**call_kwargs(), id_images=[REFERENCE]).images
    assert np.abs(on - stock).max() > 1e-4


# --------------------------------------------------------------------------- the lines


def test_the_semantic_line_alone_is_the_stock_flux_pipeline(pipe, one_thread):
    stock = tiny_flux_pipeline(seed=0)(**call_kwargs()).images
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        semantic_only = wrapped(pipe, use_idaf=False, use_idap=False)(
            **call_kwargs(), id_images=[REFERENCE]).images
    assert calls.inputs == []
    np.testing.assert_array_equal(semantic_only, stock)


class _TransformerCalls:
    """Records every base-transformer call that carries InfuseNet residuals."""

    def __init__(self, transformer):
        self.inputs: list[dict] = []
        self.handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if kwargs.get("controlnet_block_samples") is not None:
            self.inputs.append(dict(kwargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled", "true CFG"])
def test_zero_rows_of_a_merged_call_are_exactly_the_plain_transformer(pipe, cfg, one_thread):
    """In each merged call, the rows without InfuseNet (semantic, negative) get exact zero
    residuals, so they equal the same call without residuals bit for bit; the positive ID
    rows do not."""
    with _TransformerCalls(pipe.transformer) as calls:
        result = wrapped(pipe)(**call_kwargs(**cfg), id_images=[REFERENCE])
    m1 = result.diagnostics["idaf_start"]
    assert len(calls.inputs) == STEPS - m1 - 1  # one merged call per step with the ID line
    rows = 4 if cfg else 2  # [semantic (uncond, cond), ID (uncond, cond)] or [semantic, ID]
    for kwargs in calls.inputs:
        assert kwargs["hidden_states"].shape[0] == rows
        for sample in (*kwargs["controlnet_block_samples"],
                       *kwargs["controlnet_single_block_samples"]):
            assert not sample[:-1].any() and sample[-1].any()
        with torch.no_grad():
            with_residuals = pipe.transformer(**kwargs)[0]
            plain = pipe.transformer(**{**kwargs, "controlnet_block_samples": None,
                                        "controlnet_single_block_samples": None})[0]
        assert torch.equal(with_residuals[:-1], plain[:-1])
        assert not torch.equal(with_residuals[-1], plain[-1])


@pytest.mark.parametrize("cfg, branches", [({}, 1), (TRUE_CFG, 2)], ids=["distilled", "true CFG"])
def test_model_rows_and_infusenet_calls_follow_the_formula(pipe, cfg, branches, one_thread):
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        result = wrapped(pipe)(**call_kwargs(**cfg), id_images=[REFERENCE])
    m1 = result.diagnostics["idaf_start"]
    assert result.diagnostics["model_rows"] == branches * (STEPS + (STEPS - m1 - 1))
    # InfuseNet: once per ID-line step, on the positive rows only
    assert len(calls.inputs) == STEPS - m1 - 1
    assert all(c["hidden_states"].shape[0] == 1 for c in calls.inputs)
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        off = wrapped(pipe, enabled=False)(**call_kwargs(**cfg), id_images=[REFERENCE])
    assert off.diagnostics["model_rows"] == branches * STEPS and len(calls.inputs) == STEPS
    # T_id is T5-wide, so IdAP applies: K aggregated tokens per image
    assert result.diagnostics["idap_selection"].shape == (1, bf_core.IdAPConfig().num_tokens)


def test_semantic_adapters_on_runs_infusenet_on_the_semantic_line_too(pipe, one_thread):
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        result = wrapped(pipe, semantic_adapters="on")(**call_kwargs(), id_images=[REFERENCE])
    m1 = result.diagnostics["idaf_start"]
    assert len(calls.inputs) == STEPS + (STEPS - m1 - 1)


def test_a_shared_negative_pass_gives_the_same_image(pipe, one_thread):
    """Negative rows never carry InfuseNet, so the ID line may reuse the semantic line's
    (IdAP off: its tokens would make the semantic negative differ): the image is the same,
    bit for bit, with the ID line's negative rows not evaluated."""
    with batch_invariant_kernels():
        own = wrapped(pipe, use_idap=False)(**call_kwargs(output_type="latent", **TRUE_CFG),
                                            id_images=[REFERENCE])
        shared = wrapped(pipe, use_idap=False, share_negative=True)(
            **call_kwargs(output_type="latent", **TRUE_CFG), id_images=[REFERENCE])
    m1 = own.diagnostics["idaf_start"]
    assert own.diagnostics["model_rows"] - shared.diagnostics["model_rows"] == STEPS - m1 - 1
    assert torch.equal(shared.images, own.images)


def test_infusenet_runs_where_the_id_line_and_the_window_overlap(pipe, one_thread):
    start, end = 0.5, 0.9
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        result = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE],
                               infusenet_guidance_start=start, infusenet_guidance_end=end)
    m1 = result.diagnostics["idaf_start"]
    steps = [i for i in range(STEPS) if i > m1
             and not (i / STEPS < start or (i + 1) / STEPS > end)]
    assert 0 < len(steps) < STEPS - m1 - 1  # the window really cuts the ID line's steps
    assert len(calls.inputs) == len(steps)
    assert {c["conditioning_scale"] for c in calls.inputs} == {1.0}


def test_infusenet_reads_t_id_only_with_zero_text_ids_and_its_own_guidance(pipe, analyzer,
                                                                          one_thread):
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE], infusenet_guidance_scale=1.5)
    expected = id_tokens(pipe, analyzer)
    width = pipe.infiniteyou.infusenet.config.joint_attention_dim
    for c in calls.inputs:
        assert c["encoder_hidden_states"].shape == (1, 8, width)
        assert torch.equal(c["encoder_hidden_states"], expected)
        assert torch.equal(c["txt_ids"], torch.zeros(8, 3))
        assert c["guidance"].tolist() == [1.5]


# --------------------------------------------------------------------------- several people


def test_each_person_s_id_line_reads_that_person_s_t_id(pipe, analyzer, one_thread):
    people = [Person(id_images=[REFERENCE], region=(0.0, 0.0, 0.5, 1.0)),
              Person(id_images=[OTHER_REFERENCE], region=(0.5, 0.0, 1.0, 1.0))]
    with _Calls(pipe.infiniteyou.infusenet) as calls:
        result = wrapped(pipe)(**call_kwargs(), people=people)
    first, second = id_tokens(pipe, analyzer), id_tokens(pipe, analyzer, OTHER_REFERENCE)
    assert not torch.equal(first, second)
    assert len(calls.inputs) == 2 * (STEPS - result.diagnostics["idaf_start"] - 1)
    for call, c in enumerate(calls.inputs):  # per step: ID line 1, then ID line 2
        assert torch.equal(c["encoder_hidden_states"], first if call % 2 == 0 else second)
    with batch_invariant_kernels():
        merged = wrapped(pipe)(**call_kwargs(output_type="latent"), people=people)
        separate = wrapped(pipe, batch_lines=False)(**call_kwargs(output_type="latent"),
                                                    people=people)
    assert torch.equal(merged.images, separate.images)
    assert merged.diagnostics["model_calls"] == STEPS < separate.diagnostics["model_calls"]


# --------------------------------------------------------------------------- control images


class _ControlImages:
    """Records every image the VAE encodes: the control images ([-1, 1], (R, 3, H, W))."""

    def __init__(self, vae):
        self.images: list[torch.Tensor] = []
        self.handle = vae.encoder.register_forward_pre_hook(
            lambda module, args: self.images.append(args[0].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _drawn_extent(image: torch.Tensor):
    """(x0, y0, x1, y1) pixels where a (3, H, W) control image in [-1, 1] is not black."""
    ys, xs = np.nonzero((image.amax(0) > -1).numpy())
    return xs.min(), ys.min(), xs.max(), ys.max()


def test_kps_auto_places_the_reference_keypoints_at_the_preview_face(pipe, caplog, one_thread):
    face = (0.55, 0.2, 0.8, 0.45)
    detector = ScriptedFaceDetector([face])
    with caplog.at_level(logging.INFO, logger="bf_backends.infiniteyou"), \
            _ControlImages(pipe.vae) as control:
        auto = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE], kps="auto",
                             preview_face_analyzer=detector).images
    assert detector.seen == [(SIZE, SIZE)]  # the step-M1 preview, at the output size
    assert len(control.images) == 1  # encoded once, when the ID line first needs it
    x0, y0, x1, y1 = _drawn_extent(control.images[0][0])
    box = [v * SIZE for v in face]
    margin = 4  # the markers are drawn around keypoints that lie inside the face
    assert box[0] - margin <= x0 and x1 <= box[2] + margin
    assert box[1] - margin <= y0 and y1 <= box[3] + margin
    assert any("face box" in r.getMessage() for r in caplog.records)
    with _ControlImages(pipe.vae) as control:
        black = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE]).images
    assert (control.images[0] == -1).all()  # the default: the official black canvas
    assert np.abs(auto - black).max() > 1e-4


def test_kps_auto_without_a_preview_face_keeps_the_black_canvas(pipe, one_thread):
    nowhere = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE], kps="auto",
                            preview_face_analyzer=ScriptedFaceDetector([])).images
    black = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE], kps="none").images
    np.testing.assert_array_equal(nowhere, black)


def test_control_image_is_the_official_pose_photo_path(pipe, analyzer, one_thread):
    from bf_backends.infiniteyou.control import resize_and_pad

    pose = reference_photo(9, size=(120, 90))
    face = analyzer.embed([resize_and_pad(pose, (SIZE, SIZE))])[0]
    ours = wrapped(pipe, enabled=False)(**call_kwargs(), id_images=[REFERENCE],
                                         control_image=pose).images
    official = official_call(pipe, analyzer, control_image=draw_kps((SIZE, SIZE), face.kps),
                             **call_kwargs()).images
    np.testing.assert_array_equal(ours, official)


# --------------------------------------------------------------------------- identity inputs


def test_face_embeds_and_a_face_recognizer_replace_the_embedding(pipe, analyzer, one_thread):
    face = analyzer.embed([REFERENCE])[0]
    photos = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE]).images
    given = wrapped(pipe)(**call_kwargs(), face_embeds=face.normed_embedding[None]).images
    np.testing.assert_array_equal(given, photos)
    seen = []
    fixed = torch.randn(1, 512, generator=torch.Generator().manual_seed(4))

    def recognizer(crop):
        seen.append(crop)
        return fixed

    recognised = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE],
                               face_recognizer=recognizer).images
    (crop,) = seen
    assert crop.shape == (1, 3, 112, 112) and crop.min() >= -1 and crop.max() <= 1
    np.testing.assert_array_equal(
        recognised, wrapped(pipe)(**call_kwargs(), face_embeds=fixed).images)
    assert np.abs(recognised - photos).max() > 1e-4


def test_bad_inputs_are_named(pipe, tmp_path):
    blind = tiny_face_analyzer(tmp_path, finds_faces=False)
    bf = wrapped(pipe)
    with pytest.raises(ConfigError, match="kps must be one of"):
        bf(**call_kwargs(), id_images=[REFERENCE], kps="sideways")
    with pytest.raises(ConfigError, match="not both"):
        bf(**call_kwargs(), id_images=[REFERENCE], kps="auto", control_image=REFERENCE)
    with pytest.raises(ConfigError, match="infusenet_guidance_start/end"):
        bf(**call_kwargs(), id_images=[REFERENCE], infusenet_guidance_start=1.0)
    with pytest.raises(ConfigError, match="face_embeds were given"):
        bf(**call_kwargs(), face_embeds=np.ones((1, 512), np.float32), kps="reference")
    with pytest.raises(FaceNotFoundError, match="no face"):
        bf(**call_kwargs(), id_images=[REFERENCE], face_analyzer=blind)
    with pytest.raises(ConfigError, match="infusenet_conditioning"):
        bf(**call_kwargs(), id_images=[REFERENCE], infusenet_conditioning=1.0)


# --------------------------------------------------------------------------- recognition, state


def test_dreambooth_serves_the_pipeline_once_infiniteyou_is_detached(analyzer, tmp_path):
    pipe = tiny_pipeline(seed=0, face_analyzer=analyzer, folder=tmp_path)
    assert bf_core.wrap(pipe).backend.name == "infiniteyou"
    parts = detach_infiniteyou(pipe)
    assert parts is not None and bf_core.wrap(pipe).backend.name == "dreambooth"


def _parts_fingerprint(pipe):
    parts = pipe.infiniteyou
    return id(parts), pipeline_fingerprint(SimpleNamespace(components={
        "infusenet": parts.infusenet, "resampler": parts.resampler}))


class _Failure(RuntimeError):
    pass


def test_state_is_restored_after_a_failure_inside_infusenet(pipe, one_thread):
    reference = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE]).images
    before, parts_before = pipeline_fingerprint(pipe), _parts_fingerprint(pipe)
    calls = []

    def fail_on_the_second_call(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Failure("forced failure inside InfuseNet")

    handle = pipe.infiniteyou.infusenet.register_forward_pre_hook(fail_on_the_second_call,
                                                                   with_kwargs=True)
    try:
        with pytest.raises(_Failure):
            wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE])
    finally:
        handle.remove()
    assert pipeline_fingerprint(pipe) == before and _parts_fingerprint(pipe) == parts_before
    again = wrapped(pipe)(**call_kwargs(), id_images=[REFERENCE]).images
    np.testing.assert_array_equal(again, reference)


def test_the_demo_s_tiny_setup_comes_through_the_backend_s_extras(one_thread):
    from bf_core.plugins import get_registry

    extras = get_registry().extras("infiniteyou")
    setup = extras.tiny_setup(seed=0, host="flux")
    bf = bf_core.wrap(setup.pipe)
    assert bf.backend.name == "infiniteyou" and extras.speed_setup is not None
    images = bf(**call_kwargs(), **setup.identity, **setup.options).images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    with pytest.raises(ConfigError, match="FLUX.1 only"):
        extras.tiny_pipeline(seed=0, host="sdxl")
