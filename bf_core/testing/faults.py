"""Faults planted on purpose, for tests of how a call fails: NaN in one line, NaN out of a
module, the device running out of memory, a pickle that runs code when unpickled.

Each undoes itself: the hooks come off and planted weights get their values back when the
``with`` block ends, so a test can check afterwards that the pipeline is as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch


class RunsCodeWhenUnpickled:
    """Unpickling this runs ``echo pwned > marker``: what a malicious ``.bin`` would do.
    A loader that is safe refuses it and ``marker`` never appears."""

    def __init__(self, marker: str | os.PathLike):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@contextlib.contextmanager
def nan_in_lora_after(pipe: Any, step: int, adapter: str = "identity"
                      ) -> Iterator[Callable[..., dict]]:
    """A ``callback_on_step_end`` that writes one NaN into adapter ``adapter``'s first
    ``lora_B`` weight of the UNet after ``step``: from the next step on only the lines that
    run that adapter (the ID line) turn non-finite. The weight gets its value back on exit."""
    planted: list[tuple[torch.Tensor, float]] = []

    def callback(p, i, t, kwargs):
        if i == step:
            weight = next(w for n, w in pipe.unet.named_parameters()
                          if "lora_B" in n and adapter in n)
            planted.append((weight, weight.data.view(-1)[0].item()))
            weight.data.view(-1)[0] = float("nan")
        return kwargs

    try:
        yield callback
    finally:
        for weight, value in planted:
            weight.data.view(-1)[0] = value


@contextlib.contextmanager
def nan_out_of(module: torch.nn.Module) -> Iterator[None]:
    """``module`` returns NaN of its output's shape (a VAE decoder that overflowed, say)."""
    handle = module.register_forward_hook(
        lambda mod, args, output: torch.full_like(output, float("nan")))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def out_of_memory_in(module: torch.nn.Module, at_call: int = 1) -> Iterator[None]:
    """``module``'s ``at_call``-th forward (1-based) raises ``torch.OutOfMemoryError``, as
    CUDA does when an allocation fails."""
    calls = []

    def run_out(mod, args, kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = module.register_forward_pre_hook(run_out, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
