"""PhotoMaker V1 and V2 ID encoders.

Both encoders turn N reference images of one identity into ID vectors of the SDXL text
width D (2048 at real size = 768 CLIP-L + 1280 OpenCLIP-bigG) and fuse them into the
prompt embedding at the positions of the repeated class word:

- V1: one vector per image, the pooled CLIP output through two projections, concatenated.
- V2: two vectors per image, queries seeded from a 512-d face-recognition embedding and
  refined by a small perceiver over the CLIP patch tokens.

The state-dict keys and shapes equal those of the official checkpoints'
``id_encoder`` part, so a strict load works; V2 keeps the two projections it stores but
does not use. Unlike the official modules, the fusion never writes into its input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from bf_core.attention import PerceiverAttention, feed_forward
from bf_core.errors import ConfigError

if TYPE_CHECKING:  # keep transformers out of module import time
    from transformers import CLIPVisionConfig

#: Sizes of the real vision tower (CLIP ViT-L/14 at 224 px); everything else is the
#: transformers default (quick_gelu, layer-norm eps 1e-5, 3 channels).
REAL_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
}

#: Width of the second projection: the OpenCLIP-bigG part of the SDXL text embedding.
REAL_SECOND_PROJECTION_DIM = 1280
#: Width of the insightface (ArcFace) embedding that seeds the V2 queries.
FACE_EMBEDDING_DIM = 512


def real_vision_config() -> CLIPVisionConfig:
    """The vision-tower config of the official PhotoMaker checkpoints."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**REAL_VISION_CONFIG)


# --------------------------------------------------------------------------------------
# Pure functions: the fusion
# --------------------------------------------------------------------------------------


def gather_class_token_rows(prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor,
                            ) -> torch.Tensor:
    """Rows of the prompt embedding at the class-token positions.

    prompt_embeds (B, L, D), class_tokens_mask (B, L) bool -> (B * K, D), where K is the
    number of true positions per row, in batch-major then position order.
    """
    return prompt_embeds[class_tokens_mask]


def scatter_class_token_rows(prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor,
                             rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``prompt_embeds`` whose class-token positions hold ``rows``.

    prompt_embeds (B, L, D), class_tokens_mask (B, L) bool, rows (B * K, D) in the order
    of ``gather_class_token_rows`` -> (B, L, D). The input is not modified, and every
    unmasked position is copied unchanged.
    """
    out = prompt_embeds.clone()
    out[class_tokens_mask] = rows.to(out.dtype)
    return out


def check_class_token_count(class_tokens_mask: torch.Tensor, num_id_tokens: int) -> None:
    """Raise unless every prompt row has exactly ``num_id_tokens`` class-token positions.

    class_tokens_mask (B, L) bool. A mismatch happens when the repeated class word runs
    past the 77-token limit; the official code then silently drops images (V1) or fails
    with a size error, so we refuse with a message that says what to change.
    """
    counts = class_tokens_mask.sum(dim=-1)
    if bool((counts != num_id_tokens).any()):
        raise ConfigError(
            f"the class-token mask marks {counts.tolist()} position(s) per prompt but the "
            f"ID encoder produced {num_id_tokens} ID token(s) per prompt. The repeated class "
            "word probably ran past the 77-token limit: shorten the prompt, put the class "
            "word and trigger earlier, or use fewer reference images.")


def fuse_text_and_id(text_rows: torch.Tensor, id_rows: torch.Tensor,
                     fuse_module: PhotoMakerFuseModule) -> torch.Tensor:
    """PhotoMaker's fusion of one text vector with one ID vector, row by row.

    text_rows (K, D) = c_k, id_rows (K, D) = e_k -> (K, D):
    f_k = layer_norm(mlp2(mlp1(concat(c_k, e_k)) + c_k)), text first in the concat;
    ``mlp1`` has no internal residual, ``mlp2`` has one.
    """
    stacked = torch.cat([text_rows, id_rows], dim=-1)
    merged = fuse_module.mlp1(stacked) + text_rows
    return fuse_module.layer_norm(fuse_module.mlp2(merged))


# --------------------------------------------------------------------------------------
# Modules (attribute names fixed by the checkpoint keys)
# --------------------------------------------------------------------------------------


class PhotoMakerMLP(nn.Module):
    """LayerNorm -> Linear -> exact GELU -> Linear, optionally adding its input back."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ConfigError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and "
                             f"{out_dim}; pass use_residual=False or equal widths.")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_dim) -> (..., out_dim)."""
        out = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class PhotoMakerFuseModule(nn.Module):
    """Weights of the text/ID fusion; the math is ``fuse_text_and_id``."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = PhotoMakerMLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = PhotoMakerMLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor,
                id_tokens: torch.Tensor) -> torch.Tensor:
        """Fused prompt embedding P'; the input is left untouched.

        prompt_embeds (B, L, D), class_tokens_mask (B, L) bool with K true positions per
        row, id_tokens (B, K, D) in image-major then token order -> (B, L, D) in the
        prompt's dtype.
        """
        batch, num_id_tokens, width = id_tokens.shape
        check_class_token_count(class_tokens_mask, num_id_tokens)
        text_rows = gather_class_token_rows(prompt_embeds, class_tokens_mask)
        # The fusion runs in the weights' dtype (the official code fails on a mismatch;
        # with equal dtypes, the usual case, nothing is cast), the result in the prompt's.
        weight_dtype = self.layer_norm.weight.dtype
        id_rows = id_tokens.reshape(batch * num_id_tokens, width).to(weight_dtype)
        fused = fuse_text_and_id(text_rows.to(weight_dtype), id_rows, self)
        return scatter_class_token_rows(prompt_embeds, class_tokens_mask, fused)


class FacePerceiverResampler(nn.Module):
    """Refines the face-seeded queries over the projected CLIP tokens."""

    def __init__(self, dim: int, depth: int, head_dim: int, num_heads: int,
                 embedding_dim: int, output_dim: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, head_dim, num_heads, qk_scale=head_dim ** -0.25),
                           feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, queries: torch.Tensor, image_hidden: torch.Tensor) -> torch.Tensor:
        """queries (B, Q, dim), image_hidden (B, S, embedding_dim) -> (B, Q, output_dim)."""
        # The image tokens are projected once and re-normed by each layer, never updated.
        image_tokens = self.proj_in(image_hidden)
        for attention, mlp in self.layers:
            queries = queries + attention(image_tokens, queries)
            queries = queries + mlp(queries)
        return self.norm_out(self.proj_out(queries))


class QFormerPerceiver(nn.Module):
    """V2's ID token maker: face embedding -> T queries -> perceiver over CLIP tokens."""

    def __init__(self, id_embedding_dim: int, cross_attention_dim: int, num_tokens: int,
                 embedding_dim: int, head_dim: int, depth: int, ratio: int, ff_mult: int):
        super().__init__()
        if cross_attention_dim % head_dim:
            raise ConfigError(f"cross_attention_dim {cross_attention_dim} must be a multiple "
                             f"of the perceiver head_dim {head_dim}; pick a head_dim that "
                             "divides it.")
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        hidden = id_embedding_dim * ratio
        self.token_proj = nn.Sequential(nn.Linear(id_embedding_dim, hidden), nn.GELU(),
                                        nn.Linear(hidden, cross_attention_dim * num_tokens))
        self.token_norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=depth, head_dim=head_dim,
            num_heads=cross_attention_dim // head_dim, embedding_dim=embedding_dim,
            output_dim=cross_attention_dim, ff_mult=ff_mult)

    def forward(self, face_embeds: torch.Tensor, image_hidden: torch.Tensor) -> torch.Tensor:
        """face_embeds (M, 512), image_hidden (M, S, hidden) -> ID tokens (M, T, D).

        Queries Q0 = token_norm(reshape(token_proj(a))); result Q0 + perceiver(Q0, H).
        """
        queries = self.token_proj(face_embeds)
        queries = self.token_norm(queries.reshape(-1, self.num_tokens, self.cross_attention_dim))
        return queries + self.perceiver_resampler(queries, image_hidden)


# --------------------------------------------------------------------------------------
# The two encoders
# --------------------------------------------------------------------------------------


def _as_image_batch(pixel_values: torch.Tensor) -> torch.Tensor:
    """Accept (N, 3, H, W) for one prompt or (B, N, 3, H, W); return the 5-d form."""
    if pixel_values.dim() == 4:
        return pixel_values.unsqueeze(0)
    if pixel_values.dim() != 5:
        raise ConfigError(f"pixel_values must be (N, 3, H, W) or (B, N, 3, H, W), got shape "
                         f"{tuple(pixel_values.shape)}; preprocess the images with "
                         "preprocess_id_images first.")
    return pixel_values


class _PhotoMakerEncoderBase(nn.Module):
    """Vision tower, the two projections and the fuse module shared by V1 and V2."""

    version: ClassVar[str]
    tokens_per_image: ClassVar[int]

    def __init__(self, vision_config: CLIPVisionConfig | None = None,
                 second_projection_dim: int = REAL_SECOND_PROJECTION_DIM):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.vision_config = vision_config if vision_config is not None else real_vision_config()
        # Borrow the tower and first projection so the keys read vision_model.* and
        # visual_projection.* exactly as in the checkpoints, on any transformers version.
        tower = CLIPVisionModelWithProjection(self.vision_config)
        self.vision_model = tower.vision_model
        self.visual_projection = tower.visual_projection
        hidden = self.vision_config.hidden_size
        self.visual_projection_2 = nn.Linear(hidden, second_projection_dim, bias=False)
        self.embed_dim = self.vision_config.projection_dim + second_projection_dim
        self.fuse_module = PhotoMakerFuseModule(self.embed_dim)

    @property
    def image_size(self) -> int:
        """Side in pixels of the square images the vision tower takes."""
        return self.vision_config.image_size

    def _run_tower(self, pixel_values: torch.Tensor):
        """pixel_values (B, N, 3, H, W) -> tower output over the B * N images, batched."""
        batch, count = pixel_values.shape[:2]
        flat = pixel_values.reshape(batch * count, *pixel_values.shape[2:])
        return self.vision_model(pixel_values=flat.to(self.visual_projection.weight.dtype))

    def fuse(self, prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor,
             id_tokens: torch.Tensor) -> torch.Tensor:
        """P' from the prompt embedding, its class-token mask and ID tokens (B, K, D)."""
        return self.fuse_module(prompt_embeds, class_tokens_mask, id_tokens)


class PhotoMakerIDEncoderV1(_PhotoMakerEncoderBase):
    """PhotoMaker V1: one ID vector per image from the pooled CLIP output.

    Keys and shapes at the default sizes equal the ``id_encoder`` part of
    ``photomaker-v1.bin`` (407 tensors).
    """

    version = "v1"
    tokens_per_image = 1

    def encode_id_tokens(self, pixel_values: torch.Tensor,
                         face_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, N, 3, H, W) or (N, 3, H, W) -> ID tokens (B, N, D).

        e_n = concat(visual_projection(z_n), visual_projection_2(z_n)) with z_n the
        post-layer-norm CLS output; CLIP-L width first, as in the SDXL text concat.
        """
        if face_embeds is not None:
            raise ConfigError("PhotoMaker V1 uses no face embeddings; pass face_embeds=None "
                             "(only V2 takes insightface embeddings).")
        pixel_values = _as_image_batch(pixel_values)
        batch, count = pixel_values.shape[:2]
        pooled = self._run_tower(pixel_values).pooler_output
        id_vectors = torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)],
                               dim=-1)
        return id_vectors.reshape(batch, count, self.embed_dim)

    def forward(self, pixel_values: torch.Tensor, prompt_embeds: torch.Tensor,
                class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """Fused prompt embedding (B, L, D); see ``encode_id_tokens`` and ``fuse``."""
        return self.fuse(prompt_embeds, class_tokens_mask, self.encode_id_tokens(pixel_values))


class PhotoMakerIDEncoderV2(_PhotoMakerEncoderBase):
    """PhotoMaker V2: two ID tokens per image from a face embedding and the CLIP tokens.

    Keys and shapes at the default sizes equal the ``id_encoder`` part of
    ``photomaker-v2.bin`` (463 tensors). ``visual_projection`` and
    ``visual_projection_2`` are stored in the checkpoint and kept here so a strict load
    works, but the V2 computation does not use them.
    """

    version = "v2"
    tokens_per_image = 2

    def __init__(self, vision_config: CLIPVisionConfig | None = None,
                 second_projection_dim: int = REAL_SECOND_PROJECTION_DIM,
                 face_embedding_dim: int = FACE_EMBEDDING_DIM, perceiver_head_dim: int = 128,
                 perceiver_depth: int = 4, token_proj_ratio: int = 4, ff_mult: int = 4):
        super().__init__(vision_config, second_projection_dim)
        self.face_embedding_dim = face_embedding_dim
        self.qformer_perceiver = QFormerPerceiver(
            id_embedding_dim=face_embedding_dim, cross_attention_dim=self.embed_dim,
            num_tokens=self.tokens_per_image, embedding_dim=self.vision_config.hidden_size,
            head_dim=perceiver_head_dim, depth=perceiver_depth, ratio=token_proj_ratio,
            ff_mult=ff_mult)

    def encode_id_tokens(self, pixel_values: torch.Tensor,
                         face_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, N, 3, H, W) or (N, 3, H, W), face_embeds (B, N, 512) or (N, 512)
        (raw insightface embeddings, one per image, same order) -> ID tokens (B, N * 2, D),
        image-major then token.

        The CLIP branch uses ``last_hidden_state`` (all tokens, no post layer norm).
        """
        pixel_values = _as_image_batch(pixel_values)
        batch, count = pixel_values.shape[:2]
        if face_embeds is None:
            raise ConfigError("PhotoMaker V2 needs one insightface embedding per reference "
                             "image: pass face_embeds of shape (N, 512).")
        if face_embeds.dim() == 2:
            face_embeds = face_embeds.unsqueeze(0)
        if tuple(face_embeds.shape) != (batch, count, self.face_embedding_dim):
            raise ConfigError(
                f"face_embeds has shape {tuple(face_embeds.shape)} but the {count} reference "
                f"image(s) need ({batch}, {count}, {self.face_embedding_dim}): give exactly "
                "one face embedding per image, in the same order (drop images without a face).")
        hidden = self._run_tower(pixel_values).last_hidden_state
        faces = face_embeds.reshape(batch * count, -1).to(hidden.dtype)
        id_tokens = self.qformer_perceiver(faces, hidden)
        return id_tokens.reshape(batch, count * self.tokens_per_image, self.embed_dim)

    def forward(self, pixel_values: torch.Tensor, prompt_embeds: torch.Tensor,
                class_tokens_mask: torch.Tensor, face_embeds: torch.Tensor) -> torch.Tensor:
        """Fused prompt embedding (B, L, D); see ``encode_id_tokens`` and ``fuse``."""
        id_tokens = self.encode_id_tokens(pixel_values, face_embeds)
        return self.fuse(prompt_embeds, class_tokens_mask, id_tokens)


PhotoMakerIDEncoder = PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2

ENCODER_CLASSES: dict[str, type[_PhotoMakerEncoderBase]] = {
    "v1": PhotoMakerIDEncoderV1,
    "v2": PhotoMakerIDEncoderV2,
}
