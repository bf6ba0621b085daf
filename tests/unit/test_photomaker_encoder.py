"""PhotoMaker ID encoders (math against a from-the-spec reference) and the loader."""

from __future__ import annotations

import math

import pytest
import torch

from bf_backends.photomaker.loader import (
    convert_lora_to_peft,
    load_id_encoder,
    load_photomaker,
    read_photomaker_checkpoint,
)
from bf_backends.photomaker.modules import (
    PhotoMakerFuseModule,
    PhotoMakerIDEncoderV1,
    PhotoMakerIDEncoderV2,
)
from bf_backends.photomaker.prompt import encode_prompt_with_trigger, fuse_identity
from bf_backends.photomaker.testing import (
    build_tiny_encoder,
    make_tiny_lora_weights,
    tiny_config,
    write_tiny_checkpoint,
)
from bf_core.errors import CheckpointError, ConfigError
from bf_core.testing import tiny_sdxl_pipeline

# ---------------------------------------------------------------------------------------
# An independent reference: explicit formulas, loops over positions and heads
# ---------------------------------------------------------------------------------------


def ref_layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_linear(x, linear):
    out = x @ linear.weight.T
    return out if linear.bias is None else out + linear.bias


def ref_mlp(x, mlp, residual):
    out = ref_linear(ref_gelu(ref_linear(ref_layer_norm(x, mlp.layernorm), mlp.fc1)), mlp.fc2)
    return out + x if residual else out


def ref_fuse(prompt_embeds, mask, id_tokens, fuse):
    """Loop over prompts and masked positions; the k-th masked position takes ID vector k."""
    out = prompt_embeds.clone()
    for b in range(prompt_embeds.shape[0]):
        positions = [i for i in range(prompt_embeds.shape[1]) if mask[b, i]]
        for k, position in enumerate(positions):
            text, ident = prompt_embeds[b, position], id_tokens[b, k]
            u = ref_mlp(torch.cat([text, ident]), fuse.mlp1, residual=False) + text
            v = ref_mlp(u, fuse.mlp2, residual=True)
            out[b, position] = ref_layer_norm(v, fuse.layer_norm)
    return out


def ref_perceiver_tokens(qformer, face, hidden):
    """One image: face (512,), CLIP hidden (S, W) -> (T, D), heads looped explicitly."""
    t = qformer.num_tokens
    d = qformer.cross_attention_dim
    q0 = ref_linear(ref_gelu(ref_linear(face, qformer.token_proj[0])), qformer.token_proj[2])
    q0 = ref_layer_norm(q0.reshape(t, d), qformer.token_norm)
    resampler = qformer.perceiver_resampler
    x = ref_linear(hidden, resampler.proj_in)
    q = q0
    for attention, ff in resampler.layers:
        xn, qn = ref_layer_norm(x, attention.norm1), ref_layer_norm(q, attention.norm2)
        query = qn @ attention.to_q.weight.T
        kv = torch.cat([xn, qn]) @ attention.to_kv.weight.T
        keys, values = kv[:, :d], kv[:, d:]
        hd = attention.head_dim
        heads = []
        for h in range(attention.heads):
            sl = slice(h * hd, (h + 1) * hd)
            weights = torch.softmax(query[:, sl] @ keys[:, sl].T / math.sqrt(hd), dim=-1)
            heads.append(weights @ values[:, sl])
        q = q + torch.cat(heads, dim=-1) @ attention.to_out.weight.T
        hidden_ff = ref_gelu(ref_layer_norm(q, ff[0]) @ ff[1].weight.T)
        q = q + hidden_ff @ ff[3].weight.T
    return q0 + ref_layer_norm(ref_linear(q, resampler.proj_out), resampler.norm_out)


def randomize_(module, seed=0):
    """Random values everywhere, layer-norm weights and biases included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module


# ---------------------------------------------------------------------------------------
# Fusion and encoders
# ---------------------------------------------------------------------------------------


def test_fusion_matches_reference_and_leaves_input_alone():
    torch.manual_seed(0)
    fuse = randomize_(PhotoMakerFuseModule(16))
    prompt = torch.randn(2, 10, 16)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, [0, 4, 9]] = True  # positions need not be contiguous
    id_tokens = torch.randn(2, 3, 16)
    before = prompt.clone()

    fused = fuse(prompt, mask, id_tokens)

    assert torch.equal(prompt, before)
    assert torch.equal(fused[~mask], prompt[~mask])
    torch.testing.assert_close(fused, ref_fuse(prompt, mask, id_tokens, fuse))
    assert not torch.allclose(fused[mask], prompt[mask])


def test_fusion_refuses_a_mask_that_does_not_match_the_id_tokens():
    fuse = PhotoMakerFuseModule(8)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1:3] = True
    with pytest.raises(ValueError, match="77-token limit"):
        fuse(torch.randn(1, 6, 8), mask, torch.randn(1, 3, 8))


def test_v1_id_tokens_are_both_projections_of_the_pooled_output():
    torch.manual_seed(0)
    encoder = build_tiny_encoder("v1").eval()
    pixels = torch.randn(3, 3, 224, 224)
    tokens = encoder.encode_id_tokens(pixels)
    assert tokens.shape == (1, 3, 64)
    pooled = encoder.vision_model(pixel_values=pixels).pooler_output
    expected = torch.cat([pooled @ encoder.visual_projection.weight.T,
                          pooled @ encoder.visual_projection_2.weight.T], dim=-1)
    torch.testing.assert_close(tokens[0], expected)


def test_v2_id_tokens_match_reference_in_image_then_token_order():
    torch.manual_seed(0)
    encoder = randomize_(build_tiny_encoder("v2"), seed=1).eval()
    pixels = torch.randn(2, 3, 224, 224)
    faces = torch.randn(2, 512) * 20  # ArcFace-like norms
    tokens = encoder.encode_id_tokens(pixels, faces)
    assert tokens.shape == (1, 4, 64)
    hidden = encoder.vision_model(pixel_values=pixels).last_hidden_state
    for n in range(2):
        expected = ref_perceiver_tokens(encoder.qformer_perceiver, faces[n], hidden[n])
        torch.testing.assert_close(tokens[0, 2 * n:2 * n + 2], expected, atol=2e-5, rtol=1e-4)


def test_v2_keeps_but_ignores_the_projections():
    torch.manual_seed(0)
    encoder = build_tiny_encoder("v2").eval()
    pixels, faces = torch.randn(1, 3, 224, 224), torch.randn(1, 512)
    before = encoder.encode_id_tokens(pixels, faces)
    with torch.no_grad():
        encoder.visual_projection.weight.fill_(3.0)
        encoder.visual_projection_2.weight.fill_(-3.0)
    assert torch.equal(encoder.encode_id_tokens(pixels, faces), before)
    assert "visual_projection_2.weight" in encoder.state_dict()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_encoder_forward_fuses_exactly_the_masked_rows(version):
    torch.manual_seed(0)
    encoder = build_tiny_encoder(version).eval()
    count = 2
    pixels = torch.randn(count, 3, 224, 224)
    faces = torch.randn(count, 512) if version == "v2" else None
    k = count * encoder.tokens_per_image
    prompt = torch.randn(1, 77, 64)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, 5:5 + k] = True
    args = (pixels, prompt, mask) + ((faces,) if faces is not None else ())
    fused = encoder(*args)
    expected = ref_fuse(prompt, mask, encoder.encode_id_tokens(pixels, faces),
                        encoder.fuse_module)
    torch.testing.assert_close(fused, expected)
    assert torch.equal(fused[~mask], prompt[~mask])


def test_v2_rejects_missing_or_misaligned_face_embeddings():
    encoder = build_tiny_encoder("v2")
    pixels = torch.randn(2, 3, 224, 224)
    with pytest.raises(ValueError, match="insightface"):
        encoder.encode_id_tokens(pixels)
    with pytest.raises(ValueError, match="one face embedding per image"):
        encoder.encode_id_tokens(pixels, torch.randn(1, 512))


# ---------------------------------------------------------------------------------------
# Loader: named errors
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe_unet():
    return tiny_sdxl_pipeline().unet


@pytest.fixture(scope="module")
def tiny_parts(tiny_pipe_unet):
    """{version: (encoder, checkpoint dict)} in the official .bin layout."""
    parts = {}
    for version in ("v1", "v2"):
        torch.manual_seed(1)
        encoder = build_tiny_encoder(version)
        parts[version] = (encoder, {
            "id_encoder": {k: v.clone() for k, v in encoder.state_dict().items()},
            "lora_weights": make_tiny_lora_weights(tiny_pipe_unet, rank=4)})
    return parts


def test_wrong_version_names_both(tiny_parts, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "pm.bin", "v1", tiny_parts["v1"][0],
                                 tiny_sdxl_pipeline().unet)
    with pytest.raises(CheckpointError) as info:
        read_photomaker_checkpoint(path, version="v2")
    assert "'v2'" in str(info.value) and "v1" in str(info.value)
    assert read_photomaker_checkpoint(path, version=1).version == "v1"


def test_encoder_of_other_version_is_refused(tiny_parts):
    loaded = read_photomaker_checkpoint(tiny_parts["v2"][1])
    with pytest.raises(CheckpointError, match="PhotoMakerIDEncoderV1"):
        load_id_encoder(loaded, build_tiny_encoder("v1"))


@pytest.mark.parametrize(("contents", "said"), [
    ({"image_proj": {"proj.weight": torch.zeros(2, 2)},
      "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2, 2)}}, "IP-Adapter"),
    ({"id_adapter.body.0.weight": torch.zeros(2),
      "id_adapter_attn_layers.1.id_to_k.weight": torch.zeros(2, 2)}, "PuLID"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
      torch.zeros(4, 32)}, "plain LoRA"),
    ({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}, "ControlNet"),
])
def test_other_methods_files_say_what_they_look_like(contents, said, tmp_path):
    with pytest.raises(CheckpointError, match=said):
        read_photomaker_checkpoint(contents)
    if all(isinstance(v, torch.Tensor) for v in contents.values()):  # flat: as safetensors
        from safetensors.torch import save_file

        save_file(contents, str(tmp_path / "other.safetensors"))
        with pytest.raises(CheckpointError, match=said):
            read_photomaker_checkpoint(tmp_path / "other.safetensors")


def test_missing_part_is_named(tiny_parts):
    with pytest.raises(CheckpointError, match="lora_weights"):
        read_photomaker_checkpoint({"id_encoder": tiny_parts["v1"][1]["id_encoder"]})


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_encoder_key_problems_are_named(tiny_parts, change):
    state = dict(tiny_parts["v1"][1]["id_encoder"])
    key = "fuse_module.mlp2.fc1.weight"
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        key = "fuse_module.extra.weight"
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(5, 5)
    loaded = read_photomaker_checkpoint({"id_encoder": state,
                                         "lora_weights": tiny_parts["v1"][1]["lora_weights"]})
    with pytest.raises(CheckpointError) as info:
        load_id_encoder(loaded, build_tiny_encoder("v1"))
    message = str(info.value)
    assert key in message and {"shape": "wrong shape"}.get(change, change) in message


def test_real_size_encoder_refuses_a_tiny_file_by_name(tiny_parts):
    loaded = read_photomaker_checkpoint(tiny_parts["v1"][1])
    with pytest.raises(CheckpointError) as info:
        load_id_encoder(loaded)  # real size, built on meta: shapes differ, nothing allocated
    message = str(info.value)
    assert "missing key(s): vision_model.encoder.layers.10." in message  # 2 of 24 layers
    assert "fuse_module.layer_norm.bias is (64,) but must be (2048,)" in message


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_corrupt_file_is_a_checkpoint_error(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        read_photomaker_checkpoint(path)


def test_lora_key_problems_are_named(tiny_parts):
    lora = dict(tiny_parts["v1"][1]["lora_weights"])
    bad = "unet.mid_block.attentions.0.to_q.weight"
    with pytest.raises(CheckpointError, match=bad):
        convert_lora_to_peft({**lora, bad: torch.zeros(2, 2)})
    lonely = next(k for k in lora if k.endswith("up.weight"))
    del lora[lonely]
    with pytest.raises(CheckpointError, match="lack the up"):
        convert_lora_to_peft(lora)


def test_lora_that_does_not_fit_the_unet_is_refused_before_loading(tiny_parts, tmp_path):
    pipe = tiny_sdxl_pipeline()
    contents = tiny_parts["v1"][1]
    key = next(k for k in contents["lora_weights"] if "attn2.processor.to_k_lora.down" in k)
    lora = {**contents["lora_weights"], key: torch.zeros(4, 99)}
    with pytest.raises(CheckpointError, match="does not fit"):
        load_photomaker(pipe, {"id_encoder": contents["id_encoder"], "lora_weights": lora},
                        encoder=build_tiny_encoder("v1"))
    assert pipe.get_list_adapters() == {}  # nothing was changed


def test_meta_built_encoder_gets_real_position_ids(tiny_parts):
    reference, contents = tiny_parts["v1"]
    with torch.device("meta"):
        meta_encoder = PhotoMakerIDEncoderV1(**tiny_config("v1"))
    encoder = load_id_encoder(read_photomaker_checkpoint(contents), meta_encoder)
    pixels = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(encoder.encode_id_tokens(pixels),
                               reference.eval().encode_id_tokens(pixels))


# ---------------------------------------------------------------------------------------
# Round trip into a tiny SDXL pipeline
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "suffix"), [("v1", ".bin"), ("v2", ".safetensors"),
                                                 ("v2", ".bin")])
def test_tiny_checkpoint_round_trip(tmp_path, version, suffix):
    pipe = tiny_sdxl_pipeline()
    torch.manual_seed(2)
    source = build_tiny_encoder(version)
    path = write_tiny_checkpoint(tmp_path / f"pm{suffix}", version, source, pipe.unet)
    written = make_tiny_lora_weights(pipe.unet, rank=4)

    state = load_photomaker(pipe, path, encoder=build_tiny_encoder(version))

    assert state.version == version and isinstance(
        state.encoder, PhotoMakerIDEncoderV1 if version == "v1" else PhotoMakerIDEncoderV2)
    for key, value in source.state_dict().items():
        assert torch.equal(state.encoder.state_dict()[key], value), key
    assert pipe.get_list_adapters() == {"unet": ["photomaker"]}

    # The LoRA is live, unfused, at scale 1, with down -> A and up -> B (to_out -> to_out.0).
    prefix = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    layer = pipe.unet.get_submodule(f"{prefix}.to_out.0")
    assert not layer.merged
    x = torch.randn(3, layer.in_features)
    down = written[f"unet.{prefix}.processor.to_out_lora.down.weight"]
    up = written[f"unet.{prefix}.processor.to_out_lora.up.weight"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ down.T @ up.T)

    encoded = encode_prompt_with_trigger(pipe, "a photo of a person img", "img", 2,
                                         state.tokens_per_image)
    faces = torch.randn(2, 512) if version == "v2" else None
    fused = fuse_identity(state.encoder, encoded, torch.randn(2, 3, 224, 224), faces)
    assert fused.shape == (1, 77, 64)
    assert torch.isfinite(fused).all()
    changed = (fused != encoded.prompt_embeds).any(dim=-1)
    assert torch.equal(changed, encoded.class_tokens_mask)
    assert int(changed.sum()) == 2 * state.tokens_per_image

    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        load_photomaker(pipe, path, encoder=build_tiny_encoder(version))
