"""The XLabs IP-Adapter's per-row switch: one processor subclass masking the IP output.

diffusers' ``FluxIPAdapterAttnProcessor`` (on the 19 double-stream blocks of FLUX.1) adds
``scale * attention(q, to_k_ip(T), to_v_ip(T))`` to the image stream. For one transformer
call holding rows of several lines, ``RowMaskedIPProcessor`` computes that exactly as the
parent does and keeps it only on the rows where the mask is on; on the other rows it adds
an exact zero, so they equal the plain ``FluxAttnProcessor`` bit for bit. Zeroing the image
tokens instead would not be exact: ``to_k_ip`` / ``to_v_ip`` carry biases, so zero tokens
still give keys and values, and a non-zero attention output.

``masked_processors`` swaps the masked processors in for one call (sharing the original
ones' projections and scales, so nothing is copied) and puts the very same processor
objects back afterwards, also after an exception.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def ip_attention_processors(transformer: Any) -> dict[str, Any]:
    """``{name: processor}`` of the transformer's IP-Adapter processors, in block order."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    return {name: proc for name, proc in transformer.attn_processors.items()
            if isinstance(proc, FluxIPAdapterAttnProcessor)}


def has_flux_ip_adapter(transformer: Any) -> bool:
    """True when diffusers' FLUX IP-Adapter is loaded: an image projection and IP processors."""
    if getattr(transformer, "encoder_hid_proj", None) is None:
        return False
    processors = getattr(transformer, "attn_processors", None)
    return isinstance(processors, dict) and bool(ip_attention_processors(transformer))


class RowSwitch:
    """Which rows of the current transformer call get the IP output: ``keep`` (R,) bool, a
    0-dim bool for every row alike, or None for every row (the processors then return the
    parent's result untouched)."""

    def __init__(self) -> None:
        self.keep: torch.Tensor | None = None

    @contextmanager
    def rows(self, keep: torch.Tensor | None) -> Iterator[None]:
        """``keep`` for the calls inside the block, the previous value after it."""
        previous, self.keep = self.keep, keep
        try:
            yield
        finally:
            self.keep = previous


def masked_rows(ip_output: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``ip_output`` (R, N, D) on the rows where ``keep`` (R,) is True, exactly 0 elsewhere;
    a 0-dim ``keep`` switches every row alike.

    A select, not a product: a non-finite IP output cannot leak into an off row as NaN.
    """
    if keep.ndim:
        if ip_output.shape[0] != keep.shape[0]:
            raise RuntimeError(f"the IP attention saw {ip_output.shape[0]} rows but the row mask "
                               f"has {keep.shape[0]}; pass BFConfig(batch_lines=False) and "
                               "report it.")
        keep = keep.view(-1, *([1] * (ip_output.ndim - 1)))
    return ip_output.where(keep.to(ip_output.device), ip_output.new_zeros(()))


@functools.lru_cache(maxsize=1)
def _masked_processor_class():
    """The subclass, defined on first use: diffusers is imported only when a call needs it."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    class RowMaskedIPProcessor(FluxIPAdapterAttnProcessor):
        """diffusers' FLUX IP processor whose IP output is kept per row (``RowSwitch``).

        Built by ``sharing``: the original processor's ``to_k_ip`` / ``to_v_ip`` modules and
        ``scale`` list are used as they are, so the IP attention is the parent's own.
        """

        @classmethod
        def sharing(cls, original: FluxIPAdapterAttnProcessor, switch: RowSwitch):
            """A masked processor on ``original``'s own modules and settings; ``__init__``
            is skipped, which would allocate new projections."""
            processor = cls.__new__(cls)
            torch.nn.Module.__init__(processor)
            for name, value in vars(original).items():
                if not name.startswith("_"):  # hidden_size, cross_attention_dim, scale, training
                    setattr(processor, name, value)
            for name in ("_attention_backend", "_parallel_config"):
                if name in vars(original):
                    setattr(processor, name, vars(original)[name])
            processor.to_k_ip, processor.to_v_ip = original.to_k_ip, original.to_v_ip
            processor.switch = switch
            return processor

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, ip_hidden_states=None, ip_adapter_masks=None):
            # The parameter names are the parent's: FluxAttention passes only the keywords
            # its processor's signature names.
            outputs = super().__call__(attn, hidden_states, encoder_hidden_states,
                                       attention_mask, image_rotary_emb, ip_hidden_states,
                                       ip_adapter_masks)
            keep = self.switch.keep
            if keep is None or not isinstance(outputs, tuple):
                return outputs
            image, context, ip_output = outputs
            return image, context, masked_rows(ip_output, keep)

    return RowMaskedIPProcessor


@contextmanager
def masked_processors(transformer: Any) -> Iterator[RowSwitch]:
    """Inside the block every IP processor is a ``RowMaskedIPProcessor`` reading the yielded
    switch; afterwards the transformer has its original processor objects again.

    ``set_attn_processor`` empties the dict it is given, so each call gets a fresh copy.
    """
    original = dict(transformer.attn_processors)
    switch = RowSwitch()
    cls, ip_names = _masked_processor_class(), set(ip_attention_processors(transformer))
    swapped = {name: cls.sharing(proc, switch) if name in ip_names else proc
               for name, proc in original.items()}
    transformer.set_attn_processor(dict(swapped))
    try:
        yield switch
    finally:
        transformer.set_attn_processor(dict(original))
