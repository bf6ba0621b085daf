"""PuLID ID attention for diffusers ``Attention`` layers (shared by PuLID v1 and v1.1).

Every cross-attention layer of the UNet gets a :class:`PuLIDIDAttnProcessor` holding the
bias-free projections ``id_to_k`` / ``id_to_v``; self-attention processors are left as
they are. The ID tokens reach the processors through a shared
:class:`PuLIDAttentionState` read at call time (or, as in the official code, through
``cross_attention_kwargs={"id_embedding": E, "id_scale": s}``). With no embedding set, or
with the state switched off, a processor hands the call to the processor it replaced, so
the same UNet serves the ID line and a semantic line that is bit-identical to the
untouched UNet. One UNet call can also hold rows of both lines: ``enabled_rows`` switches
the ID attention per row (see :func:`select_rows`).

Processor numbering follows the official checkpoints: the 0-based position in
``unet.attn_processors`` (diffusers walks down -> up -> mid blocks, attn1 before attn2);
only cross-attention positions (odd in SDXL) carry weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from bf_core.errors import ConfigError

OrthoMode = Literal["off", "ortho", "ortho_v2"]
_ORTHO_MODES = ("off", "ortho", "ortho_v2")
#: ORTHO_v2 measures the attention mass on the first five ID tokens (v1's global tokens).
NUM_GLOBAL_ID_TOKENS = 5
#: (num_zero, ortho) of the modes the official demos set; "fidelity" is the paper's baseline.
PULID_MODES: dict[str, tuple[int, OrthoMode]] = {
    "fidelity": (8, "ortho_v2"),
    "extremely_style": (16, "ortho"),
    "v1.1_default": (20, "ortho_v2"),
    "plain": (0, "off"),
}


@dataclass(frozen=True)
class PuLIDAttentionConfig:
    """How ID attention is mixed into text attention (explicit, never module globals)."""

    num_zero: int = 8
    """Zero tokens appended to the ID tokens (attention sinks; more = weaker identity)."""
    ortho: OrthoMode = "ortho_v2"
    """"off": A + s I; "ortho": remove I's spatial projection on A; "ortho_v2": remove it
    only where image tokens do not attend to the global ID tokens."""
    id_scale: float = 0.8
    """Weight s of the ID attention output."""

    def __post_init__(self) -> None:
        if isinstance(self.num_zero, bool) or not isinstance(self.num_zero, int) \
                or self.num_zero < 0:
            raise ConfigError(f"PuLIDAttentionConfig.num_zero must be an integer >= 0, got "
                              f"{self.num_zero!r}.")
        if self.ortho not in _ORTHO_MODES:
            raise ConfigError(f"PuLIDAttentionConfig.ortho must be one of {_ORTHO_MODES}, got "
                              f"{self.ortho!r}.")
        if isinstance(self.id_scale, bool) or not isinstance(self.id_scale, (int, float)) \
                or not math.isfinite(self.id_scale):
            raise ConfigError(f"PuLIDAttentionConfig.id_scale must be a finite number, got "
                              f"{self.id_scale!r}.")

    @classmethod
    def from_mode(cls, mode: str, id_scale: float = 0.8) -> PuLIDAttentionConfig:
        """A named official mode ("fidelity", "extremely_style", "v1.1_default", "plain")."""
        if mode not in PULID_MODES:
            raise ConfigError(f"unknown PuLID mode {mode!r}; choose one of {sorted(PULID_MODES)}.")
        num_zero, ortho = PULID_MODES[mode]
        return cls(num_zero=num_zero, ortho=ortho, id_scale=id_scale)


class PuLIDAttentionState:
    """Shared, mutable per-call switch read by every installed ID processor at call time.

    ``id_embedding`` (B, T, context width) or None; ``enabled`` False forces plain
    attention even when an embedding is set; ``enabled_rows`` (B,) bool or None: with an
    embedding set, ID attention only for the rows where it is True and plain text attention
    for the others (one UNet call holding the rows of several lines); ``config`` the mixing
    settings.
    """

    def __init__(self, config: PuLIDAttentionConfig | None = None) -> None:
        self.config = config or PuLIDAttentionConfig()
        self.id_embedding: torch.Tensor | None = None
        self.enabled = True
        self.enabled_rows: torch.Tensor | None = None

    def _snapshot(self) -> tuple:
        return self.id_embedding, self.config, self.enabled, self.enabled_rows

    def _restore(self, snapshot: tuple) -> None:
        self.id_embedding, self.config, self.enabled, self.enabled_rows = snapshot

    @contextmanager
    def using(self, id_embedding: torch.Tensor | None,
              config: PuLIDAttentionConfig | None = None,
              enabled_rows: torch.Tensor | None = None) -> Iterator[PuLIDAttentionState]:
        """Set the ID tokens (and optionally the config and the per-row switch) for the calls
        inside the block. ``enabled_rows`` (B,) bool: rows without ID attention are False."""
        previous = self._snapshot()
        self.id_embedding, self.enabled, self.enabled_rows = id_embedding, True, enabled_rows
        if config is not None:
            self.config = config
        try:
            yield self
        finally:
            self._restore(previous)

    @contextmanager
    def disabled(self) -> Iterator[PuLIDAttentionState]:
        """Plain attention inside the block (the semantic line), whatever is set."""
        previous = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = previous


# ---------------------------------------------------------------- pure tensor functions

def pad_zero_tokens(id_embedding: torch.Tensor, num_zero: int) -> torch.Tensor:
    """(B, T, D) -> (B, T + num_zero, D): append zero tokens (zero keys and values)."""
    if num_zero == 0:
        return id_embedding
    zeros = id_embedding.new_zeros(id_embedding.shape[0], num_zero, id_embedding.shape[-1])
    return torch.cat([id_embedding, zeros], dim=1)


def split_heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(b, L, heads * d) -> (batch, heads, L', d), reshaped with the *text* batch size.

    As in the official processor, the split uses the batch size of the text context.
    """
    return x.reshape(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def global_token_attention_mass(query: torch.Tensor, id_key: torch.Tensor) -> torch.Tensor:
    """alpha of ORTHO_v2: query (B, H, N, d), id_key (B, H, T + Z, d) -> (B, N, 1).

    Softmax of the *unscaled* logits over all ID keys (zeros included), in the working
    dtype; mean over heads first, then the sum of the first five columns (this order is
    what makes half-precision results match the official code bit for bit).
    """
    weights = (query @ id_key.transpose(-2, -1)).softmax(dim=-1)
    return weights.mean(dim=1)[:, :, :NUM_GLOBAL_ID_TOKENS].sum(dim=-1, keepdim=True)


def spatial_projection(text_out: torch.Tensor, id_out: torch.Tensor) -> torch.Tensor:
    """P = rho * A with rho[b, c] = sum_n A I / sum_n A^2; (B, N, C) each -> (B, N, C).

    A projection per batch item and channel over the spatial axis N, not per token. No
    epsilon in the denominator (as officially).
    """
    numerator = torch.sum(text_out * id_out, dim=-2, keepdim=True)
    denominator = torch.sum(text_out * text_out, dim=-2, keepdim=True)
    return numerator / denominator * text_out


def combine_text_and_id(text_out: torch.Tensor, id_out: torch.Tensor, ortho: OrthoMode,
                        id_scale: float, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Mix text attention A and ID attention I (both (B, N, C)) -> (B, N, C), A's dtype.

    "off": A + s I in the working dtype. "ortho": A + s (I - P) in float32.
    "ortho_v2": A + s (I + (alpha - 1) P) in float32, alpha (B, N, 1) in the working dtype.
    """
    if ortho == "off":
        return text_out + id_scale * id_out
    working_dtype = text_out.dtype
    text32, id32 = text_out.to(torch.float32), id_out.to(torch.float32)
    projection = spatial_projection(text32, id32)
    if ortho == "ortho":
        orthogonal = id32 - projection
    else:
        if alpha is None:
            raise ValueError("ortho='ortho_v2' needs alpha, the attention mass on the global "
                             "ID tokens; compute it with global_token_attention_mass.")
        # (alpha - 1) is formed in the working dtype; the product promotes it to float32.
        orthogonal = id32 + (alpha - 1) * projection
    return (text32 + id_scale * orthogonal).to(working_dtype)


def select_rows(enabled_rows: torch.Tensor, with_id: torch.Tensor,
                text_only: torch.Tensor) -> torch.Tensor:
    """Per row: ``with_id`` where ``enabled_rows`` (B,) is True, ``text_only`` elsewhere.

    with_id, text_only: (B, N, C) -> (B, N, C). ``torch.where`` copies the chosen values
    unchanged, so an off row is bit for bit the plain text attention of the same call, even
    where the unused ID mix is not finite (ORTHO divides 0 by 0 on a zero text context).
    """
    if enabled_rows.shape != (with_id.shape[0],):
        raise ValueError(f"the per-row ID switch has shape {tuple(enabled_rows.shape)} but the "
                         f"UNet call has {with_id.shape[0]} rows; set enabled_rows to a (rows,) "
                         f"bool tensor for exactly the rows of the call.")
    return torch.where(enabled_rows.view(-1, 1, 1), with_id, text_only)


# ---------------------------------------------------------------- the processor

class PuLIDIDAttnProcessor(nn.Module):
    """Cross-attention processor adding PuLID ID attention to text attention.

    ``id_to_k`` / ``id_to_v``: Linear(context width -> layer width, no bias), float32 by
    default (as officially); the ID tokens are projected in the projections' dtype and the
    keys/values are then cast to the query's dtype.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int,
                 state: PuLIDAttentionState | None = None, text_processor: object = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                 ) -> None:
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False, dtype=dtype,
                                 device=device)
        self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False, dtype=dtype,
                                 device=device)
        self.state = state if state is not None else PuLIDAttentionState()
        # Kept outside nn.Module registration: it is the weightless processor we replaced,
        # used for calls without ID, and must not appear in the state dict.
        object.__setattr__(self, "text_processor", text_processor or AttnProcessor2_0())

    # diffusers reads the declared parameters of __call__ to decide which
    # cross_attention_kwargs to pass, so __call__ (not forward) is the entry point.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 id_embedding: torch.Tensor | None = None,
                 id_scale: float | None = None) -> torch.Tensor:
        state = self.state
        embedding = id_embedding if id_embedding is not None else state.id_embedding
        if not state.enabled or embedding is None or encoder_hidden_states is None:
            extra = {} if temb is None else {"temb": temb}
            return self.text_processor(attn, hidden_states,
                                       encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=attention_mask, **extra)
        config = state.config
        scale = config.id_scale if id_scale is None else float(id_scale)
        return self._text_and_id_attention(attn, hidden_states, encoder_hidden_states,
                                           attention_mask, temb, embedding, config, scale,
                                           state.enabled_rows)

    def project_id_tokens(self, id_embedding: torch.Tensor, num_zero: int, batch: int,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T, D) -> keys and values (b, T + num_zero, layer width) in ``dtype``.

        ``b`` must equal the UNet batch ``batch`` or be 1 (shared by every batch item).
        """
        if id_embedding.ndim != 3 or id_embedding.shape[-1] != self.id_to_k.in_features:
            raise ValueError(f"id_embedding must have shape (batch, tokens, "
                             f"{self.id_to_k.in_features}), got {tuple(id_embedding.shape)}.")
        # Two comparisons, not `in (1, batch)`: torch.compile evaluates tuple membership of
        # symbolic batch sizes wrongly (a graph with a dynamic batch raised here).
        rows = id_embedding.shape[0]
        if rows != 1 and rows != batch:
            raise ValueError(f"id_embedding has batch {id_embedding.shape[0]} but the UNet call "
                             f"has batch {batch}; pass one ID embedding per batch item (for "
                             f"classifier-free guidance [E_neg ; E] in the text batch's order) "
                             f"or a single one for all.")
        weight = self.id_to_k.weight
        padded = pad_zero_tokens(id_embedding.to(weight.device, weight.dtype), num_zero)
        padded = padded.expand(batch, -1, -1)
        return self.id_to_k(padded).to(dtype), self.id_to_v(padded).to(dtype)

    def _text_and_id_attention(self, attn, hidden_states, encoder_hidden_states,
                               attention_mask, temb, id_embedding, config, id_scale,
                               enabled_rows=None):
        # Prologue and epilogue are those of diffusers' AttnProcessor2_0; only the mixing
        # of A (text attention, before to_out) with I (ID attention) is new. With
        # enabled_rows the ID term is computed for every row and kept only for the on rows:
        # the on rows then run exactly the kernels of an all-on call of the same batch.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            _, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = encoder_hidden_states.shape[0]
        query, text_out = _text_attention(attn, hidden_states, encoder_hidden_states,
                                          attention_mask, batch)
        id_key, id_value = self.project_id_tokens(id_embedding, config.num_zero, batch,
                                                  query.dtype)
        id_key = split_heads(id_key, batch, attn.heads)
        id_value = split_heads(id_value, batch, attn.heads)
        id_out = F.scaled_dot_product_attention(query, id_key, id_value, attn_mask=None,
                                                dropout_p=0.0, is_causal=False)
        id_out = merge_heads(id_out).to(query.dtype)
        alpha = (global_token_attention_mass(query, id_key) if config.ortho == "ortho_v2"
                 else None)
        hidden_states = combine_text_and_id(text_out, id_out, config.ortho, id_scale, alpha)
        if enabled_rows is not None:
            hidden_states = select_rows(enabled_rows, hidden_states, text_out)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _text_attention(attn: nn.Module, hidden_states: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                    batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query (B, H, N, d) and text attention A (B, N, C) before ``to_out``, computed as in
    diffusers' AttnProcessor2_0 (so ID off with s = 0 matches it exactly)."""
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask,
                                                     encoder_hidden_states.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = split_heads(attn.to_k(encoder_hidden_states), batch, attn.heads)
    value = split_heads(attn.to_v(encoder_hidden_states), batch, attn.heads)
    query = split_heads(query, batch, attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    text_out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                              dropout_p=0.0, is_causal=False)
    return query, merge_heads(text_out).to(query.dtype)


# ---------------------------------------------------------------- numbering and install

def _is_id_position(processor_name: str) -> bool:
    # As officially: every processor that is not a self-attention (attn1) one gets ID.
    return not processor_name.endswith("attn1.processor")


def _attention_module(unet: nn.Module, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name[: -len(".processor")])


def pulid_processor_numbering(unet: nn.Module) -> dict[int, str]:
    """Checkpoint number -> processor name of every ID-carrying (cross-attention) layer.

    The number is the position in ``unet.attn_processors``; for SDXL the odd numbers
    1..139, equal to the official manifests' ``numbering``.
    """
    return {number: name for number, name in enumerate(unet.attn_processors)
            if _is_id_position(name)}


def pulid_attention_shapes(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{"<number>.id_to_k.weight": (layer width, context width), ...}`` for ``unet``.

    The keys and shapes of the ``id_adapter_attn_layers.`` part a checkpoint must have.
    """
    shapes = {}
    for number, name in pulid_processor_numbering(unet).items():
        attn = _attention_module(unet, name)
        shape = (attn.to_q.out_features, attn.to_k.in_features)
        shapes[f"{number}.id_to_k.weight"] = shape
        shapes[f"{number}.id_to_v.weight"] = shape
    return shapes


class _WeightlessSlot(nn.Module):
    """Stands for a processor without ID weights in the numbered list."""


class PuLIDAttentionInstallation:
    """ID processors installed in a UNet; ``uninstall()`` (or leaving the ``with`` block,
    also on an exception) puts back the exact processor objects that were there before."""

    def __init__(self, unet: nn.Module, state: PuLIDAttentionState,
                 previous: dict[str, object], processors: dict[str, PuLIDIDAttnProcessor]
                 ) -> None:
        self.unet = unet
        self.state = state
        self.previous = previous
        self.processors = processors
        self.installed = True

    def numbered_layers(self) -> nn.ModuleList:
        """All processors in ``attn_processors`` order, ID ones in place, others as empty
        slots: the module the official ``id_adapter_attn_layers.`` keys load into."""
        return nn.ModuleList(self.processors.get(name, _WeightlessSlot())
                             for name in self.previous)

    def uninstall(self) -> None:
        """Restore the previous processors (same objects); calling it twice is harmless."""
        if not self.installed:
            return
        _set_processors(self.unet, self.previous)
        self.installed = False

    def __enter__(self) -> PuLIDAttentionInstallation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()


def exact_text_fallback(installation: PuLIDAttentionInstallation) -> bool:
    """True when every replaced processor is exactly diffusers' ``AttnProcessor2_0``.

    Then a row with the ID switched off inside a call with ID (``enabled_rows``) equals the
    replaced processor bit for bit: both run the same text attention. Any other processor
    (a subclass, another attention backend) may compute differently.
    """
    return all(type(processor.text_processor) is AttnProcessor2_0
               for processor in installation.processors.values())


def _set_processors(unet: nn.Module, processors: Mapping[str, object]) -> None:
    # set_attn_processor consumes the dict it is given; hand it a copy.
    unet.set_attn_processor(dict(processors))


def _check_replaceable(name: str, processor: object) -> None:
    if isinstance(processor, PuLIDIDAttnProcessor):
        raise ConfigError(f"PuLID ID attention is already installed in this UNet ({name}); "
                          "uninstall the existing installation before installing again.")
    if isinstance(processor, nn.Module) and any(True for _ in processor.parameters()):
        raise ConfigError(f"the cross-attention layer {name} uses {type(processor).__name__}, "
                          "which carries weights (another adapter). PuLID would replace it; "
                          "remove that adapter first (e.g. unet.set_default_attn_processor()).")


def install_pulid_attention(unet: nn.Module, state: PuLIDAttentionState | None = None, *,
                            dtype: torch.dtype = torch.float32) -> PuLIDAttentionInstallation:
    """Put a fresh :class:`PuLIDIDAttnProcessor` on every cross-attention layer of ``unet``.

    Self-attention processors stay as they are. Each replaced cross-attention processor
    must be weightless; it is kept and handles the calls made without ID. The new
    projections are created in ``dtype`` (float32 as officially) on the layer's device,
    randomly initialised: load weights with the loader. Returns the installation, a
    context manager that restores the previous processors.
    """
    state = state if state is not None else PuLIDAttentionState()
    previous = dict(unet.attn_processors)
    processors: dict[str, PuLIDIDAttnProcessor] = {}
    for name in pulid_processor_numbering(unet).values():
        _check_replaceable(name, previous[name])
        attn = _attention_module(unet, name)
        processors[name] = PuLIDIDAttnProcessor(
            attn.to_q.out_features, attn.to_k.in_features, state=state,
            text_processor=previous[name], dtype=dtype, device=attn.to_k.weight.device)
    try:
        _set_processors(unet, {**previous, **processors})
    except BaseException:
        _set_processors(unet, previous)
        raise
    return PuLIDAttentionInstallation(unet, state, previous, processors)
