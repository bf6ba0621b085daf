"""InfiniteYou's model-side parts: the Resampler against the official module, the control
image geometry, InfuseNet's window and the per-row residual layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bf_backends.infiniteyou.backend import InfuseNetSettings, Residuals, rows_residuals
from bf_backends.infiniteyou.control import (
    black_canvas,
    padded_keypoints,
    resize_and_pad,
    resize_and_pad_geometry,
)
from bf_backends.infiniteyou.loader import resampler_shape_for
from bf_backends.infiniteyou.modules import InfiniteYouResampler
from bf_backends.infiniteyou.testing import tiny_image_proj
from bf_core.errors import ConfigError
from bf_core.records import Branch


# --------------------------------------------------------------------------- the official module
# bytedance/InfiniteYou pipelines/resampler.py, as published (Apache-2.0), for comparison.
def official_feed_forward(dim, mult=4):
    inner_dim = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(),
                         nn.Linear(inner_dim, dim, bias=False))


def official_reshape_tensor(x, heads):
    bs, length, width = x.shape
    x = x.view(bs, length, heads, -1)
    x = x.transpose(1, 2)
    return x.reshape(bs, heads, length, -1)


class OfficialPerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner_dim = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (official_reshape_tensor(t, self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = weight @ v
        return self.to_out(out.permute(0, 2, 1, 3).reshape(b, length, -1))


class OfficialResampler(nn.Module):
    def __init__(self, dim=1024, depth=8, dim_head=64, heads=16, num_queries=8,
                 embedding_dim=768, output_dim=1024, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([nn.ModuleList([
            OfficialPerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
            official_feed_forward(dim=dim, mult=ff_mult)]) for _ in range(depth)])

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def test_the_published_resampler_has_the_official_state_dict_layout():
    with torch.device("meta"):
        ours = InfiniteYouResampler()
        official = OfficialResampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=8,
                                     embedding_dim=512, output_dim=4096, ff_mult=4)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in official.state_dict().items()}


def test_resampler_equals_the_official_module_bit_for_bit():
    shape = resampler_shape_for(32, width=128)
    weights = tiny_image_proj(32, seed=3)
    ours = InfiniteYouResampler(shape)
    ours.load_state_dict(weights, strict=True)
    official = OfficialResampler(dim=128, depth=4, dim_head=64, heads=2, num_queries=8,
                                 embedding_dim=512, output_dim=32, ff_mult=4)
    official.load_state_dict(weights, strict=True)
    faces = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = ours(faces), official(faces)
    assert got.shape == (2, 8, 32)
    assert torch.equal(got, expected)
    other = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.equal(ours(other), got)  # the output depends on the face


# --------------------------------------------------------------------------- control images


@pytest.mark.parametrize("source, size, new, offset", [
    ((80, 96), (64, 64), (64, 76), (0, -6)),      # portrait onto a square: width filled
    ((100, 50), (64, 48), (96, 48), (-16, 0)),    # landscape canvas: height filled
    ((50, 100), (864, 1152), (864, 1728), (0, -288)),
])
def test_resize_and_pad_geometry_is_the_official_rule(source, size, new, offset):
    assert resize_and_pad_geometry(source, size) == (new, offset)


def test_keypoints_follow_the_resize_and_pad_of_their_photo():
    from PIL import Image

    photo = Image.new("RGB", (80, 96), (0, 0, 0))
    photo.putpixel((40, 48), (255, 255, 255))  # one bright pixel at a known place
    padded = np.asarray(resize_and_pad(photo, (64, 64)).convert("L"), dtype=np.float64)
    moved = padded_keypoints([[40.0, 48.0]] * 5, (80, 96), (64, 64))
    np.testing.assert_allclose(moved[0], [32.0, 32.0])  # (40 * 64 / 80, 48 * 76 / 96 - 6)
    y, x = np.unravel_index(padded.argmax(), padded.shape)
    assert abs(x - moved[0, 0]) <= 1 and abs(y - moved[0, 1]) <= 1


def test_black_canvas_is_black_at_the_output_size():
    canvas = np.asarray(black_canvas((48, 32)))
    assert canvas.shape == (32, 48, 3) and not canvas.any()


# --------------------------------------------------------------------------- InfuseNet


@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.25, 1.0), (0.0, 0.6), (0.3, 0.7)])
def test_keep_flag_is_the_official_formula(start, end):
    settings = InfuseNetSettings(guidance_start=start, guidance_end=end)
    total = 8
    official = [1.0 - float(i / total < start or (i + 1) / total > end) for i in range(total)]
    assert [settings.keep(i, total) for i in range(total)] == official


@pytest.mark.parametrize("options, field", [
    ({"infusenet_guidance_start": 0.6, "infusenet_guidance_end": 0.5}, "start/end"),
    ({"infusenet_conditioning_scale": float("nan")}, "conditioning_scale"),
    ({"infusenet_guidance_scale": "high"}, "guidance_scale"),
])
def test_bad_settings_are_named(options, field):
    with pytest.raises(ConfigError, match=field):
        InfuseNetSettings.from_options(options)


class _Part:
    def __init__(self, rows, branches):
        self.rows, self.branches = rows, branches


def test_rows_without_infusenet_get_exact_zeros_and_the_others_their_own():
    """Parts: semantic (2 rows, CFG), ID (2 rows, CFG: residuals for its positive row)."""
    parts = [_Part(2, (Branch.UNCOND, Branch.COND)), _Part(2, (Branch.UNCOND, Branch.COND))]
    block = [torch.randn(1, 4, 6), torch.randn(1, 4, 6)]
    single = [torch.randn(1, 4, 6)]
    full = rows_residuals(parts, [None, Residuals(block, single)])
    assert [t.shape for t in full.block] == [(4, 4, 6)] * 2 and full.single[0].shape == (4, 4, 6)
    for ours, theirs in zip(full.block + full.single, block + single, strict=True):
        assert not ours[:3].any()
        assert torch.equal(ours[3:], theirs)
    assert full.keywords()["controlnet_blocks_repeat"] is False
