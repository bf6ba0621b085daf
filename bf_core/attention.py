"""Attention building blocks shared by backends (PhotoMaker V2's and PuLID v1.1's ID
encoders, InstantID's reference resampler): head reshapes, the perceiver attention and
its feed-forward block, with the attribute names their official state dicts use.
"""

from __future__ import annotations

import torch
from torch import nn


def split_heads(x: torch.Tensor, heads: int, batch: int | None = None) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d); head h takes channels h*d .. (h+1)*d - 1.

    batch: the batch size to reshape with, when it must come from another tensor (PuLID's
    processors split the ID keys with the text context's batch, as the official code does);
    None takes ``x``'s own.
    """
    batch = x.shape[0] if batch is None else batch
    return x.reshape(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d), the inverse of ``split_heads``."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear (no bias) -> exact GELU -> Linear (no bias); keys ``.0 .1 .3``."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """The queries attend over [context; queries], both pre-normed (a perceiver layer).

    qk_scale: the factor applied to q and to k each (d^-1/4 split evenly between them,
    which is more stable in half precision than one d^-1/2). Its exact float differs
    between the official codes (``d ** -0.25`` and ``1 / sqrt(sqrt(d))`` differ in the
    last bit), so each backend passes its own. The softmax runs in float32, then returns
    to the working dtype.
    """

    def __init__(self, dim: int, head_dim: int, heads: int, qk_scale: float):
        super().__init__()
        inner = head_dim * heads
        self.head_dim, self.heads, self.qk_scale = head_dim, heads, qk_scale
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """context (B, S, dim), queries (B, Q, dim) -> the update (B, Q, dim), no residual."""
        context, queries = self.norm1(context), self.norm2(queries)
        keys, values = self.to_kv(torch.cat([context, queries], dim=-2)).chunk(2, dim=-1)
        q = split_heads(self.to_q(queries), self.heads)
        k, v = split_heads(keys, self.heads), split_heads(values, self.heads)
        logits = (q * self.qk_scale) @ (k * self.qk_scale).transpose(-2, -1)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        return self.to_out(merge_heads(weights @ v))
