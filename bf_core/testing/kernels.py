"""Kernels that make every row's result independent of its batch, and a hook recorder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# -- batch-invariant kernels ------------------------------------------------------------------
# A merged UNet call (both lines, 4 rows) and two separate calls (2 rows each) compute the same
# numbers, but not with the same kernels: matrix products and convolutions pick their blocking
# by batch size, and a longer masked key sequence changes attention's summation order. On a CPU
# the stock UNet alone differs by about 6e-7 between one batch-4 call and two batch-2 calls.
# Inside ``batch_invariant_kernels`` every row is computed the same way whatever batch it sits
# in, so the merged and separate paths must agree bit for bit: any difference left is a real
# leak between rows (a switch that is not exact, padding that is not neutral).

_ATEN = torch.ops.aten
_MASKED = -1e4  # diffusers turns an encoder attention mask's zeros into -10000 attention bias


def _rowwise_mm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight`` with each output row reduced on its own.

    rows: (M, K), weight: (K, N) -> (M, N). Every output element is a contiguous sum over K
    whose order depends neither on M (unlike a blocked matrix kernel) nor on the strides of
    ``rows`` (a batch-1 view can be transposed where the same rows of a batch are copied).
    """
    products = rows.contiguous().unsqueeze(1) * weight.t().contiguous().unsqueeze(0)
    return products.contiguous().sum(-1)


def _rowwise_bmm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(B, M, K) @ (B, K, N) -> (B, M, N), reduced per output element as in ``_rowwise_mm``."""
    products = left.contiguous().unsqueeze(2) * right.transpose(1, 2).contiguous().unsqueeze(1)
    return products.contiguous().sum(-1)


def _scaled(tensor: torch.Tensor, factor: Any) -> torch.Tensor:
    return tensor if factor == 1 else tensor * factor


def _unpadded_attention(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """CPU flash attention one batch row at a time, without that row's masked (padding) keys.

    query: (B, H, L, D); key, value: (B, H, S, D); attn_mask broadcastable to (B, H, L, S).
    A key masked for every head and query of a row is padding: dropping it is what the mask
    means, and leaves the row with the key count (and kernel) it has in an unpadded call.
    """
    query, key, value = args[:3]
    mask = kwargs.get("attn_mask")
    outputs: list[tuple[torch.Tensor, ...]] = []
    for row in range(query.shape[0]):
        row_key, row_value, row_kwargs = key[row:row + 1], value[row:row + 1], dict(kwargs)
        row_query = query[row:row + 1].contiguous()
        if mask is not None:
            row_mask = mask[row:row + 1] if mask.shape[0] > 1 else mask
            dropped = ~row_mask if row_mask.dtype == torch.bool else row_mask <= _MASKED
            keep = ~dropped.flatten(0, -2).all(dim=0)
            row_key, row_value, row_mask = row_key[:, :, keep], row_value[:, :, keep], row_mask[..., keep]
            neutral = row_mask.all() if row_mask.dtype == torch.bool else not row_mask.any()
            row_kwargs["attn_mask"] = None if neutral else row_mask
        outputs.append(func(row_query, row_key.contiguous(), row_value.contiguous(), *args[3:],
                            **row_kwargs))
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


# aten product -> its row-wise form; the "add" forms compute beta * bias + alpha * product.
_PRODUCTS = {_ATEN.mm.default: _rowwise_mm, _ATEN.bmm.default: _rowwise_bmm}
_ADDED_PRODUCTS = {_ATEN.addmm.default: _rowwise_mm, _ATEN.baddbmm.default: _rowwise_bmm}


class _BatchInvariantKernels(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            return _PRODUCTS[func](*args)
        if func in _ADDED_PRODUCTS:
            bias, left, right = args
            return (_scaled(_ADDED_PRODUCTS[func](left, right), kwargs.get("alpha", 1))
                    + _scaled(bias, kwargs.get("beta", 1)))
        if func is _ATEN.convolution.default:
            # One image per call: the kernel (and its blocking) is the same in every batch.
            images = args[0]
            return torch.cat([func(images[i:i + 1].contiguous(), *args[1:], **kwargs)
                              for i in range(images.shape[0])])
        if func is _ATEN._scaled_dot_product_flash_attention_for_cpu.default:
            return _unpadded_attention(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def batch_invariant_kernels() -> Iterator[None]:
    """Run every matrix product, convolution and CPU attention so each row's result does not
    depend on the batch it is in, nor on padding keys masked out of it.

    For tests on a CPU in float32: inside it, both lines merged into one UNet call equal one
    call per line bit for bit (``BackendConformance.test_merged_lines_equal_separate_lines``).
    Slower than the stock kernels and numerically a little different from them; never used
    for generation.
    """
    with _BatchInvariantKernels():
        yield


@contextlib.contextmanager
def forward_hooks_registered() -> Iterator[list[torch.nn.Module]]:
    """Collect every module a forward hook is registered on inside the block, in order.

    For checking per-step costs: a switch that hooks hundreds of layers must do it once per
    call, not at every step. (transformers hooks its encoders the first time they run;
    filter the list to the modules you care about.)
    """
    registered: list[torch.nn.Module] = []
    register = torch.nn.Module.register_forward_hook

    def recording(module, *args, **kwargs):
        registered.append(module)
        return register(module, *args, **kwargs)

    torch.nn.Module.register_forward_hook = recording
    try:
        yield registered
    finally:
        torch.nn.Module.register_forward_hook = register
