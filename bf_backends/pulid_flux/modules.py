"""PuLID-FLUX's own modules: the ID cross-attention (``PerceiverAttentionCA``) and where its
copies sit in a FLUX transformer.

The ID encoder is PuLID v1.1's ``IDFormer`` (``bf_backends.pulid.modules``): the official
PuLID-FLUX encoder has the same class and defaults (dim 1024, depth 10, 16 heads of 64, 5
id tokens, 32 queries, output 2048, ff_mult 4), so T_id is (B, 32, 2048).

One ``PerceiverAttentionCA`` follows every second double block and every fourth single
block: 10 + 10 = 20 for FLUX.1's 19 + 38 blocks, numbered double blocks first, as the
checkpoint's ``pulid_ca.{0..19}``. Each lets the image tokens attend to T_id (no RoPE, plain
softmax) and its output is added to the block's image tokens. Every width is a parameter, so
tests build them at the tiny transformer's size; the defaults are the official ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bf_backends.pulid.modules import IDFormer, IDFormerConfig
from bf_core.attention import merge_heads, split_heads
from bf_core.errors import ConfigError

#: The FLUX transformer's block lists the modules follow, double blocks first.
DOUBLE_BLOCKS, SINGLE_BLOCKS = "transformer_blocks", "single_transformer_blocks"


@dataclass(frozen=True)
class PuLIDFluxConfig:
    """Sizes of PuLID-FLUX's modules that the transformer does not fix; defaults official.

    The cross-attention's query width is the transformer's inner width (heads x head width,
    3072 for FLUX.1) and its key/value width the encoder's output (2048): both follow from
    the transformer and ``encoder``.
    """

    encoder: IDFormerConfig = IDFormerConfig()
    """The IDFormer (the official PuLID-FLUX encoder is IDFormer() with its defaults)."""
    ca_heads: int = 16
    """Heads of each cross-attention module."""
    ca_dim_head: int = 128
    """Width of one head."""
    double_interval: int = 2
    """A module after double block i when i % double_interval == 0."""
    single_interval: int = 4
    """A module after single block i when i % single_interval == 0."""

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, IDFormerConfig):
            raise ConfigError(f"PuLIDFluxConfig.encoder must be an IDFormerConfig, got "
                              f"{type(self.encoder).__name__}.")
        for name in ("ca_heads", "ca_dim_head", "double_interval", "single_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PuLIDFluxConfig.{name} must be a positive integer, "
                                  f"got {value!r}.")

    @property
    def kv_dim(self) -> int:
        """Width of the ID tokens the cross-attention reads: the encoder's output."""
        return self.encoder.output_dim


class PerceiverAttentionCA(nn.Module):
    """The image tokens attend to the ID tokens (pulid/encoders_flux.py, spec 3.2).

    LayerNorm on both inputs (``norm1`` the ID tokens, ``norm2`` the image tokens), queries
    from the image, keys and values from the ID tokens, bias-free projections. Returns the
    update only; the caller adds ``weight * update`` to the image tokens.
    """

    def __init__(self, dim: int = 3072, kv_dim: int = 2048, heads: int = 16,
                 dim_head: int = 128) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        # q and k are each scaled by dim_head^(-1/4), written as the official 1/sqrt(sqrt(d)).
        self.qk_scale = 1 / math.sqrt(math.sqrt(dim_head))
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous, as the official reshape leaves them: the matrix products then see the
        # memory layout of the official code.
        return split_heads(x, self.heads).contiguous()

    def forward(self, id_tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """id_tokens (1 or B, T, kv_dim), image (B, N, dim) -> the update (B, N, dim).

        One set of ID tokens serves every image row by broadcasting, as officially.
        """
        id_tokens, image = self.norm1(id_tokens), self.norm2(image)
        keys, values = self.to_kv(id_tokens).chunk(2, dim=-1)
        q, k, v = self._heads(self.to_q(image)), self._heads(keys), self._heads(values)
        logits = (q * self.qk_scale) @ (k * self.qk_scale).transpose(-2, -1)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        return self.to_out(merge_heads(weights @ v))


@dataclass(frozen=True)
class BlockPosition:
    """A transformer block a cross-attention module follows: ``transformer.<blocks>[index]``."""

    blocks: str
    index: int


def injection_positions(num_double: int, num_single: int, double_interval: int = 2,
                        single_interval: int = 4) -> tuple[BlockPosition, ...]:
    """The blocks the modules follow, in checkpoint order (``pulid_ca.0`` first): double
    blocks i % double_interval == 0, then single blocks i % single_interval == 0.

    Their number is the official count ``n // k + (n % k != 0)`` per kind: 10 + 10 for
    FLUX.1's 19 double and 38 single blocks.
    """
    return (tuple(BlockPosition(DOUBLE_BLOCKS, i) for i in range(0, num_double, double_interval))
            + tuple(BlockPosition(SINGLE_BLOCKS, i) for i in range(0, num_single,
                                                                   single_interval)))


def transformer_inner_dim(transformer_config: Any) -> int:
    """The width of a FLUX transformer's tokens: heads x head width (3072 for FLUX.1)."""
    return transformer_config.num_attention_heads * transformer_config.attention_head_dim


def positions_for(transformer_config: Any, config: PuLIDFluxConfig) -> tuple[BlockPosition, ...]:
    """``injection_positions`` of a transformer with ``transformer_config``."""
    return injection_positions(transformer_config.num_layers, transformer_config.num_single_layers,
                               config.double_interval, config.single_interval)


def build_cross_attention(transformer_config: Any, config: PuLIDFluxConfig) -> nn.ModuleList:
    """One ``PerceiverAttentionCA`` per injection position, sized for the transformer."""
    dim = transformer_inner_dim(transformer_config)
    return nn.ModuleList(
        PerceiverAttentionCA(dim, config.kv_dim, config.ca_heads, config.ca_dim_head)
        for _ in positions_for(transformer_config, config))


def build_encoder(config: PuLIDFluxConfig) -> IDFormer:
    """The ID encoder: PuLID's IDFormer with ``config.encoder``."""
    return IDFormer(config.encoder)
