"""InstantID model-side parts: keypoint drawing and geometry, loaders, line switches, reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bf_backends.instantid import keypoints as kp
from bf_backends.instantid.loader import (
    DEFAULT_IP_SCALE,
    check_instantid_adapter,
    cross_attention_numbering,
    describe_checkpoint,
    load_identitynet,
    load_instantid_adapter,
    read_instantid_adapter,
)
from bf_backends.instantid.reference import (
    reference_control_image,
    reference_id_tokens,
    reference_noise_prediction,
    reference_resampler,
    reference_unet,
)
from bf_backends.instantid.state import (
    capture_attention_state,
    ip_processors,
    preserved_attention_state,
    semantic_line,
    set_ip_scale,
)
from bf_backends.instantid.testing import (
    make_instantid_state_dict,
    tiny_identitynet,
    tiny_identitynet_config,
    write_tiny_ip_adapter_bin,
)
from bf_core.errors import CheckpointError, ConfigError
from bf_core.testing import tiny_sdxl_pipeline

# Keypoints on a 128 x 160 (width x height) canvas, far enough apart that the joint discs
# (radius 10) do not touch each other.
KPS = np.array([[40.0, 50.0], [88.0, 52.0], [64.0, 80.0], [45.0, 115.0], [85.0, 113.0]],
               dtype=np.float32)


# --------------------------------------------------------------------------- tiny SDXL


@pytest.fixture
def pipe():
    return tiny_sdxl_pipeline(seed=0)


def _unet_inputs(seed: int = 1, batch: int = 2, height: int = 64, width: int = 64):
    """Random UNet inputs of the tiny SDXL: latents, text context, added conditions."""
    g = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    return {
        "sample": torch.randn(batch, 4, height // 8, width // 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 77, 64, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                              "time_ids": time_ids.repeat(batch, 1)},
    }


def _face_embedding(seed: int = 2, count: int = 1) -> torch.Tensor:
    """A raw (unnormalised) face embedding (count, 512) of norm about 22, like ArcFace's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, 512, generator=g)


# --------------------------------------------------------------------------- keypoints


def test_draw_kps_canvas_size_background_and_joint_colours():
    image = kp.draw_kps((128, 160), KPS)
    array = np.asarray(image)
    assert image.mode == "RGB" and image.size == (128, 160)
    assert array.shape == (160, 128, 3) and array.dtype == np.uint8
    for (x, y), colour in zip(KPS, kp.KEYPOINT_COLORS, strict=True):
        assert tuple(array[int(y), int(x)]) == colour
        # Joint discs have an absolute radius of 10 px: 21 pixels across the centre row.
        row = array[int(y), int(x) - 12:int(x) + 13]
        assert (row == colour).all(-1).sum() == 2 * kp.JOINT_RADIUS + 1
    assert not array[:20].any() and not array[:, :15].any(), "background must stay black"


def test_draw_kps_limbs_are_dimmed_colour_of_their_first_keypoint():
    array = kp.draw_kps_array((128, 160), KPS)
    dimmed = {tuple(int(c * kp.LIMB_DIMMING) for c in colour) for colour in kp.KEYPOINT_COLORS}
    for first, nose in kp.LIMBS:
        # A point on the segment, beyond both joint discs.
        x, y = (0.5 * KPS[first] + 0.5 * KPS[nose]).astype(int)
        expected = tuple(int(c * kp.LIMB_DIMMING) for c in kp.KEYPOINT_COLORS[first])
        assert tuple(array[y, x]) == expected
    colours = {tuple(c) for c in array.reshape(-1, 3)}
    assert colours <= {(0, 0, 0), *kp.KEYPOINT_COLORS, *dimmed}
    assert (0, 0, int(255 * kp.LIMB_DIMMING)) not in colours, "the nose colour is never a limb"


def test_draw_kps_rejects_wrong_keypoint_shape():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        kp.draw_kps((64, 64), np.zeros((68, 2)))


def _opencv_drawing(cv2, size, kps):
    """The official keypoint drawing steps done with OpenCV itself, for parity."""
    width, height = size
    canvas = np.zeros((height, width, 3))
    for first, second in kp.LIMBS:
        x, y = kps[[first, second], 0], kps[[first, second], 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4),
                                   int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas.copy(), polygon, kp.KEYPOINT_COLORS[first])
    canvas = (canvas * 0.6).astype(np.uint8)
    for index, (x, y) in enumerate(kps):
        canvas = cv2.circle(canvas.copy(), (int(x), int(y)), 10, kp.KEYPOINT_COLORS[index], -1)
    return canvas


def test_draw_kps_is_pixel_identical_to_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for case in range(60):
        width, height = (int(v) for v in rng.integers(40, 300, 2))
        spread = (0.2, 0.8) if case % 3 else (-0.2, 1.2)  # some limbs leave the canvas
        dtype = np.float32 if case % 2 else np.float64
        kps = (rng.uniform(*spread, (5, 2)) * [width, height]).astype(dtype)
        ours = kp.draw_kps_array((width, height), kps)
        np.testing.assert_array_equal(ours, _opencv_drawing(cv2, (width, height), kps))


def test_ellipse_polygon_is_identical_to_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for _ in range(100):
        centre = tuple(int(v) for v in rng.integers(-40, 300, 2))
        axes, angle = (int(rng.integers(0, 150)), 4), int(rng.integers(-180, 181))
        expected = cv2.ellipse2Poly(centre, axes, angle, 0, 360, 1).reshape(-1, 2)
        np.testing.assert_array_equal(kp.ellipse_polygon(centre, axes, angle), expected)


# --------------------------------------------------------------------------- geometry


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return math.atan2(a[0] * b[1] - a[1] * b[0], a @ b)


def test_estimated_similarity_recovers_transform_and_maps_points_exactly():
    rng = np.random.default_rng(3)
    source = rng.uniform(0, 200, (5, 2))
    truth = kp.similarity_matrix(0.37, 23.0, (410.0, -12.5))
    target = kp.apply_similarity(truth, source)
    estimated = kp.estimate_similarity(source, target)
    np.testing.assert_allclose(estimated, truth, atol=1e-9)
    np.testing.assert_allclose(kp.apply_similarity(estimated, source), target, atol=1e-9)


def test_keypoints_into_box_fit_centred_and_keep_shape():
    target_box = (300.0, 120.0, 340.0, 170.0)
    moved = kp.keypoints_into_box(KPS, target_box)
    low, high = moved.min(0), moved.max(0)
    assert (low >= np.array(target_box[:2]) - 1e-9).all()
    assert (high <= np.array(target_box[2:]) + 1e-9).all()
    np.testing.assert_allclose((low + high) / 2, [320.0, 145.0], atol=1e-9)
    assert math.isclose(high[0] - low[0], 40.0) or math.isclose(high[1] - low[1], 50.0)
    src = KPS.astype(np.float64)
    for a, b, c in [(0, 1, 2), (2, 3, 4), (0, 2, 4)]:
        assert math.isclose(_angle(src[b] - src[a], src[c] - src[a]),
                            _angle(moved[b] - moved[a], moved[c] - moved[a]), abs_tol=1e-12)
    ratio = np.linalg.norm(src[0] - src[1]) / np.linalg.norm(src[2] - src[3])
    moved_ratio = np.linalg.norm(moved[0] - moved[1]) / np.linalg.norm(moved[2] - moved[3])
    assert math.isclose(ratio, moved_ratio, rel_tol=1e-12)


def test_keypoints_into_box_uses_the_given_face_box():
    face_box = (20.0, 30.0, 108.0, 140.0)
    moved = kp.keypoints_into_box(KPS, (0.0, 0.0, 44.0, 55.0), source_box=face_box)
    expected = kp.apply_similarity(kp.box_to_box_similarity(face_box, (0, 0, 44, 55)), KPS)
    np.testing.assert_allclose(moved, expected)
    np.testing.assert_allclose(moved[0], (np.array([40.0, 50.0]) - [20, 30]) * 0.5, atol=1e-9)


def test_degenerate_boxes_are_refused():
    with pytest.raises(ValueError, match="positive width"):
        kp.box_to_box_similarity((0, 0, 0, 10), (0, 0, 10, 10))


# --------------------------------------------------------------------------- loader


def test_ip_adapter_round_trip_through_diffusers(pipe, tmp_path):
    path = tmp_path / "ip-adapter.bin"
    written = write_tiny_ip_adapter_bin(path, pipe.unet, seed=3)
    projection = load_instantid_adapter(pipe, path)
    proj_state = projection.state_dict()
    image_proj = written["image_proj"]
    assert torch.equal(proj_state["proj_in.weight"], image_proj["proj_in.weight"])
    assert torch.equal(proj_state["latents"], image_proj["latents"])
    to_k, to_v = image_proj["layers.2.0.to_kv.weight"].chunk(2)
    assert torch.equal(proj_state["layers.2.attn.to_k.weight"], to_k)
    assert torch.equal(proj_state["layers.2.attn.to_v.weight"], to_v)
    assert torch.equal(proj_state["layers.2.ln0.weight"], image_proj["layers.2.0.norm1.weight"])
    processors = pipe.unet.attn_processors
    numbering = cross_attention_numbering(pipe.unet)
    assert len(numbering) == len(ip_processors(pipe.unet)) == 8
    for k, path_k in numbering.items():
        proc = processors[f"{path_k}.processor"]
        assert torch.equal(proc.to_k_ip[0].weight, written["ip_adapter"][f"{k}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip[0].weight, written["ip_adapter"][f"{k}.to_v_ip.weight"])
        assert proc.scale == [DEFAULT_IP_SCALE]


def test_diffusers_projection_equals_reference_resampler(pipe):
    state = make_instantid_state_dict(pipe.unet, seed=4)
    projection = load_instantid_adapter(pipe, state)
    faces = torch.cat([torch.zeros(1, 2, 512), _face_embedding(5, 2)[None]])  # [0; emb], N = 2
    with torch.no_grad():
        ours, official = projection(faces), reference_resampler(state["image_proj"], faces)
    assert ours.shape == (2, 16, 64)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)
    swapped = dict(state["image_proj"])
    for i in range(4):  # the norm1/norm2 assignment matters: a swap must be visible
        swapped[f"layers.{i}.0.norm1.weight"] = state["image_proj"][f"layers.{i}.0.norm2.weight"]
        swapped[f"layers.{i}.0.norm2.weight"] = state["image_proj"][f"layers.{i}.0.norm1.weight"]
    assert (reference_resampler(swapped, faces) - official).abs().max() > 1e-3


def test_adapter_with_a_missing_or_misshaped_key_is_named(pipe):
    state = make_instantid_state_dict(pipe.unet)
    del state["ip_adapter"]["3.to_v_ip.weight"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): 3\.to_v_ip\.weight"):
        check_instantid_adapter(state, pipe.unet)
    state = make_instantid_state_dict(pipe.unet)
    state["image_proj"]["proj_out.weight"] = torch.zeros(2048, 128)
    with pytest.raises(CheckpointError, match=r"proj_out\.weight is \(2048, 128\) but must be "
                                              r"\(64, 128\)"):
        load_instantid_adapter(pipe, state)
    assert pipe.unet.encoder_hid_proj is None, "a refused file must leave the UNet untouched"


@pytest.mark.parametrize(("state", "looks_like"), [
    ({"id_encoder": {"vision_model.x": torch.zeros(1)}, "lora_weights": {}}, "PhotoMaker V1"),
    ({"image_proj": {"proj.weight": torch.zeros(8, 4)}, "ip_adapter": {}}, "plain IP-Adapter"),
    ({"image_proj": {"latents": torch.zeros(1, 16, 128), "proj_in.weight": torch.zeros(128, 1280)},
      "ip_adapter": {}}, "IP-Adapter Plus"),
    ({"id_adapter.body.0.weight": torch.zeros(2)}, "PuLID"),
    ({"controlnet_cond_embedding.conv_in.weight": torch.zeros(2)}, "ControlNet"),
])
def test_file_of_another_method_says_what_it_looks_like(state, looks_like, tmp_path):
    path = tmp_path / "other.bin"
    torch.save(state, str(path))
    with pytest.raises(CheckpointError, match=f"not an InstantID ip-adapter file.*{looks_like}"):
        read_instantid_adapter(path)


def test_second_adapter_on_the_same_unet_is_refused(pipe):
    load_instantid_adapter(pipe, make_instantid_state_dict(pipe.unet))
    with pytest.raises(ConfigError, match="unload_ip_adapter"):
        load_instantid_adapter(pipe, make_instantid_state_dict(pipe.unet))


def test_identitynet_round_trip_from_folder_and_single_file(tmp_path):
    from safetensors.torch import save_file

    net = tiny_identitynet(seed=5)
    net.save_pretrained(tmp_path / "ControlNetModel")
    loaded = load_identitynet(tmp_path / "ControlNetModel")
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    single = tmp_path / "identitynet.safetensors"
    save_file(net.state_dict(), str(single))
    half = load_identitynet(single, torch_dtype=torch.float16, config=tiny_identitynet_config())
    assert half.dtype == torch.float16
    assert torch.equal(half.state_dict()["controlnet_mid_block.weight"],
                       net.state_dict()["controlnet_mid_block.weight"].half())


def test_identitynet_loader_is_strict_and_recognises_other_files(tmp_path):
    from safetensors.torch import save_file

    state = tiny_identitynet().state_dict()
    state.pop("controlnet_mid_block.bias")
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): controlnet_mid_block\.bias"):
        load_identitynet(tmp_path / "cut.safetensors", config=tiny_identitynet_config())
    save_file({"image_proj.latents": torch.zeros(1, 16, 128),
               "image_proj.proj_in.weight": torch.zeros(128, 512)}, str(tmp_path / "ip.safetensors"))
    with pytest.raises(CheckpointError, match="looks like an InstantID ip-adapter"):
        load_identitynet(tmp_path / "ip.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_identitynet(tmp_path / "empty")


def test_describe_checkpoint_recognises_instantid_parts():
    shapes = {"latents": torch.zeros(1, 16, 1280), "proj_in.weight": torch.zeros(1280, 512)}
    assert describe_checkpoint({"image_proj": shapes, "ip_adapter": {}}).startswith("an InstantID")


# --------------------------------------------------------------------------- switches


def test_semantic_line_is_bit_identical_to_the_plain_unet(pipe):
    inputs = _unet_inputs()
    t = torch.tensor(500)
    with torch.no_grad():
        plain = pipe.unet(timestep=t, **inputs).sample
        load_instantid_adapter(pipe, make_instantid_state_dict(pipe.unet, seed=6))
        embeds = [torch.cat([torch.zeros(1, 1, 1, 512), _face_embedding()[None, None]])]
        added = {**inputs["added_cond_kwargs"], "image_embeds": embeds}
        call = {**inputs, "added_cond_kwargs": added}
        with semantic_line(pipe.unet):
            semantic = pipe.unet(timestep=t, **call).sample
        identity = pipe.unet(timestep=t, **call).sample
    assert torch.equal(semantic, plain)
    assert (identity - plain).abs().max() > 1e-3, "the ID line must differ, or the test is empty"
    assert all(p.scale == [DEFAULT_IP_SCALE] for p in ip_processors(pipe.unet).values())


def test_state_is_restored_after_an_exception(pipe):
    state = make_instantid_state_dict(pipe.unet)
    load_instantid_adapter(pipe, state, scale=0.7)
    before = capture_attention_state(pipe.unet)
    with pytest.raises(RuntimeError, match="boom"), semantic_line(pipe.unet):
        assert all(p.scale == [0.0] for p in ip_processors(pipe.unet).values())
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), preserved_attention_state(pipe.unet):
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.encoder_hid_proj = None
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        set_ip_scale(pipe.unet, 3.0)
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), reference_unet(pipe.unet, state["ip_adapter"], 1.0):
        raise RuntimeError("boom")
    after = pipe.unet.attn_processors
    assert after.keys() == before.processors.keys()
    assert all(after[name] is proc for name, proc in before.processors.items())
    assert pipe.unet.encoder_hid_proj is before.encoder_hid_proj
    assert pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert all(p.scale == [0.7] for p in ip_processors(pipe.unet).values())


def test_set_ip_scale_handles_float_scaled_processors():
    class FloatScaleProcessor:  # the official InstantID layout: one float, one Linear
        def __init__(self):
            self.to_k_ip, self.scale = torch.nn.Linear(2, 2, bias=False), 0.5

    class FakeUNet:
        attn_processors = {"a.attn2.processor": FloatScaleProcessor()}

    unet = FakeUNet()
    assert set_ip_scale(unet, 0.0) == 1
    assert unet.attn_processors["a.attn2.processor"].scale == 0.0


# --------------------------------------------------------------------------- reference


def test_reference_negative_id_tokens_are_the_projection_of_zero(pipe):
    state = make_instantid_state_dict(pipe.unet, seed=7)
    tokens = reference_id_tokens(state["image_proj"], _face_embedding(), num_images=2)
    zero_tokens = reference_resampler(state["image_proj"], torch.zeros(1, 1, 512))
    assert tokens.shape == (4, 16, 64)
    assert torch.equal(tokens[0], zero_tokens[0]) and torch.equal(tokens[1], zero_tokens[0])
    assert zero_tokens.abs().max() > 0.1, "Resampler(0) is not zero tokens"
    assert not torch.equal(tokens[2], tokens[0]) and torch.equal(tokens[2], tokens[3])


def test_reference_control_image_matches_diffusers_preprocessing():
    from diffusers.image_processor import VaeImageProcessor

    image = kp.draw_kps((130, 165), KPS)  # 130 x 165 drives a 128 x 160 generation
    ours = reference_control_image(image)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    expected = processor.preprocess(image, height=160, width=128).to(torch.float32)
    assert ours.shape == (1, 3, 160, 128)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def _step_inputs(pipe, n: int = 1):
    g = torch.Generator().manual_seed(8)
    pipe.scheduler.set_timesteps(4)
    return {
        "latents": torch.randn(n, 4, 8, 8, generator=g),
        "timestep": pipe.scheduler.timesteps[1],
        "scheduler": pipe.scheduler,
        "prompt_embeds": torch.randn(2 * n, 77, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(2 * n, 32, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2 * n, 1),
        "face_embeddings": _face_embedding(9),
        "control_image": reference_control_image(kp.draw_kps((64, 64), KPS * 0.5)),
        "guidance_scale": 5.0,
    }


def test_reference_step_equals_diffusers_native_id_line(pipe):
    """The official formula vs the same step on diffusers' own IP-Adapter load."""
    controlnet = tiny_identitynet(seed=10)
    state = make_instantid_state_dict(pipe.unet, seed=11)
    inputs = _step_inputs(pipe, n=2)
    with torch.no_grad():
        reference = reference_noise_prediction(
            pipe.unet, controlnet, state, ip_scale=0.8, conditioning_scale=0.8, **inputs)
        projection = load_instantid_adapter(pipe, state, scale=0.8)
        faces = torch.cat([torch.zeros(1, 1, 512), inputs["face_embeddings"][None]])
        id_tokens = projection(faces).repeat_interleave(2, dim=0)  # [neg x 2; pos x 2]
        x_in = pipe.scheduler.scale_model_input(torch.cat([inputs["latents"]] * 2),
                                                inputs["timestep"])
        added = {"text_embeds": inputs["pooled_prompt_embeds"], "time_ids": inputs["time_ids"]}
        down, mid = controlnet(x_in, inputs["timestep"], encoder_hidden_states=id_tokens,
                               controlnet_cond=inputs["control_image"].repeat(4, 1, 1, 1),
                               conditioning_scale=0.8, added_cond_kwargs=added, return_dict=False)
        image_embeds = [faces.repeat_interleave(2, dim=0)[:, None]]  # (2n, 1, 1, 512)
        noise = pipe.unet(x_in, inputs["timestep"], encoder_hidden_states=inputs["prompt_embeds"],
                          added_cond_kwargs={**added, "image_embeds": image_embeds},
                          down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        negative, positive = noise.chunk(2)
        native = negative + 5.0 * (positive - negative)
        torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
        # Sensitivity: each knob moves the reference well beyond that tolerance.
        no_ip = reference_noise_prediction(
            pipe.unet, controlnet, state, ip_scale=0.0, conditioning_scale=0.8, **inputs)
        no_net = reference_noise_prediction(
            pipe.unet, controlnet, state, ip_scale=0.8, conditioning_scale=0.0, **inputs)
    assert (no_ip - reference).abs().max() > 1e-2
    assert (no_net - reference).abs().max() > 1e-2
