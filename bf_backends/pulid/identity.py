"""From face features to PuLID's ID embeddings, and their layout over a UNet batch.

``encode_identity`` gives E (the identity tokens, T_id) and E_neg (the negative tokens, an
image-independent constant of the checkpoint) as the official pipelines form them:

- v1: each image is encoded on its own (10 tokens); supplementary images are appended
  along the token axis, all 10 tokens with ``id_mix`` or only their first 5 (global)
  tokens without it, as ``app.py``'s "ID Mix" switch does. E_neg is concatenated the same
  way.
- v1.1: all images are encoded jointly into one set of 32 tokens; E_neg comes from a
  single all-zero image.

``rows_embedding`` lays E and E_neg over the rows of one UNet call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bf_backends.pulid.encoder import IDEncoder, IDFormer, negative_id_embedding
from bf_backends.pulid.features import FaceFeatures

#: v1 tokens of a supplementary image without ID Mix (the global tokens).
V1_GLOBAL_TOKENS = 5


@torch.no_grad()
def encode_identity(encoder: IDEncoder | IDFormer, features: Sequence[FaceFeatures],
                    id_mix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of n >= 1 images -> (E, E_neg), each (1, T, context width), float32.

    T = 10 + (n - 1) * (10 if id_mix else 5) for v1; T = 32 for v1.1.
    """
    if not features:
        raise ValueError("encode_identity needs the features of at least one image")
    vit_tokens = features[0].vit_hidden[0].shape[1]
    negative = negative_id_embedding(encoder, vit_tokens=vit_tokens)
    if isinstance(encoder, IDFormer):
        id_cond = torch.stack([f.id_cond[0] for f in features])[None]  # (1, n, 1280)
        hidden = [torch.cat([f.vit_hidden[scale] for f in features], dim=1)
                  for scale in range(len(features[0].vit_hidden))]  # (1, 577 n, 1024)
        return encoder(id_cond, hidden), negative
    positives, negatives = [], []
    for index, feature in enumerate(features):
        tokens = encoder(feature.id_cond, feature.vit_hidden)
        keep = tokens.shape[1] if index == 0 or id_mix else V1_GLOBAL_TOKENS
        positives.append(tokens[:, :keep])
        negatives.append(negative[:, :keep])
    return torch.cat(positives, dim=1), torch.cat(negatives, dim=1)


def broadcast_rows(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """(1 or rows, T, D) -> (rows, T, D)."""
    if tokens.shape[0] == rows:
        return tokens
    if tokens.shape[0] != 1:
        raise ValueError(f"ID tokens have batch {tokens.shape[0]}; expected 1 or {rows}")
    return tokens.expand(rows, -1, -1)


def cfg_rows_embedding(positive: torch.Tensor, negative: torch.Tensor,
                       rows: int) -> torch.Tensor:
    """(1, T, D) each -> (2 rows, T, D) = [E_neg x rows ; E x rows], the CFG batch order."""
    return torch.cat([broadcast_rows(negative, rows), broadcast_rows(positive, rows)], dim=0)


def guidance_off_sequence(positive: torch.Tensor, negative: torch.Tensor,
                          num_zero: int) -> torch.Tensor:
    """(1, T, D) each -> (1, 2 (T + Z), D) = [E_neg ; 0_Z ; E ; 0_Z].

    What the official v1 processors attend to at guidance 1.0: the diffusers pipeline
    turns CFG off (UNet batch 1) while the ID tensor keeps batch 2, and the processors'
    reshape by the text batch concatenates both halves into one sequence.
    Used with ``num_zero = 0`` it reproduces that call exactly. The official code splits
    the sequence across samples when it makes several images at once; we give every
    sample the whole sequence.
    """
    zeros = positive.new_zeros(1, num_zero, positive.shape[-1])
    return torch.cat([negative[:1], zeros, positive[:1], zeros], dim=1)
