"""PuLID's identity step: a person's reference photos -> E and E_neg, and their layout over
the rows of a UNet call.

``encode_identity`` gives E (the identity tokens, T_id) and E_neg (the negative tokens, an
image-independent constant of the checkpoint) as the official pipelines form them:

- v1: each image is encoded on its own (10 tokens); supplementary images are appended
  along the token axis, all 10 tokens with ``id_mix`` or only their first 5 (global)
  tokens without it, as ``app.py``'s "ID Mix" switch does. E_neg is concatenated the same
  way.
- v1.1: all images are encoded jointly into one set of 32 tokens; E_neg comes from a
  single all-zero image.

``PuLIDIdentityEncoder`` runs it on a ``Person``; ``broadcast_rows``, ``cfg_rows_embedding``
and ``guidance_off_sequence`` lay E and E_neg over the rows of one UNet call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bf_backends.pulid.features import FaceFeatures
from bf_backends.pulid.loader import PuLIDAdapter
from bf_backends.pulid.modules import IDEncoder, IDFormer, negative_id_embedding
from bf_core.errors import ConfigError
from bf_core.images import load_images
from bf_core.records import Identity, Person

#: v1 tokens of a supplementary image without ID Mix (the global tokens).
V1_GLOBAL_TOKENS = 5
#: ``Identity.state`` keys of E and E_neg (1, T, D) float32; both None without photos.
ID_EMBEDDING, NEGATIVE_ID_EMBEDDING = "id_embedding", "negative_id_embedding"
NO_PHOTOS = ("PuLID needs at least one reference photo: pass id_images=[...] "
             "(a path, PIL image or array with one clearly visible face).")


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


class PuLIDIdentityEncoder:
    """A person's photos -> ``Identity(tokens=E, negative_tokens=E_neg)``, E and E_neg also
    in ``state`` (float32, as the ID attention takes them).

    adapter: the pipeline's ``pipe.pulid``; device, dtype: where and how T_id joins the
    text tokens (IdAP); photos_required: the method is on, so a person without photos is an
    error. With the method off (the baseline) photos are optional: without them the
    identity has no tokens (N = 0), its state holds None and the ID attention stays off.
    """

    def __init__(self, adapter: PuLIDAdapter, *, default_id_prompt: str, id_mix: bool,
                 photos_required: bool, device: torch.device | None, dtype: torch.dtype) -> None:
        self.adapter, self.default_id_prompt, self.id_mix = adapter, default_id_prompt, id_mix
        self.photos_required, self.device, self.dtype = photos_required, device, dtype

    def encode(self, person: Person) -> Identity:
        id_prompt = person.id_prompt or self.default_id_prompt
        if not person.id_images:
            if self.photos_required:
                raise ConfigError(NO_PHOTOS)
            empty = torch.zeros(1, 0, self.adapter.encoder.token_width, device=self.device,
                                dtype=self.dtype)
            return Identity(id_prompt, tokens=empty,
                            state={ID_EMBEDDING: None, NEGATIVE_ID_EMBEDDING: None})
        positive, negative = self.embeddings(person.id_images)
        # T_id joins the text tokens in IdAP, so it takes the text embeddings' dtype/device.
        return Identity(id_prompt, tokens=positive.to(self.device, self.dtype),
                        negative_tokens=negative.to(self.device, self.dtype),
                        state={ID_EMBEDDING: positive, NEGATIVE_ID_EMBEDDING: negative})

    def embeddings(self, id_images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, E_neg), each (1, T, context width) float32, of the reference photos."""
        images = load_images(id_images)
        features = [self.adapter.features(image, index) for index, image in enumerate(images)]
        return encode_identity(self.adapter.encoder, features, self.id_mix)


def identity_embeddings(identity: Identity) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(E, E_neg) of an identity from ``PuLIDIdentityEncoder``, or None when it has none."""
    positive = identity.state.get(ID_EMBEDDING)
    if positive is None:
        return None
    return positive, identity.state[NEGATIVE_ID_EMBEDDING]


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
