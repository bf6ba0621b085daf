"""Exact, restorable switches for pipeline state that a line turns on or off.

Every switch is a context manager that records what it changes and puts it back on exit,
also when the body raises. Nothing here allocates new modules or reloads weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from bf_core.errors import ConfigError


def peft_tuner_layers(module: torch.nn.Module | None) -> list[tuple[str, torch.nn.Module]]:
    """All PEFT tuner layers (LoRA and friends) inside ``module``, with their names."""
    if module is None:
        return []
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft, diffusers cannot have loaded PEFT adapters
        return []
    return [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def _adapter_names(layer: torch.nn.Module) -> list[str]:
    names = getattr(layer, "active_adapters", None)
    if names is None:
        names = getattr(layer, "active_adapter", [])
    return [names] if isinstance(names, str) else list(names)


@contextmanager
def adapters_disabled(modules: Iterable[torch.nn.Module | None],
                      adapter_names: Iterable[str] | None = None) -> Iterator[None]:
    """Switch PEFT adapters off inside ``modules`` for the duration of the block.

    ``adapter_names=None`` switches every adapter off (the base model exactly). Given names,
    only layers whose active adapters are all among them are switched off, which is exact
    for those adapters only when no other adapter shares the layer.

    Why the private flag: PEFT's ``enable_adapters(True)`` also flips ``requires_grad`` on
    adapter weights, and ``set_adapters`` rewrites adapter scales; toggling the layer's
    ``_disable_adapters`` flag (what its ``disable_adapters`` property reads) changes nothing
    else and is put back exactly.
    """
    wanted = None if adapter_names is None else set(adapter_names)
    touched: list[tuple[torch.nn.Module, bool]] = []
    try:
        for module in modules:
            for name, layer in peft_tuner_layers(module):
                if wanted is not None and not set(_adapter_names(layer)) <= wanted:
                    continue
                if getattr(layer, "merged", False):
                    raise ConfigError(
                        f"the LoRA at {name} is fused into the base weights, so it cannot be "
                        "switched off per line; call pipe.unfuse_lora() before wrapping, or use "
                        "BFConfig(semantic_adapters='on')")
                touched.append((layer, layer._disable_adapters))
                layer._disable_adapters = True
        yield
    finally:
        for layer, previous in reversed(touched):
            layer._disable_adapters = previous


def has_active_adapters(modules: Iterable[torch.nn.Module | None]) -> bool:
    """True when any PEFT layer in ``modules`` is currently applying an adapter."""
    return any(not layer._disable_adapters and _adapter_names(layer)
               for module in modules for _, layer in peft_tuner_layers(module))
