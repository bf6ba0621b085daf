"""The real timm EVA02 code path of PuLID's image features, on a tiny configuration.

timm needs a torchvision built for the installed torch, which the default CPU test
environment does not have, so this module skips there; CI runs it in a second
environment with torch and torchvision installed together (see docs/backends/pulid.md).
It imports nothing beyond torch, timm and the PuLID feature, module and test-support
modules.
"""

from __future__ import annotations

import pytest
import torch


def _import_timm_or_skip():
    try:
        import timm.models.eva
    except Exception as exc:  # a mismatched torchvision fails with RuntimeError, not ImportError
        pytest.skip(f"timm is not usable here ({type(exc).__name__}: {exc}); this test runs in "
                    "the environment with torch and torchvision installed together",
                    allow_module_level=True)
    return timm.models.eva


eva_module = _import_timm_or_skip()

from bf_backends.pulid.eva import (  # noqa: E402
    PULID_HIDDEN_BLOCKS,
    EVAFeatures,
    build_eva_tower,
    eva02_clip_l_336_args,
)
from bf_backends.pulid.features import (  # noqa: E402
    clip_pixels,
    id_condition,
    whitened_grey_face,
)
from bf_backends.pulid.modules import IDEncoder, IDEncoderConfig  # noqa: E402

# The spec's rename table between the original EVA-CLIP keys and timm's (docs/backends/pulid.md).
TIMM_TO_ORIGINAL = (("attn.norm.", "attn.inner_attn_ln."), ("mlp.norm.", "mlp.ffn_ln."),
                    ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."),
                    ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"))


def tiny_eva_args(embed_dim: int = 16, num_classes: int = 16) -> dict:
    """timm's EVA02-CLIP-L-14-336 architecture at test size: 28 px (2 x 2 patches + CLS =
    5 tokens), 20 blocks.

    20 blocks keep PuLID's block indices 3..19 valid; only widths and the image shrink.
    """
    return {**eva02_clip_l_336_args(), "img_size": 28, "embed_dim": embed_dim,
            "num_heads": 2, "num_classes": num_classes, "depth": 20}


def _tiny_tower(seed: int = 0):
    torch.manual_seed(seed)
    tower = build_eva_tower(model_args=tiny_eva_args())
    with torch.no_grad():  # timm's head starts near zero; make every layer matter
        for name, param in tower.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.startswith("head"):
                param.normal_(0, param.shape[-1] ** -0.5)
    return tower


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_the_real_architecture_is_timms_eva02_clip_l_336():
    args = eva02_clip_l_336_args()
    with torch.device("meta"):
        ours = eva_module.Eva(**args)
        timms = eva_module.eva02_large_patch14_clip_336(pretrained=False, num_classes=768)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in timms.state_dict().items()}
    assert len(ours.blocks) == 24 and ours.head.out_features == 768


@torch.no_grad()
def test_hidden_states_are_the_outputs_of_blocks_3_7_11_15_19_with_cls():
    tower = _tiny_tower()
    embedding, hidden = EVAFeatures(tower, image_size=28)(_pixels())
    final, intermediates = tower.forward_intermediates(
        _pixels(), indices=list(PULID_HIDDEN_BLOCKS), norm=False, output_fmt="NLC",
        return_prefix_tokens=True)
    for ours, (patches, prefix) in zip(hidden, intermediates, strict=True):
        torch.testing.assert_close(ours, torch.cat([prefix, patches], dim=1))
    assert hidden[0].shape == (2, 5, 16)  # CLS + 2 x 2 patches
    torch.testing.assert_close(embedding, tower.forward_head(final))
    assert embedding.abs().max() > 1e-3


@torch.no_grad()
def test_original_eva_clip_file_layout_loads_strictly(tmp_path):
    source = _tiny_tower(seed=3)
    original = {}
    for key, value in source.state_dict().items():
        for timm_name, original_name in TIMM_TO_ORIGINAL:
            key = key.replace(timm_name, original_name)
        original[f"visual.{key}"] = value
    original["text.token_embedding.weight"] = torch.zeros(4, 4)  # the text tower is ignored
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save(original, path)
    loaded = build_eva_tower(path, model_args=tiny_eva_args())
    expected = EVAFeatures(source, image_size=28)(_pixels())
    got = EVAFeatures(loaded, image_size=28)(_pixels())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    for a, b in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_pulid_features_through_timm_feed_the_v1_encoder():
    vision = EVAFeatures(_tiny_tower(), image_size=28)
    crop = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, 19, (1, 512, 512), generator=torch.Generator().manual_seed(5))
    embedding, hidden = vision(clip_pixels(whitened_grey_face(crop, labels), vision.image_size))
    id_cond = id_condition(torch.randn(1, 512), embedding)
    torch.manual_seed(6)
    encoder = IDEncoder(IDEncoderConfig(id_cond_dim=512 + 16, vit_dim=16, mapping_width=16,
                                        max_body_width=32, context_dim=64)).eval()
    tokens = encoder(id_cond, hidden)
    assert tokens.shape == (1, 10, 64) and torch.isfinite(tokens).all()
