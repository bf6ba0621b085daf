"""PuLID modules: ID attention math, install/restore, encoders, loader errors, round trips.

The references here are written from the PuLID spec (attention: the "attention sink" form
of the zero tokens, per-channel projections over the spatial axis; encoders: functional
forms), independently of the implementation's code path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from bf_backends.pulid.attention import (
    PuLIDAttentionConfig,
    PuLIDIDAttnProcessor,
    install_pulid_attention,
    pulid_processor_numbering,
    spatial_projection,
)
from bf_backends.pulid.loader import load_pulid, read_pulid_weights
from bf_backends.pulid.modules import (
    IDEncoder,
    IDFormer,
    IDFormerConfig,
    negative_id_embedding,
)
from bf_backends.pulid.testing import (
    TINY_VIT_TOKENS,
    tiny_encoder_config,
    tiny_pulid_state_dict,
    write_tiny_pulid_checkpoint,
)
from bf_core.errors import CheckpointError, ConfigError
from bf_core.testing.tiny import tiny_unet_config

CONTEXT = 64  # cross_attention_dim of the tiny UNet


# ------------------------------------------------------------------ helpers

def _tiny_unet(seed: int = 0, cross_attention_dim: int = CONTEXT) -> UNet2DConditionModel:
    """The tiny pipeline's SDXL-shaped UNet (16 processors, 8 cross-attention ones)."""
    torch.manual_seed(seed)
    config = {**tiny_unet_config(), "cross_attention_dim": cross_attention_dim}
    return UNet2DConditionModel(**config).eval()


def _unet_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, CONTEXT, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                              "time_ids": torch.randn(batch, 6, generator=g)},
    }


@torch.no_grad()
def _run(unet, **extra) -> torch.Tensor:
    return unet(**_unet_inputs(), **extra).sample


def _id_tokens(batch: int, tokens: int, seed: int = 2, width: int = CONTEXT) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def _cross_attention(width: int = 32, heads: int = 4, seed: int = 3) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=width, cross_attention_dim=CONTEXT, heads=heads,
                     dim_head=width // heads).eval()


def _processor(width: int = 32, seed: int = 4, **kwargs) -> PuLIDIDAttnProcessor:
    torch.manual_seed(seed)
    return PuLIDIDAttnProcessor(width, CONTEXT, **kwargs)


def _tiny_features(version: str, batch: int = 1, images: int = 1, seed: int = 5):
    config = tiny_encoder_config(version, CONTEXT)
    g = torch.Generator().manual_seed(seed)
    cond_shape = (batch, images, config.id_cond_dim) if images > 1 else (batch, config.id_cond_dim)
    id_cond = torch.randn(cond_shape, generator=g)
    hidden = [torch.randn(batch, TINY_VIT_TOKENS * images, config.vit_dim, generator=g)
              for _ in range(5)]
    return id_cond, hidden


def _reference_id_attention(attn: Attention, processor: PuLIDIDAttnProcessor, h, c, e,
                            config: PuLIDAttentionConfig) -> torch.Tensor:
    """PuLID's ID attention (docs/backends/pulid.md) in float64, with the Z zero tokens as attention sinks of logit 0."""
    d = lambda t: t.detach().double()  # noqa: E731
    heads, (batch, n, width) = attn.heads, h.shape
    head_dim = width // heads

    def per_head(x):  # (B, L, width) -> (B, heads, L, head_dim)
        return x.reshape(batch, x.shape[1], heads, head_dim).permute(0, 2, 1, 3)

    def merged(x):
        return x.permute(0, 2, 1, 3).reshape(batch, n, width)

    q = per_head(d(h) @ d(attn.to_q.weight).T)
    k, v = (per_head(d(c) @ d(w.weight).T) for w in (attn.to_k, attn.to_v))
    text = merged(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), -1) @ v)
    k_id = per_head(d(e) @ d(processor.id_to_k.weight).T)
    v_id = per_head(d(e) @ d(processor.id_to_v.weight).T)
    weights = torch.exp(q @ k_id.transpose(-1, -2) / math.sqrt(head_dim))
    ident = merged(weights @ v_id / (weights.sum(-1, keepdim=True) + config.num_zero))
    rho = (text * ident).sum(1, keepdim=True) / (text * text).sum(1, keepdim=True)
    projection = rho * text
    s = config.id_scale
    if config.ortho == "off":
        out = text + s * ident
    elif config.ortho == "ortho":
        out = text + s * (ident - projection)
    else:
        raw = torch.exp(q @ k_id.transpose(-1, -2))  # unscaled logits, zeros add exp(0)
        alpha = (raw[..., :5].sum(-1) / (raw.sum(-1) + config.num_zero)).mean(1)[..., None]
        out = text + s * (ident - (1 - alpha) * projection)
    return out @ d(attn.to_out[0].weight).T + d(attn.to_out[0].bias)


# ------------------------------------------------------------------ attention math

MATH_CASES = [PuLIDAttentionConfig(num_zero=z, ortho=o, id_scale=s)
              for o in ("off", "ortho", "ortho_v2") for z in (0, 8) for s in (0.8, 2.5)]


@pytest.mark.parametrize("config", MATH_CASES, ids=str)
@pytest.mark.parametrize("tokens", [10, 32])
def test_id_attention_matches_spec_reference(config, tokens):
    attn, processor = _cross_attention(), _processor()
    g = torch.Generator().manual_seed(6)
    h, c = torch.randn(2, 12, 32, generator=g), torch.randn(2, 7, CONTEXT, generator=g)
    e = _id_tokens(2, tokens)
    with torch.no_grad(), processor.state.using(e, config):
        out = processor(attn, h, encoder_hidden_states=c)
        plain = processor.text_processor(attn, h, encoder_hidden_states=c)
    expected = _reference_id_attention(attn, processor, h, c, e, config)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert (out - plain).abs().max() > 1e-3  # the ID path really contributed


@pytest.mark.parametrize("ortho", ["off", "ortho", "ortho_v2"])
def test_zero_id_scale_equals_plain_attention_exactly(ortho):
    attn, processor = _cross_attention(), _processor()
    g = torch.Generator().manual_seed(7)
    h, c = torch.randn(2, 12, 32, generator=g), torch.randn(2, 7, CONTEXT, generator=g)
    config = PuLIDAttentionConfig(num_zero=8, ortho=ortho, id_scale=0.0)
    with torch.no_grad(), processor.state.using(_id_tokens(2, 10), config):
        assert torch.equal(processor(attn, h, encoder_hidden_states=c),
                           processor.text_processor(attn, h, encoder_hidden_states=c))


def test_more_zero_tokens_weaken_the_id_signal():
    attn, processor = _cross_attention(), _processor()
    g = torch.Generator().manual_seed(8)
    h, c = torch.randn(1, 12, 32, generator=g), torch.randn(1, 7, CONTEXT, generator=g)
    with torch.no_grad():
        plain = processor.text_processor(attn, h, encoder_hidden_states=c)
        changes = []
        for num_zero in (0, 8, 20, 80):
            config = PuLIDAttentionConfig(num_zero=num_zero, ortho="off", id_scale=1.0)
            with processor.state.using(_id_tokens(1, 10), config):
                changes.append((processor(attn, h, encoder_hidden_states=c) - plain).norm())
    assert all(a > b for a, b in zip(changes, changes[1:], strict=False))


def test_ortho_removes_the_spatial_component_along_text_attention():
    g = torch.Generator().manual_seed(9)
    text, ident = torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 8, generator=g)
    residual = ident - spatial_projection(text, ident)
    torch.testing.assert_close((text * residual).sum(dim=1), torch.zeros(2, 8), atol=1e-5,
                               rtol=0)


def test_cross_attention_kwargs_route_equals_state_route():
    attn, processor = _cross_attention(), _processor()
    attn.set_processor(processor)
    g = torch.Generator().manual_seed(10)
    h, c = torch.randn(2, 12, 32, generator=g), torch.randn(2, 7, CONTEXT, generator=g)
    e = _id_tokens(2, 10)
    with torch.no_grad():
        by_kwargs = attn(h, c, id_embedding=e, id_scale=0.5)  # diffusers filters by signature
        with processor.state.using(e, PuLIDAttentionConfig(id_scale=0.5)):
            by_state = attn(h, c)
    assert torch.equal(by_kwargs, by_state)


def test_single_id_embedding_is_shared_and_wrong_batch_is_named():
    attn, processor = _cross_attention(), _processor()
    g = torch.Generator().manual_seed(11)
    h, c = torch.randn(2, 12, 32, generator=g), torch.randn(2, 7, CONTEXT, generator=g)
    e = _id_tokens(1, 10)
    with torch.no_grad():
        with processor.state.using(e):
            shared = processor(attn, h, encoder_hidden_states=c)
        with processor.state.using(e.repeat(2, 1, 1)):
            repeated = processor(attn, h, encoder_hidden_states=c)
        assert torch.equal(shared, repeated)
        with processor.state.using(_id_tokens(3, 10)), pytest.raises(ValueError, match="batch 3"):
            processor(attn, h, encoder_hidden_states=c)


def test_half_precision_layer_keeps_float32_id_projections():
    attn, processor = _cross_attention(), _processor()
    g = torch.Generator().manual_seed(12)
    h, c = torch.randn(2, 12, 32, generator=g), torch.randn(2, 7, CONTEXT, generator=g)
    e = _id_tokens(2, 10)
    with torch.no_grad(), processor.state.using(e):
        full = processor(attn, h, encoder_hidden_states=c)
        attn.to(torch.bfloat16)
        half = processor(attn, h.bfloat16(), encoder_hidden_states=c.bfloat16())
    assert half.dtype == torch.bfloat16 and processor.id_to_k.weight.dtype == torch.float32
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


def test_attention_config_is_validated_and_named_modes():
    assert PuLIDAttentionConfig.from_mode("fidelity") == PuLIDAttentionConfig(8, "ortho_v2", 0.8)
    assert PuLIDAttentionConfig.from_mode("extremely_style", 1.0) == PuLIDAttentionConfig(
        16, "ortho", 1.0)
    with pytest.raises(ConfigError, match="ortho"):
        PuLIDAttentionConfig(ortho="v2")
    with pytest.raises(ConfigError, match="num_zero"):
        PuLIDAttentionConfig(num_zero=-1)
    with pytest.raises(ConfigError, match="id_scale"):
        PuLIDAttentionConfig(id_scale=float("nan"))
    with pytest.raises(ConfigError, match="fidelity"):
        PuLIDAttentionConfig.from_mode("fast")


# ------------------------------------------------------------------ UNet install / restore

def test_numbering_walks_down_up_mid_cross_attention_only():
    unet = _tiny_unet()
    names = list(unet.attn_processors)
    numbering = pulid_processor_numbering(unet)
    assert sorted(numbering) == [n for n, name in enumerate(names) if "attn2" in name]
    assert all(names[n] == name and name.endswith("attn2.processor")
               for n, name in numbering.items())
    blocks = [name.split(".")[0] for name in numbering.values()]
    assert blocks == sorted(blocks, key=["down_blocks", "up_blocks", "mid_block"].index)
    assert set(blocks) == {"down_blocks", "up_blocks", "mid_block"}


def test_id_off_is_bit_identical_to_the_untouched_unet():
    unet = _tiny_unet()
    baseline = _run(unet)
    with install_pulid_attention(unet) as installation:
        state = installation.state
        assert torch.equal(_run(unet), baseline)  # no embedding set: plain attention
        with state.using(_id_tokens(2, 10), PuLIDAttentionConfig.from_mode("fidelity")):
            with_id = _run(unet)
            with state.disabled():
                assert torch.equal(_run(unet), baseline)  # the semantic line
            assert torch.equal(_run(unet), with_id)  # the switch is read per call
        assert state.id_embedding is None
        assert torch.equal(_run(unet), baseline)
    assert (with_id - baseline).abs().max() > 1e-4


def test_self_attention_processors_are_kept():
    unet = _tiny_unet()
    before = dict(unet.attn_processors)
    with install_pulid_attention(unet):
        after = unet.attn_processors
        for name, processor in before.items():
            if name.endswith("attn1.processor"):
                assert after[name] is processor
            else:
                assert isinstance(after[name], PuLIDIDAttnProcessor)
                assert after[name].text_processor is processor


def test_uninstall_restores_exact_processors_and_state_dict():
    unet = _tiny_unet()
    before, keys, baseline = dict(unet.attn_processors), set(unet.state_dict()), _run(unet)
    installation = install_pulid_attention(unet)
    assert set(unet.state_dict()) > keys  # the projections live in the UNet while installed
    installation.uninstall()
    installation.uninstall()  # harmless twice
    after = unet.attn_processors
    assert list(after) == list(before)
    assert all(after[name] is processor for name, processor in before.items())
    assert set(unet.state_dict()) == keys
    assert torch.equal(_run(unet), baseline)


def test_processors_are_restored_after_an_exception():
    unet = _tiny_unet()
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), install_pulid_attention(unet):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[name] is p for name, p in before.items())


class _WeightedProcessor(torch.nn.Module):
    """Stands for another adapter's processor (it carries weights)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return hidden_states


def test_install_refuses_to_drop_weights_or_install_twice():
    unet = _tiny_unet()
    name = pulid_processor_numbering(unet)[1]
    unet.get_submodule(name[: -len(".processor")]).set_processor(_WeightedProcessor())
    before = dict(unet.attn_processors)
    with pytest.raises(ConfigError, match="carries weights"):
        install_pulid_attention(unet)
    assert all(unet.attn_processors[k] is p for k, p in before.items())

    plain = _tiny_unet()
    with install_pulid_attention(plain) as installation:
        with pytest.raises(ConfigError, match="already installed"):
            install_pulid_attention(plain)
        assert all(plain.attn_processors[k] is p for k, p in installation.processors.items())


# ------------------------------------------------------------------ encoders

def _mlp_reference(x, sd, prefix):
    for index in (0, 3):
        x = F.linear(x, sd[f"{prefix}.{index}.weight"], sd[f"{prefix}.{index}.bias"])
        norm = f"{prefix}.{index + 1}"
        x = F.layer_norm(x, x.shape[-1:], sd[f"{norm}.weight"], sd[f"{norm}.bias"], eps=1e-5)
        x = F.leaky_relu(x, 0.01)
    return F.linear(x, sd[f"{prefix}.6.weight"], sd[f"{prefix}.6.bias"])


def _loaded_tiny_encoder(version):
    unet = _tiny_unet()
    flat = tiny_pulid_state_dict(unet, version, seed=3)
    loaded = load_pulid(flat, unet, encoder_config=tiny_encoder_config(version))
    loaded.attention.uninstall()
    return loaded.encoder


@torch.no_grad()
def test_v1_encoder_matches_functional_reference():
    encoder = _loaded_tiny_encoder("v1")
    sd = encoder.state_dict()
    id_cond, hidden = _tiny_features("v1", batch=3)
    out = encoder(id_cond, hidden)
    tokens = [_mlp_reference(id_cond, sd, "body").reshape(3, 5, CONTEXT)]
    for i, y in enumerate(hidden):
        patches = _mlp_reference(y[:, 1:], sd, f"mapping_patch_{i}").mean(1, keepdim=True)
        tokens.append(_mlp_reference(y[:, :1], sd, f"mapping_{i}") + patches)
    assert out.shape == (3, 10, CONTEXT)
    torch.testing.assert_close(out, torch.cat(tokens, dim=1), rtol=1e-5, atol=1e-5)


def _perceiver_reference(context, latents, sd, prefix, heads):
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"],  # noqa: E731
                                      sd[f"{name}.bias"], eps=1e-5)
    context, latents = ln(context, f"{prefix}.0.norm1"), ln(latents, f"{prefix}.0.norm2")
    q = latents @ sd[f"{prefix}.0.to_q.weight"].T
    k, v = (torch.cat([context, latents], 1) @ sd[f"{prefix}.0.to_kv.weight"].T).chunk(2, -1)
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
    latents_out = attn.transpose(1, 2).flatten(2) @ sd[f"{prefix}.0.to_out.weight"].T
    return latents_out


@torch.no_grad()
def test_v11_encoder_matches_functional_reference_for_two_images():
    encoder = _loaded_tiny_encoder("v1.1")
    config = encoder.config
    sd = encoder.state_dict()
    id_cond, hidden = _tiny_features("v1.1", batch=1, images=2)
    out = encoder(id_cond, hidden)
    id_tokens = _mlp_reference(id_cond, sd, "id_embedding_mapping").reshape(1, 10, config.dim)
    latents = torch.cat([sd["latents"], id_tokens], 1)
    per_scale = config.depth // 5
    for i, y in enumerate(hidden):
        context = torch.cat([id_tokens, _mlp_reference(y, sd, f"mapping_{i}")], 1)
        for layer in range(i * per_scale, (i + 1) * per_scale):
            latents = latents + _perceiver_reference(context, latents, sd, f"layers.{layer}",
                                                     config.heads)
            ff = F.layer_norm(latents, (config.dim,), sd[f"layers.{layer}.1.0.weight"],
                              sd[f"layers.{layer}.1.0.bias"], eps=1e-5)
            ff = F.gelu(ff @ sd[f"layers.{layer}.1.1.weight"].T) @ sd[f"layers.{layer}.1.3.weight"].T
            latents = latents + ff
    assert out.shape == (1, 32, CONTEXT)
    torch.testing.assert_close(out, latents[:, :32] @ sd["proj_out"], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_v11_encoder_accepts_both_id_cond_layouts():
    encoder = _loaded_tiny_encoder("v1.1")
    id_cond, hidden = _tiny_features("v1.1", batch=1)
    assert torch.equal(encoder(id_cond, hidden), encoder(id_cond[:, None], hidden))


@pytest.mark.parametrize("version", ["v1", "v1.1"])
def test_negative_embedding_is_not_zero(version):
    encoder = _loaded_tiny_encoder(version)
    negative = negative_id_embedding(encoder, vit_tokens=TINY_VIT_TOKENS)
    assert negative.shape == (1, encoder.tokens_per_image, CONTEXT)
    assert negative.abs().mean() > 1e-2


def test_encoder_configs_and_inputs_are_checked():
    with pytest.raises(ConfigError, match="depth"):
        IDFormerConfig(depth=7)
    with pytest.raises(ConfigError, match="heads"):
        IDFormerConfig(heads=0)
    encoder = IDEncoder(tiny_encoder_config("v1"))
    id_cond, hidden = _tiny_features("v1")
    with pytest.raises(ValueError, match="5 EVA-CLIP hidden states"):
        encoder(id_cond, hidden[:4])
    with pytest.raises(ValueError, match="id_cond must have shape"):
        encoder(id_cond[:, :-1], hidden)
    assert isinstance(IDFormer(tiny_encoder_config("v1.1")), IDFormer)


# ------------------------------------------------------------------ loader

@pytest.fixture
def unet():
    return _tiny_unet()


@pytest.mark.parametrize(("version", "suffix"), [("v1", ".bin"), ("v1.1", ".safetensors")])
def test_tiny_checkpoint_round_trip(tmp_path, unet, version, suffix):
    path = write_tiny_pulid_checkpoint(tmp_path, unet, version, seed=4)
    assert path.suffix == suffix
    written = tiny_pulid_state_dict(unet, version, seed=4)
    if version == "v1.1":  # the official v1.1 file is float16; modules stay float32
        written = {k: v.half().float() for k, v in written.items()}
    baseline = _run(unet)
    loaded = load_pulid(path, unet, encoder_config=tiny_encoder_config(version))
    with loaded.attention as installation:
        assert loaded.version == version
        for key, value in loaded.encoder.state_dict().items():
            assert value.dtype == torch.float32
            assert torch.equal(value, written[f"id_adapter.{key}"]), key
        for key, value in installation.numbered_layers().state_dict().items():
            assert torch.equal(value, written[f"id_adapter_attn_layers.{key}"]), key
        id_cond, hidden = _tiny_features(version)
        with torch.no_grad():
            positive = loaded.encoder(id_cond, hidden)
            negative = negative_id_embedding(loaded.encoder, vit_tokens=TINY_VIT_TOKENS)
        assert positive.shape == negative.shape == (1, loaded.encoder.tokens_per_image, CONTEXT)
        with installation.state.using(torch.cat([negative, positive])):
            assert (_run(unet) - baseline).abs().max() > 1e-4
    assert torch.equal(_run(unet), baseline)


def _flat(unet, version="v1"):
    return tiny_pulid_state_dict(unet, version)


def test_missing_unexpected_and_misshaped_keys_are_named(unet):
    flat = _flat(unet)
    del flat["id_adapter_attn_layers.1.id_to_k.weight"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): 1\.id_to_k\.weight"):
        load_pulid(flat, unet)
    flat = _flat(unet)
    flat["id_adapter.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): extra\.weight"):
        load_pulid(flat, unet, encoder_config=tiny_encoder_config("v1"))
    flat = _flat(unet)
    flat["id_adapter.body.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"body\.0\.weight is \(3, 3\)"):
        load_pulid(flat, unet, encoder_config=tiny_encoder_config("v1"))
    assert not any(isinstance(p, PuLIDIDAttnProcessor) for p in unet.attn_processors.values())


def test_default_encoder_config_names_the_tiny_mismatch(unet):
    with pytest.raises(CheckpointError, match="ID encoder"):
        load_pulid(_flat(unet), unet)  # official sizes expected, tiny file given


def test_version_detection_and_mismatch(unet):
    assert read_pulid_weights(_flat(unet, "v1")).version == "v1"
    assert read_pulid_weights(_flat(unet, "v1.1")).version == "v1.1"
    with pytest.raises(CheckpointError, match="PuLID v1 checkpoint but version 'v1.1'"):
        read_pulid_weights(_flat(unet, "v1"), version="v1.1")
    flat = {k: v for k, v in _flat(unet).items() if k != "id_adapter.body.0.weight"}
    with pytest.raises(CheckpointError, match="cannot tell the PuLID version"):
        read_pulid_weights(flat)
    with pytest.raises(CheckpointError, match="version must be one of"):
        read_pulid_weights(_flat(unet), version="v2")


def test_unet_that_does_not_fit_is_named(unet):
    other = _tiny_unet(cross_attention_dim=32)
    with pytest.raises(CheckpointError, match="context width"):
        load_pulid(_flat(unet), other, encoder_config=tiny_encoder_config("v1"))


@pytest.mark.parametrize(("contents", "says"), [
    ({"image_proj": {"proj.weight": torch.zeros(2)}, "ip_adapter": {"1.to_k_ip.weight":
                                                                    torch.zeros(2)}},
     "IP-Adapter or InstantID"),
    ({"id_encoder": {"x": torch.zeros(1)}, "lora_weights": {"y": torch.zeros(1)}}, "PhotoMaker"),
    ({"image_proj.body.0.weight": torch.zeros(1), "ip_adapter.1.to_k_ip.weight": torch.zeros(1)},
     "community re-keyed PuLID"),
    ({"image_proj.proj.weight": torch.zeros(1), "ip_adapter.1.to_k_ip.weight": torch.zeros(1)},
     "flat IP-Adapter"),
    ({"visual.blocks.0.attn.q_proj.weight": torch.zeros(1)}, "EVA-CLIP"),
    ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "UNet"),
])
def test_files_of_other_methods_are_described(tmp_path, contents, says):
    path = tmp_path / "adapter.bin"
    torch.save(contents, path)
    with pytest.raises(CheckpointError, match=says):
        read_pulid_weights(path)


def test_extra_groups_and_non_dicts_are_refused(tmp_path, unet):
    flat = _flat(unet)
    flat["image_proj.x"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"prefixes \['image_proj'\]"):
        read_pulid_weights(flat)
    encoder_only = {k: v for k, v in _flat(unet).items() if k.startswith("id_adapter.")}
    with pytest.raises(CheckpointError, match="no 'id_adapter_attn_layers.' keys"):
        read_pulid_weights(encoder_only)
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_pulid_weights(path)
