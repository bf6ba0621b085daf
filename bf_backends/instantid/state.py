"""Per-line switches for InstantID and exact capture/restore of the pipeline state they touch.

Two lines share one UNet (docs/backends/instantid.md):

* ID line: IP attention at the user's scale, IdentityNet residuals added.
* Semantic line: every IP processor's scale at 0 and IdentityNet not called. With
  diffusers' ``IPAdapterAttnProcessor2_0`` a zero scale skips the ID branch entirely, so the
  text attention is bit-identical to a UNet without the adapter; the official processors
  compute the branch and multiply it by 0 (exact while it is finite). The diffusers-native
  UNet still needs ``added_cond_kwargs["image_embeds"]`` on that call; any tensors of the
  right shape do, since their projection is discarded.

Per-call flags through ``cross_attention_kwargs`` do not reach the official processors (they
define ``forward`` only, and diffusers drops unknown keys), so the switch is state on the
processors, set between calls and always restored: ``preserved_attention_state`` restores
scales, processor objects and the IP projection even when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

SEMANTIC_LINE_IP_SCALE = 0.0


def ip_processors(unet) -> dict[str, object]:
    """``{processor name: processor}`` for every IP attention processor of ``unet``.

    Covers diffusers' native processors (``scale`` is a list per adapter) and the official
    InstantID / IP-Adapter ones (``scale`` is a float, ``to_k_ip`` a single Linear).
    """
    return {name: proc for name, proc in unet.attn_processors.items()
            if hasattr(proc, "to_k_ip") and hasattr(proc, "scale")}


def set_ip_scale(unet, scale: float) -> int:
    """Write ``scale`` into every IP processor (per adapter for native ones); return the count.

    Direct assignment, equivalent to ``pipe.set_ip_adapter_scale(scale)`` for one float but
    without re-walking the UNet's state dict, so it is cheap enough to do every step.
    """
    processors = ip_processors(unet)
    for proc in processors.values():
        if isinstance(proc.scale, (list, tuple)):
            proc.scale = [scale] * len(proc.scale)
        else:
            proc.scale = scale
    return len(processors)


@dataclass
class AttentionState:
    """What a line switch may touch on a UNet: processors, their IP scales, the projection."""

    processors: dict[str, object]
    scales: dict[str, object]
    encoder_hid_proj: object
    encoder_hid_dim_type: object
    extra: dict[str, object] = field(default_factory=dict)


def capture_attention_state(unet) -> AttentionState:
    """Snapshot the processor objects, IP scales (copied) and IP projection of ``unet``."""
    processors = dict(unet.attn_processors)
    scales = {name: list(proc.scale) if isinstance(proc.scale, (list, tuple)) else proc.scale
              for name, proc in processors.items() if hasattr(proc, "scale")}
    return AttentionState(
        processors=processors,
        scales=scales,
        encoder_hid_proj=getattr(unet, "encoder_hid_proj", None),
        encoder_hid_dim_type=getattr(unet.config, "encoder_hid_dim_type", None),
    )


def restore_attention_state(unet, state: AttentionState) -> None:
    """Put ``unet`` back exactly as captured (same processor objects, scales, projection)."""
    if getattr(unet, "encoder_hid_proj", None) is not state.encoder_hid_proj:
        unet.encoder_hid_proj = state.encoder_hid_proj
    if getattr(unet.config, "encoder_hid_dim_type", None) != state.encoder_hid_dim_type:
        # The same attribute write diffusers' own load/unload_ip_adapter use.
        unet.config.encoder_hid_dim_type = state.encoder_hid_dim_type
    current = unet.attn_processors
    if current.keys() != state.processors.keys() or any(
            current[name] is not proc for name, proc in state.processors.items()):
        unet.set_attn_processor(dict(state.processors))  # consumed by diffusers: pass a copy
    for name, scale in state.scales.items():
        proc = state.processors[name]
        proc.scale = list(scale) if isinstance(scale, list) else scale


@contextmanager
def preserved_attention_state(unet) -> Iterator[AttentionState]:
    """Run the body, then restore processors, IP scales and projection, even on exceptions."""
    state = capture_attention_state(unet)
    try:
        yield state
    finally:
        restore_attention_state(unet, state)


@contextmanager
def ip_scale(unet, scale: float) -> Iterator[None]:
    """Temporarily set every IP processor's scale (restored afterwards, even on exceptions)."""
    with preserved_attention_state(unet):
        set_ip_scale(unet, scale)
        yield


@contextmanager
def semantic_line(unet) -> Iterator[None]:
    """The semantic line's UNet state: ID attention off (scale 0), restored afterwards.

    IdentityNet is switched off by not calling it (pass no additional residuals); that is
    the caller's part of the switch.
    """
    with ip_scale(unet, SEMANTIC_LINE_IP_SCALE):
        yield
