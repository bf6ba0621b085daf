"""InfiniteYou's own torch module: the Resampler that turns a face embedding into T_id.

The official ``pipelines/resampler.py`` (bytedance/InfiniteYou) with the arguments of
``InfUFluxPipeline``: ``Resampler(dim=1280, depth=4, dim_head=64, heads=20,
num_queries=8, embedding_dim=512, output_dim=4096, ff_mult=4)``. Its state dict is the
``image_proj`` part of ``image_proj_model.bin``, key for key; the perceiver layers and the
feed-forward blocks are the shared ones of ``bf_core.attention``, with the official
``1 / sqrt(sqrt(d))`` split of the attention scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bf_core.attention import PerceiverAttention, feed_forward


@dataclass(frozen=True)
class ResamplerShape:
    """The Resampler's sizes; the defaults are the published InfiniteYou ones.

    width: the latent width (``dim``); heads x head_dim is the attention's inner width,
    equal to ``width`` in the published model (20 x 64 = 1280). output_dim: the width of
    T_id, the T5 width 4096 of FLUX.1 (InfuseNet's ``joint_attention_dim``).
    """

    width: int = 1280
    depth: int = 4
    head_dim: int = 64
    heads: int = 20
    num_queries: int = 8
    embedding_dim: int = 512
    output_dim: int = 4096
    ff_mult: int = 4


class InfiniteYouResampler(nn.Module):
    """(B, N, 512) ArcFace embeddings -> T_id (B, Q, output_dim), Q = 8 learned queries.

    proj_in maps the N embeddings to ``width``; ``depth`` perceiver layers update the
    queries (each reads [embeddings; queries]), each followed by a feed-forward block, both
    residual; proj_out + LayerNorm give the output width.
    """

    def __init__(self, shape: ResamplerShape = ResamplerShape()):
        super().__init__()
        self.shape = shape
        width = shape.width
        self.latents = nn.Parameter(torch.randn(1, shape.num_queries, width) / width**0.5)
        self.proj_in = nn.Linear(shape.embedding_dim, width)
        self.proj_out = nn.Linear(width, shape.output_dim)
        self.norm_out = nn.LayerNorm(shape.output_dim)
        # The official code scales q and k each by 1 / sqrt(sqrt(d)) (not d ** -0.25, which
        # differs in the last bit).
        qk_scale = 1 / math.sqrt(math.sqrt(shape.head_dim))
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(width, shape.head_dim, shape.heads, qk_scale),
                           feed_forward(width, shape.ff_mult)])
            for _ in range(shape.depth)])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (B, N, embedding_dim) -> (B, num_queries, output_dim)."""
        queries = self.latents.repeat(embeddings.shape[0], 1, 1)
        context = self.proj_in(embeddings)
        for attention, feed in self.layers:
            queries = attention(context, queries) + queries
            queries = feed(queries) + queries
        return self.norm_out(self.proj_out(queries))
