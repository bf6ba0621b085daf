"""What IP-Adapter a pipeline carries, and exact per-line switches for its state.

Everything here works on the objects diffusers' ``load_ip_adapter`` installs: the
``IPAdapterAttnProcessor*`` cross-attention processors (``scale`` lists), the
``MultiIPAdapterImageProjection`` in ``unet.encoder_hid_proj`` and, for FaceID, the PEFT
LoRA adapters named ``faceid_<i>``. Nothing is re-implemented; the switches only change
the attributes diffusers and PEFT read at call time, and put back the exact objects they
replaced.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bf_core.errors import CheckpointError, ConfigError
from bf_core.switching import stored_adapter_names

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_FACEID_ADAPTER = re.compile(r"faceid_\d+")
_PLUS_FAMILY = ("plus", "plus-face")


# ---------------------------------------------------------------------------------------
# Finding the pieces
# ---------------------------------------------------------------------------------------

def _unet(pipe_or_unet):
    """Accept a pipeline (``.unet``) or the UNet itself."""
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def image_projection_layers(pipe_or_unet) -> list:
    """The per-adapter projection modules, or ``[]`` when no IP-Adapter is loaded."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    unet = _unet(pipe_or_unet)
    projection = getattr(unet, "encoder_hid_proj", None)
    if not isinstance(projection, MultiIPAdapterImageProjection):
        return []
    return list(projection.image_projection_layers)


def ip_attention_processors(pipe_or_unet) -> list:
    """The IP-Adapter processors of the UNet, in ``attn_processors`` order.

    ``unet.attn_processors`` walks every module on each access; callers that switch per
    denoising step keep this list (``IPAdapterSwitches`` does).
    """
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
        IPAdapterXFormersAttnProcessor,
    )

    ip_classes = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
    return [proc for proc in _unet(pipe_or_unet).attn_processors.values()
            if isinstance(proc, ip_classes)]


def _tuner_layers(unet) -> list:
    """Every PEFT tuner layer (LoRA-wrapped Linear) inside the UNet."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft no LoRA can be loaded, so there is nothing to find
        return []
    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


def _is_faceid_adapter(name: str) -> bool:
    return _FACEID_ADAPTER.fullmatch(name) is not None


def faceid_adapter_names(pipe_or_unet) -> list[str]:
    """Names of the FaceID LoRA adapters ``load_ip_adapter`` registered (``faceid_<i>``)."""
    config = getattr(_unet(pipe_or_unet), "peft_config", None) or {}
    return sorted(name for name in config if _is_faceid_adapter(name))


def faceid_lora_layers(pipe_or_unet) -> list:
    """The tuner layers that hold weights of a FaceID adapter."""
    return [layer for layer in _tuner_layers(_unet(pipe_or_unet))
            if any(_is_faceid_adapter(name) for name in stored_adapter_names(layer))]


# ---------------------------------------------------------------------------------------
# Which adapter is loaded
# ---------------------------------------------------------------------------------------

def _plain_variant(layer, cross_attention_dim: int, image_encoder) -> str:
    """``vit-h`` or ``bigG`` for an ``ImageProjection``, from the width it reads.

    The two published SDXL plain adapters differ only in that width: ViT-H's projected
    embedding is half the cross-attention width (1024 of 2048), bigG's five eighths (1280 of
    2048). The tiny test encoders keep the same ratios. Any other width is a plain adapter
    for some other encoder and is reported as ``vit-h``, the layout it shares.
    """
    width = int(layer.image_embeds.in_features)
    _check_encoder_width(
        image_encoder, "projection_dim", width, "the IP-Adapter", "image embeddings",
        "ip-adapter_sdxl needs the ViT-bigG encoder (sdxl_models/image_encoder), the *_vit-h "
        "files the ViT-H encoder (models/image_encoder): load the matching encoder with "
        "image_encoder_folder.")
    return "bigG" if width * 8 == cross_attention_dim * 5 else "vit-h"


def _check_hidden_width(width: int, image_encoder, index: int) -> None:
    """Plus-type projections read the encoder's hidden states; their widths must agree."""
    _check_encoder_width(
        image_encoder, "hidden_size", width, f"IP-Adapter {index}", "CLIP hidden states",
        "The plus, plus-face and FaceID-Plus SDXL adapters need the ViT-H encoder "
        "(models/image_encoder): load it with image_encoder_folder.")


def _check_encoder_width(image_encoder, field: str, width: int, reader: str, features: str,
                         advice: str) -> None:
    """Raise ``CheckpointError`` when the image encoder's ``config.<field>`` is not the
    ``width`` the projection reads; nothing to check without an encoder (precomputed embeds).

    reader: who reads the features ("IP-Adapter 0"); features: what they are; advice: how
    to load the encoder that fits.
    """
    if image_encoder is None:
        return
    encoder_width = int(getattr(image_encoder.config, field))
    if encoder_width != width:
        raise CheckpointError(
            f"{reader} reads {width}-d {features} but the pipeline's image encoder produces "
            f"{encoder_width}-d ones. {advice}")


def _variant_of_layer(layer, index: int, unet, image_encoder) -> str:
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterFaceIDImageProjection,
        IPAdapterFaceIDPlusImageProjection,
        IPAdapterPlusImageProjection,
    )

    if isinstance(layer, ImageProjection):
        return _plain_variant(layer, int(unet.config.cross_attention_dim), image_encoder)
    if isinstance(layer, IPAdapterPlusImageProjection):
        _check_hidden_width(int(layer.proj_in.in_features), image_encoder, index)
        return "plus"
    if isinstance(layer, IPAdapterFaceIDPlusImageProjection):
        _check_hidden_width(int(layer.proj_in.in_features), image_encoder, index)
    if isinstance(layer, (IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection)):
        if f"faceid_{index}" not in faceid_adapter_names(unet):
            # diffusers skips the LoRA with one log line when peft is missing; results
            # then differ from the reference implementation.
            logger.warning("FaceID adapter %d is loaded without its LoRA (faceid_%d); install "
                           "peft and load the adapter again to match the reference.", index, index)
        if isinstance(layer, IPAdapterFaceIDPlusImageProjection):
            return "faceid-plusv2"
        return "faceid"
    raise ConfigError(f"IP-Adapter {index} uses a {type(layer).__name__} projection, which this "
                      "backend does not serve; supported SDXL adapters: ip-adapter_sdxl (bigG), "
                      "*_vit-h, plus, plus-face, faceid and faceid-plusv2.")


def detect_variants(pipe, hints: list[str | None] | None = None) -> list[str]:
    """The variant of every loaded IP-Adapter, in load order (``[]`` when none).

    ``plus`` and ``plus-face`` have the same architecture and key set, so weights cannot
    tell them apart: both are reported as ``plus`` unless the matching entry of ``hints``
    says ``"plus-face"``. A hint that contradicts the loaded weights raises ``ConfigError``.
    """
    unet = _unet(pipe)
    layers = image_projection_layers(unet)
    hints = list(hints) if hints is not None else [None] * len(layers)
    if len(hints) != len(layers):
        raise ConfigError(f"got {len(hints)} variant hint(s) for {len(layers)} loaded "
                          "IP-Adapter(s); give one hint (or None) per adapter.")
    image_encoder = getattr(pipe, "image_encoder", None)
    variants = []
    for index, (layer, hint) in enumerate(zip(layers, hints, strict=True)):
        found = _variant_of_layer(layer, index, unet, image_encoder)
        if hint is not None and hint != found and not (found == "plus" and hint in _PLUS_FAMILY):
            raise ConfigError(f"variant hint {hint!r} for IP-Adapter {index} does not match the "
                              f"loaded weights, which are {found!r}; drop the hint or load the "
                              "adapter it names.")
        variants.append(hint if hint is not None else found)
    return variants


def detect_variant(pipe, hint: str | None = None) -> str | None:
    """Which IP-Adapter ``pipe`` carries: ``"vit-h"``, ``"bigG"``, ``"plus"``,
    ``"plus-face"`` (only with ``hint="plus-face"``, see ``detect_variants``), ``"faceid"``,
    ``"faceid-plusv2"``, or ``None`` when no IP-Adapter is loaded.

    Several loaded adapters raise ``ConfigError``; use ``detect_variants`` for them.
    """
    layers = image_projection_layers(pipe)
    if not layers:
        return None
    if len(layers) > 1:
        raise ConfigError(f"{len(layers)} IP-Adapters are loaded; call detect_variants(pipe) "
                          "to get one variant per adapter.")
    return detect_variants(pipe, [hint])[0]


# ---------------------------------------------------------------------------------------
# Snapshot of everything the switches (or a user) may change
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # holds modules and tensors: compare by identity
class _TunerLayerState:
    layer: Any
    active_adapter: Any
    disable_adapters: bool
    scaling: dict
    requires_grad: tuple  # (parameter, flag) pairs of the adapter weights


def _capture_tuner_layer(layer) -> _TunerLayerState:
    flags = []
    for attribute in layer.adapter_layer_names:
        container = getattr(layer, attribute, None)
        if container is None or not hasattr(container, "values"):
            continue
        for adapter in container.values():
            params = [adapter] if not hasattr(adapter, "parameters") else adapter.parameters()
            flags.extend((param, param.requires_grad) for param in params)
    return _TunerLayerState(layer=layer, active_adapter=copy.copy(layer.active_adapter),
                            disable_adapters=bool(layer.disable_adapters),
                            scaling=dict(getattr(layer, "scaling", {})), requires_grad=tuple(flags))


def _restore_tuner_layer(state: _TunerLayerState) -> None:
    layer = state.layer
    # PEFT exposes these only through set_adapter / enable_adapters, which also rewrite
    # requires_grad; restoring the captured values directly puts back exactly what was there.
    layer._active_adapter = copy.copy(state.active_adapter)
    layer._disable_adapters = state.disable_adapters
    if hasattr(layer, "scaling"):
        layer.scaling.clear()
        layer.scaling.update(state.scaling)
    for param, flag in state.requires_grad:
        param.requires_grad_(flag)


@dataclass(frozen=True, eq=False)  # holds modules and tensors: compare by identity
class IPAdapterStateSnapshot:
    """The IP-Adapter state a user set on a pipeline, captured so it can be put back exactly.

    Holds each IP processor's ``scale`` list (per adapter, with per-image lists), the PEFT
    state of every LoRA layer of the UNet (active adapters, per-adapter ``scaling``, the
    disabled flag and ``requires_grad``), and the ``clip_embeds`` / ``shortcut`` /
    ``shortcut_scale`` attributes of FaceID-Plus projections. Weights are not captured:
    nothing here changes them. Use it as a context manager to restore on exit, also when
    an exception leaves the block::

        with IPAdapterStateSnapshot.capture(pipe):
            ...  # switch scales, LoRAs, clip_embeds freely
    """

    ip_scales: tuple  # (processor, deep copy of its scale list) pairs
    tuner_layers: tuple  # _TunerLayerState per PEFT layer
    faceid_plus: tuple  # (projection layer, clip_embeds, shortcut, shortcut_scale)

    @classmethod
    def capture(cls, pipe_or_unet) -> IPAdapterStateSnapshot:
        from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

        unet = _unet(pipe_or_unet)
        scales = tuple((proc, copy.deepcopy(proc.scale)) for proc in ip_attention_processors(unet))
        tuners = tuple(_capture_tuner_layer(layer) for layer in _tuner_layers(unet))
        plus = tuple((layer, layer.clip_embeds, layer.shortcut, layer.shortcut_scale)
                     for layer in image_projection_layers(unet)
                     if isinstance(layer, IPAdapterFaceIDPlusImageProjection))
        return cls(ip_scales=scales, tuner_layers=tuners, faceid_plus=plus)

    def restore(self) -> None:
        """Put every captured value back (fresh copies, so the snapshot can be reused)."""
        for proc, scale in self.ip_scales:
            proc.scale = copy.deepcopy(scale)
        for state in self.tuner_layers:
            _restore_tuner_layer(state)
        for layer, clip_embeds, shortcut, shortcut_scale in self.faceid_plus:
            layer.clip_embeds = clip_embeds
            layer.shortcut = shortcut
            layer.shortcut_scale = shortcut_scale

    def __enter__(self) -> IPAdapterStateSnapshot:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.restore()
        return False  # never swallow the exception


# ---------------------------------------------------------------------------------------
# Per-line switches
# ---------------------------------------------------------------------------------------

class IPAdapterSwitches:
    """Exact "identity off" switches for one pipeline, with the module walks done once.

    Build it once per generation (after the adapter is loaded) and use the two context
    managers around the UNet calls of the line that must not see the identity::

        switches = IPAdapterSwitches(pipe)
        with switches.ip_scales_off(), switches.faceid_lora_off():
            noise = pipe.unet(..., added_cond_kwargs={..., "image_embeds": embeds})

    Both give a UNet output bit-identical to the pipeline without the adapter; image
    embeds must still be passed (the UNet refuses a call without them).
    """

    def __init__(self, pipe_or_unet) -> None:
        unet = _unet(pipe_or_unet)
        self.processors = ip_attention_processors(unet)
        self.faceid_layers = faceid_lora_layers(unet)
        self.projection = getattr(unet, "encoder_hid_proj", None)

    @contextmanager
    def ip_scales_off(self) -> Iterator[None]:
        """Every IP processor's scale is 0 inside the block, restored (same objects) after.

        diffusers' processor skips an adapter whose scale (or every per-image scale) is 0,
        so the text attention alone remains: bit-identical to no adapter. A new list is
        assigned rather than editing in place, so the user's list is never touched.
        """
        saved = [proc.scale for proc in self.processors]
        try:
            for proc in self.processors:
                proc.scale = [0.0] * len(proc.scale)
            yield
        finally:
            for proc, scale in zip(self.processors, saved, strict=True):
                proc.scale = scale

    @contextmanager
    def faceid_lora_off(self) -> Iterator[None]:
        """The FaceID LoRA (``faceid_<i>``) is off inside the block; other LoRAs are untouched.

        Mechanism: each PEFT layer's list of active adapters loses its ``faceid_*`` names,
        and gets its previous value back afterwards. PEFT's forward then skips the FaceID
        branch exactly as if it were not loaded. The public alternatives are not exact or
        not local: ``set_adapter`` / ``enable_adapters`` (and diffusers' ``set_adapters`` /
        ``disable_adapters`` built on them) rewrite ``requires_grad`` of every adapter, and
        ``disable_adapters`` also switches off the user's own LoRAs on the same layers; a
        zero ``scaling`` still computes the branch and adds ``0 * x``, which is not the
        identity for infinities or NaNs; ``cross_attention_kwargs={"scale": 0}`` scales
        every LoRA and resets custom weights afterwards.
        """
        for layer in self.faceid_layers:
            merged = [name for name in getattr(layer, "merged_adapters", []) if _is_faceid_adapter(name)]
            if merged:
                raise ConfigError(f"the FaceID LoRA {merged[0]!r} is fused into the UNet weights, "
                                  "so it cannot be switched off per call; call "
                                  "pipe.unfuse_lora() before generating.")
        saved = [layer._active_adapter for layer in self.faceid_layers]
        try:
            for layer in self.faceid_layers:
                layer._active_adapter = [name for name in layer.active_adapters
                                         if not _is_faceid_adapter(name)]
            yield
        finally:
            for layer, active in zip(self.faceid_layers, saved, strict=True):
                layer._active_adapter = active


    # -- per row, for one UNet call holding rows of both lines --------------------------------
    def ip_keys_bias_free(self) -> bool:
        """True when no IP key/value projection has a bias (diffusers builds them without).

        Then a zero identity token gives exactly zero keys and values, hence an exactly zero
        IP attention output: the premise of ``ip_tokens_rows``.
        """
        return all(linear.bias is None for proc in self.processors
                   for linear in (*proc.to_k_ip, *proc.to_v_ip))

    @contextmanager
    def ip_tokens_rows(self, enabled_rows: torch.Tensor) -> Iterator[None]:
        """IP attention on for the rows where ``enabled_rows`` is 1 and off where it is 0.

        enabled_rows: (R,) 0/1 mask over the UNet batch. A forward hook on
        ``unet.encoder_hid_proj`` replaces the projected tokens of the off rows (per adapter
        (R, images, tokens, D)) by zeros. Bias-free ``to_k_ip`` / ``to_v_ip`` then give zero
        keys and values, so the attention output is 0 and the processor adds
        ``scale * 0``: each off row equals the same call with every IP scale at 0, bit for
        bit (tested), whatever the scales. A select rather than a product, so that a
        non-finite token cannot leak into an off row as NaN. The hook is removed on exit.
        """
        if self.projection is None:
            yield
            return
        keep = enabled_rows.bool()

        def zero_off_rows(module, args, projected):
            return [_rows_where(keep, tokens) for tokens in projected]

        handle = self.projection.register_forward_hook(zero_off_rows)
        try:
            yield
        finally:
            handle.remove()


def _rows_where(keep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` (R, ...) with the rows where ``keep`` (R,) is False set to exactly 0."""
    if tokens.shape[0] != keep.shape[0]:
        raise RuntimeError(f"the IP-Adapter projection returned {tokens.shape[0]} rows but the "
                           f"row mask has {keep.shape[0]}; the image embeds do not match the "
                           "merged UNet batch (pass BFConfig(batch_lines=False) and report it).")
    keep = keep.to(tokens.device).view(-1, *([1] * (tokens.ndim - 1)))
    return tokens.where(keep, tokens.new_zeros(()))


def ip_scales_off(pipe):
    """Context manager: all IP-Adapter scales 0 (see ``IPAdapterSwitches.ip_scales_off``).

    Walks the UNet once per call; per-step users keep an ``IPAdapterSwitches`` instead.
    """
    return IPAdapterSwitches(pipe).ip_scales_off()


def faceid_lora_off(pipe):
    """Context manager: FaceID LoRA off (see ``IPAdapterSwitches.faceid_lora_off``)."""
    return IPAdapterSwitches(pipe).faceid_lora_off()
