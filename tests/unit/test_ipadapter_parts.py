"""IP-Adapter parts on a tiny offline SDXL pipeline: loading, detection, exact switches,
state snapshots and identity embeddings."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402

from bf_backends.ipadapter import encoder, state, testing  # noqa: E402
from bf_core.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ImageInputError,
    NonFiniteError,
)
from bf_core.testing import tiny_sdxl_pipeline  # noqa: E402

MANIFEST_OF = {
    "vit-h": "ip-adapter_sdxl_vit-h",
    "bigG": "ip-adapter_sdxl_vit-h",  # same keys; only proj.weight is wider
    "plus": "ip-adapter-plus_sdxl_vit-h",
    "plus-face": "ip-adapter-plus-face_sdxl_vit-h",
    "faceid": "ip-adapter-faceid_sdxl",
    "faceid-plusv2": "ip-adapter-faceid-plusv2_sdxl",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP workers spinning
    for a core make these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=generator,
                                          dtype=torch.uint8).numpy()) for _ in range(count)]


def _unit_embeddings(count: int, seed: int = 0) -> torch.Tensor:
    raw = torch.randn(count, 512, generator=torch.Generator().manual_seed(seed))
    return raw / raw.norm(dim=1, keepdim=True)


def _unet_inputs(pipe, batch: int = 2, seed: int = 0) -> dict:
    """Fixed random UNet inputs (latents, timestep, text states, SDXL added conditions)."""
    generator = torch.Generator().manual_seed(seed)
    cross = pipe.unet.config.cross_attention_dim
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, cross, generator=generator),
        "text_embeds": torch.randn(batch, 32, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
    }


def _unet_out(pipe, inputs: dict, image_embeds: list | None = None) -> torch.Tensor:
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    if image_embeds is not None:
        added["image_embeds"] = image_embeds
    with torch.no_grad():
        return pipe.unet(inputs["sample"], inputs["timestep"],
                         encoder_hidden_states=inputs["encoder_hidden_states"],
                         added_cond_kwargs=added).sample


def _embeds_for(pipe, variant: str, faces: int = 1) -> list:
    """CFG-stacked image embeds (batch 2) for one prompt, right for ``variant``."""
    if variant in testing.FACEID_VARIANTS:
        if variant == "faceid-plusv2":
            encoder.set_faceid_plus_clip_embeds(pipe, _images(faces, seed=5))
        return [encoder.faceid_image_embeds(_unit_embeddings(faces))]
    return encoder.prepare_image_embeds(pipe, images=[_images(faces)])


# ---------------------------------------------------------------------------------------
# Tiny adapters: official layout, loading
# ---------------------------------------------------------------------------------------

def _number_pattern(keys) -> set[tuple[str, str]]:
    """Processor keys as (parity of the number, rest): tiny and real UNets differ in count only."""
    pattern = set()
    for key in keys:
        number, rest = key.split(".", 1)
        pattern.add(("odd" if int(number) % 2 else "even", rest))
    return pattern


@pytest.mark.parametrize("variant", testing.VARIANTS)
def test_tiny_adapter_has_the_official_key_layout(variant, manifest_part):
    pipe = tiny_sdxl_pipeline()
    tiny = testing.tiny_adapter_state_dict(variant, pipe.unet)
    name = MANIFEST_OF[variant]
    assert set(tiny["image_proj"]) == set(manifest_part(name, "image_proj"))
    assert _number_pattern(tiny["ip_adapter"]) == _number_pattern(manifest_part(name, "ip_adapter"))
    numbers = {int(key.split(".", 1)[0]) for key in tiny["ip_adapter"]}
    processors = len(pipe.unet.attn_processors)
    expected = range(processors) if variant in testing.FACEID_VARIANTS else range(1, processors, 2)
    assert numbers == set(expected)


@pytest.mark.parametrize("file_format", ["bin", "safetensors", "dict"])
@pytest.mark.parametrize("variant", testing.VARIANTS)
def test_every_tiny_variant_loads_through_load_ip_adapter(variant, file_format, tmp_path):
    pipe = tiny_sdxl_pipeline()
    folder = None if file_format == "dict" else tmp_path
    loaded = testing.load_tiny_adapter(pipe, variant, seed=3, file_format=file_format, tmp_dir=folder)
    if folder is not None:
        assert any(path.suffix == f".{file_format}" for path in tmp_path.iterdir())

    processors = state.ip_attention_processors(pipe)
    cross_names = [name for name in pipe.unet.attn_processors if name.endswith("attn2.processor")]
    assert len(processors) == len(cross_names)
    # The first cross-attention processor (number 1) holds the file's "1.to_k_ip.weight".
    assert torch.equal(processors[0].to_k_ip[0].weight, loaded["ip_adapter"]["1.to_k_ip.weight"])
    assert (pipe.image_encoder is not None) == (variant in testing.CLIP_VARIANTS)
    assert (state.faceid_adapter_names(pipe) == ["faceid_0"]) == (variant in testing.FACEID_VARIANTS)


def test_tiny_adapters_depend_on_the_seed():
    pipe = tiny_sdxl_pipeline()
    first = testing.tiny_adapter_state_dict("plus", pipe.unet, seed=0)
    again = testing.tiny_adapter_state_dict("plus", pipe.unet, seed=0)
    other = testing.tiny_adapter_state_dict("plus", pipe.unet, seed=1)
    assert all(torch.equal(first["image_proj"][k], again["image_proj"][k]) for k in first["image_proj"])
    assert not torch.equal(first["image_proj"]["latents"], other["image_proj"]["latents"])


def test_unknown_variant_and_format_are_named():
    pipe = tiny_sdxl_pipeline()
    with pytest.raises(ConfigError, match="unknown IP-Adapter variant 'vit-l'"):
        testing.load_tiny_adapter(pipe, "vit-l")
    with pytest.raises(ConfigError, match="file_format"):
        testing.load_tiny_adapter(pipe, "vit-h", file_format="ckpt")


# ---------------------------------------------------------------------------------------
# detect_variant
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", testing.VARIANTS)
def test_detect_variant(variant):
    pipe = tiny_sdxl_pipeline()
    assert state.detect_variant(pipe) is None
    testing.load_tiny_adapter(pipe, variant, file_format="dict")
    plus_family = variant in testing.PLUS_VARIANTS
    assert state.detect_variant(pipe) == ("plus" if plus_family else variant)
    if plus_family:
        assert state.detect_variant(pipe, hint=variant) == variant


def test_detect_variant_rejects_a_contradicting_hint():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "faceid", file_format="dict")
    with pytest.raises(ConfigError, match="'plus-face'.*'faceid'"):
        state.detect_variant(pipe, hint="plus-face")


def test_detect_variant_names_an_image_encoder_of_the_wrong_width():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "bigG", file_format="dict")
    vit_h = testing.tiny_image_encoder("vit-h", pipe.unet.config.cross_attention_dim)
    pipe.register_modules(image_encoder=vit_h)
    with pytest.raises(CheckpointError, match="bigG"):
        state.detect_variant(pipe)


def test_detect_variant_names_hidden_states_of_the_wrong_width():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "plus", file_format="dict")
    big_g = testing.tiny_image_encoder("bigG", pipe.unet.config.cross_attention_dim)
    pipe.register_modules(image_encoder=big_g)
    with pytest.raises(CheckpointError, match="32-d CLIP hidden states.*48-d"):
        state.detect_variant(pipe)


def test_several_adapters_are_detected_one_by_one():
    pipe = tiny_sdxl_pipeline()
    first = testing.tiny_adapter_state_dict("vit-h", pipe.unet, seed=0)
    second = testing.tiny_adapter_state_dict("plus", pipe.unet, seed=1)
    pipe.load_ip_adapter([first, second], subfolder="", weight_name=["", ""],
                         image_encoder_folder=None)
    assert state.detect_variants(pipe, hints=[None, "plus-face"]) == ["vit-h", "plus-face"]
    with pytest.raises(ConfigError, match="detect_variants"):
        state.detect_variant(pipe)


# ---------------------------------------------------------------------------------------
# Exact switches
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["vit-h", "plus"])
def test_ip_scales_off_is_bit_identical_to_no_adapter(variant):
    pipe = tiny_sdxl_pipeline()
    inputs = _unet_inputs(pipe)
    without_adapter = _unet_out(pipe, inputs)
    testing.load_tiny_adapter(pipe, variant, file_format="dict")
    pipe.set_ip_adapter_scale(0.7)
    embeds = _embeds_for(pipe, variant)
    with_adapter = _unet_out(pipe, inputs, embeds)
    assert not torch.allclose(with_adapter, without_adapter, atol=1e-4)

    before = [proc.scale for proc in state.ip_attention_processors(pipe)]
    with state.ip_scales_off(pipe):
        assert all(proc.scale == [0.0] for proc in state.ip_attention_processors(pipe))
        assert torch.equal(_unet_out(pipe, inputs, embeds), without_adapter)
    after = [proc.scale for proc in state.ip_attention_processors(pipe)]
    assert all(a is b for a, b in zip(after, before, strict=True)) and after[0] == [0.7]
    assert torch.equal(_unet_out(pipe, inputs, embeds), with_adapter)


@pytest.mark.parametrize("variant", ["faceid", "faceid-plusv2"])
def test_faceid_needs_both_switches_and_then_is_exact(variant):
    pipe = tiny_sdxl_pipeline()
    inputs = _unet_inputs(pipe)
    without_adapter = _unet_out(pipe, inputs)
    testing.load_tiny_adapter(pipe, variant, file_format="dict")
    embeds = _embeds_for(pipe, variant)
    with_adapter = _unet_out(pipe, inputs, embeds)

    switches = state.IPAdapterSwitches(pipe)
    with switches.ip_scales_off():
        lora_only = _unet_out(pipe, inputs, embeds)
    assert not torch.allclose(lora_only, without_adapter, atol=1e-4)  # the LoRA still acts
    with switches.ip_scales_off(), switches.faceid_lora_off():
        assert torch.equal(_unet_out(pipe, inputs, embeds), without_adapter)
    assert torch.equal(_unet_out(pipe, inputs, embeds), with_adapter)


def _add_user_lora(pipe) -> None:
    """A second, non-FaceID LoRA on the attention projections, with non-zero weights."""
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                     init_lora_weights=False), adapter_name="user")


def _grad_flags(unet) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in unet.named_parameters() if "lora" in name}


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_faceid_lora_off_leaves_other_loras_alone():
    pipe = tiny_sdxl_pipeline()
    inputs = _unet_inputs(pipe)
    testing.load_tiny_adapter(pipe, "faceid", file_format="dict")
    _add_user_lora(pipe)
    pipe.set_adapters(["faceid_0", "user"], adapter_weights=[1.0, 0.8])
    embeds = _embeds_for(pipe, "faceid")
    both = _unet_out(pipe, inputs, embeds)
    with state.IPAdapterStateSnapshot.capture(pipe):
        pipe.set_adapters(["user"], adapter_weights=[0.8])
        user_only = _unet_out(pipe, inputs, embeds)
    assert not torch.allclose(user_only, both, atol=1e-4)

    flags = _grad_flags(pipe.unet)
    scaling = [dict(layer.scaling) for layer in state.faceid_lora_layers(pipe)]
    with state.faceid_lora_off(pipe):
        assert torch.equal(_unet_out(pipe, inputs, embeds), user_only)
        assert _grad_flags(pipe.unet) == flags
        assert [dict(layer.scaling) for layer in state.faceid_lora_layers(pipe)] == scaling
        assert all("user" in layer.active_adapters for layer in state.faceid_lora_layers(pipe)
                   if "user" in layer.lora_A)
    assert torch.equal(_unet_out(pipe, inputs, embeds), both)


def test_faceid_lora_off_refuses_a_fused_lora():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "faceid", file_format="dict")
    pipe.fuse_lora(adapter_names=["faceid_0"])
    with pytest.raises(ConfigError, match="unfuse_lora"), state.faceid_lora_off(pipe):
        pass


# ---------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------

def _observable_state(pipe) -> tuple:
    layer = state.image_projection_layers(pipe)[0]
    return (
        [list(proc.scale) for proc in state.ip_attention_processors(pipe)],
        [(layer_.active_adapter, layer_.disable_adapters, dict(layer_.scaling))
         for layer_ in state.faceid_lora_layers(pipe)],
        _grad_flags(pipe.unet),
        (layer.clip_embeds, layer.shortcut, layer.shortcut_scale),
    )


def _customised_plusv2_pipeline():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "faceid-plusv2", file_format="dict")
    embeds = _embeds_for(pipe, "faceid-plusv2")
    pipe.set_ip_adapter_scale(0.6)
    pipe.set_adapters(["faceid_0"], adapter_weights=[0.5])
    encoder.set_faceid_plus_clip_embeds(pipe, _images(1, seed=5), shortcut_scale=0.75)
    return pipe, embeds


def _meddle(pipe) -> None:
    """Change everything a snapshot covers."""
    pipe.set_ip_adapter_scale(0.1)
    pipe.set_adapters(["faceid_0"], adapter_weights=[0.2])
    pipe.disable_lora()
    layer = state.image_projection_layers(pipe)[0]
    layer.clip_embeds, layer.shortcut, layer.shortcut_scale = None, False, 3.0


def test_snapshot_restores_every_changed_piece():
    pipe, embeds = _customised_plusv2_pipeline()
    inputs = _unet_inputs(pipe)
    reference, output = _observable_state(pipe), _unet_out(pipe, inputs, embeds)
    with state.IPAdapterStateSnapshot.capture(pipe):
        _meddle(pipe)
        assert _observable_state(pipe) != reference
    restored = _observable_state(pipe)
    assert restored[:3] == reference[:3]
    assert restored[3][0] is reference[3][0] and restored[3][1:] == reference[3][1:]
    assert torch.equal(_unet_out(pipe, inputs, embeds), output)


def test_snapshot_restores_after_an_exception_and_lets_it_through():
    pipe, embeds = _customised_plusv2_pipeline()
    inputs = _unet_inputs(pipe)
    reference, output = _observable_state(pipe), _unet_out(pipe, inputs, embeds)
    with pytest.raises(RuntimeError, match="inside"), state.IPAdapterStateSnapshot.capture(pipe):
        _meddle(pipe)
        raise RuntimeError("failure inside the block")
    restored = _observable_state(pipe)
    assert restored[:3] == reference[:3] and restored[3][0] is reference[3][0]
    assert torch.equal(_unet_out(pipe, inputs, embeds), output)


def test_snapshot_keeps_per_image_scale_lists_from_in_place_edits():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "vit-h", file_format="dict")
    first = state.ip_attention_processors(pipe)[0]
    first.scale = [[0.3, 0.9]]  # one scale per reference image (used with IP masks)
    with state.IPAdapterStateSnapshot.capture(pipe):
        first.scale[0][1] = 5.0  # edits the very list the user set
        pipe.set_ip_adapter_scale(0.1)
    assert first.scale == [[0.3, 0.9]]
    assert all(proc.scale == [1.0] for proc in state.ip_attention_processors(pipe)[1:])


# ---------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------

def _embeds_the_pipeline_passes(pipe, **call) -> list:
    """Run the stock pipeline for one step and record ``image_embeds`` given to the UNet."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["image_embeds"])

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe("a portrait", num_inference_steps=1, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(0), **call)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(("variant", "per_image"), [("vit-h", (32,)), ("plus", (257, 32))])
def test_embeds_from_images_equal_the_stock_pipeline(variant, per_image):
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, variant, file_format="dict")
    images = [_images(2)]  # one adapter, two reference images
    stock = _embeds_the_pipeline_passes(pipe, ip_adapter_image=images, num_images_per_prompt=3)
    ours = encoder.prepare_image_embeds(pipe, images=images, num_images_per_prompt=3)
    assert len(ours) == len(stock) == 1
    assert ours[0].shape == (6, 2, *per_image)  # (2 x 3 with CFG, 2 images, ...)
    assert torch.equal(ours[0], stock[0])


def test_precomputed_embeds_are_tiled_as_diffusers_tiles_them():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "vit-h", file_format="dict")
    given = [torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))]
    stock = _embeds_the_pipeline_passes(pipe, ip_adapter_image_embeds=given, num_images_per_prompt=2)
    ours = encoder.prepare_image_embeds(pipe, image_embeds=given, num_images_per_prompt=2)
    assert ours[0].shape == (4, 3, 32)
    assert torch.equal(ours[0], stock[0])


def _bad_embeds_cases():
    good = torch.randn(2, 1, 32)
    return [
        ("not a list", good, "must be a list"),
        ("two for one adapter", [good, good], "2 ip_adapter_image_embeds tensor"),
        ("not a tensor", [good.tolist()], "is a list; pass a torch.Tensor"),
        ("wrong width", [torch.randn(2, 1, 48)], r"\(2, 1, 48\).*\(batch, num_images, 32\)"),
        ("hidden states for a plain adapter", [torch.randn(2, 1, 257, 32)], "CLIP image_embeds"),
        ("batch of four under CFG", [torch.randn(4, 1, 32)], "batch 4 but must be 2"),
    ]


@pytest.mark.parametrize(("case", "embeds", "message"), _bad_embeds_cases(),
                         ids=[case[0] for case in _bad_embeds_cases()])
def test_bad_precomputed_embeds_raise_named_errors(case, embeds, message):
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "vit-h", file_format="dict")
    with pytest.raises(ConfigError, match=message):
        encoder.prepare_image_embeds(pipe, image_embeds=embeds)


def test_non_finite_and_faceid_layouts_are_checked():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "faceid", file_format="dict")
    with pytest.raises(ConfigError, match=re.escape("(batch, num_images, 1, 512)")):
        encoder.check_image_embeds(pipe, [torch.zeros(2, 1, 4, 512)])
    nan = torch.zeros(2, 1, 1, 512)
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        encoder.check_image_embeds(pipe, [nan])
    with pytest.raises(ConfigError, match="faceid_image_embeds"):
        encoder.prepare_image_embeds(pipe, images=[_images(1)])


def test_image_inputs_are_checked():
    pipe = tiny_sdxl_pipeline()
    with pytest.raises(ConfigError, match="no IP-Adapter loaded"):
        encoder.prepare_image_embeds(pipe, images=[_images(1)])
    testing.load_tiny_adapter(pipe, "vit-h", file_format="dict")
    with pytest.raises(ConfigError, match=re.escape("[[image_1, image_2]]")):
        encoder.prepare_image_embeds(pipe, images=_images(2))
    with pytest.raises(ImageInputError, match="PIL image"):
        encoder.prepare_image_embeds(pipe, images=["face.png"])
    pipe.register_modules(image_encoder=None)
    with pytest.raises(ConfigError, match="no image_encoder"):
        encoder.prepare_image_embeds(pipe, images=[_images(1)])


def test_faceid_embeds_layout_and_checks():
    faces = _unit_embeddings(3)
    embeds = encoder.faceid_image_embeds(faces)
    assert embeds.shape == (2, 3, 1, 512)
    assert not embeds[0].any() and torch.equal(embeds[1, :, 0], faces)
    assert encoder.faceid_image_embeds(faces, do_classifier_free_guidance=False).shape == (1, 3, 1, 512)
    with pytest.raises(ConfigError, match="normed_embedding"):
        encoder.faceid_image_embeds(faces * 20)
    with pytest.raises(ConfigError, match=re.escape("(num_faces, 512)")):
        encoder.faceid_image_embeds(faces[:, :128])


def test_faceid_embeds_tile_like_diffusers_for_several_faces_and_prompts():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "faceid", file_format="dict")
    given = [encoder.faceid_image_embeds(_unit_embeddings(2))]
    stock = _embeds_the_pipeline_passes(pipe, ip_adapter_image_embeds=given, num_images_per_prompt=2)
    ours = encoder.prepare_image_embeds(pipe, image_embeds=given, num_images_per_prompt=2)
    assert ours[0].shape == (4, 2, 1, 512)
    assert torch.equal(ours[0], stock[0])


def test_face_crop_clip_embeds_follow_the_model_card_recipe():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "faceid-plusv2", file_format="dict")
    crops = _images(2, seed=4)
    recipe = pipe.prepare_ip_adapter_image_embeds([crops], None, torch.device("cpu"), 3, True)[0]
    ours = encoder.set_faceid_plus_clip_embeds(pipe, crops, num_images_per_prompt=3)
    assert ours.shape == (6, 2, 257, 32)
    assert torch.equal(ours, recipe)
    layer = state.image_projection_layers(pipe)[0]
    assert layer.clip_embeds is ours and layer.shortcut is True and layer.shortcut_scale == 1.0


def _ip_states_seen_by_attention(pipe, inputs, embeds) -> torch.Tensor:
    """The projected image states the first IP processor receives, (B, m, tokens, D)."""
    seen = []
    name = next(name for name in pipe.unet.attn_processors if name.endswith("attn2.processor"))
    attention = pipe.unet.get_submodule(name[: -len(".processor")])

    def record(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"][1][0])

    handle = attention.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _unet_out(pipe, inputs, embeds)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(("variant", "tokens"), [("vit-h", 4), ("plus", 16), ("faceid", 4),
                                                 ("faceid-plusv2", 4)])
def test_projected_id_tokens_are_what_attention_attends_to(variant, tokens):
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, variant, file_format="dict")
    embeds = _embeds_for(pipe, variant, faces=2)
    with torch.no_grad():
        ours = encoder.projected_id_tokens(pipe, embeds)
    assert ours.shape == (2, 2 * tokens, pipe.unet.config.cross_attention_dim)
    seen = _ip_states_seen_by_attention(pipe, _unet_inputs(pipe), embeds)
    assert seen.shape == (2, 2, tokens, 64)
    assert torch.equal(ours, seen.reshape(2, 2 * tokens, 64))


def test_projected_id_tokens_check_faceid_plus_state():
    pipe = tiny_sdxl_pipeline()
    testing.load_tiny_adapter(pipe, "faceid-plusv2", file_format="dict")
    faces = [encoder.faceid_image_embeds(_unit_embeddings(2))]
    with pytest.raises(ConfigError, match="set_faceid_plus_clip_embeds"):
        encoder.projected_id_tokens(pipe, faces)
    encoder.set_faceid_plus_clip_embeds(pipe, _images(1))  # one crop for two faces
    with pytest.raises(ConfigError, match="clip_embeds cover 2"):
        encoder.projected_id_tokens(pipe, faces)
