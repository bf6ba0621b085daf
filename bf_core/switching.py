"""Exact, restorable switches for pipeline state that a line turns on or off.

Every switch is a context manager that records what it changes and puts it back on exit,
also when the body raises. Nothing here allocates new modules or reloads weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from bf_core.errors import ConfigError

if TYPE_CHECKING:  # rowbatch imports this module; the class is only needed at run time
    from bf_core.rowbatch import RowMaskedLoRA


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


def _selected_layers(modules: Iterable[torch.nn.Module | None],
                     adapter_names: Iterable[str] | None) -> list[tuple[str, torch.nn.Module]]:
    """The tuner layers whose active adapters are all among ``adapter_names`` (None: all)."""
    wanted = None if adapter_names is None else set(adapter_names)
    return [(name, layer) for module in modules for name, layer in peft_tuner_layers(module)
            if wanted is None or set(_adapter_names(layer)) <= wanted]


class AdapterSwitch:
    """PEFT adapters of some modules, found once, then switched off (or per row) many times.

    Walking every module of an SDXL UNet to find its LoRA layers takes milliseconds; a
    session builds one switch per component and reuses it at every step.

    ``adapter_names=None`` covers every adapter (off = the base model exactly). Given names,
    only layers whose active adapters are all among them are covered, which is exact for
    those adapters only when no other adapter shares the layer.
    """

    def __init__(self, modules: Iterable[torch.nn.Module | None],
                 adapter_names: Iterable[str] | None = None):
        modules = list(modules)
        self.adapter_names = None if adapter_names is None else list(adapter_names)
        # Whole layers switched off by ``disabled``; per-row masks act on each adapter's own
        # up-projection instead, so ``rows`` also covers layers shared with other adapters.
        self.layers = _selected_layers(modules, self.adapter_names)
        self.all_layers = _selected_layers(modules, None)
        self._row_masked: RowMaskedLoRA | None = None
        self._row_maskable: bool | None = None

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Adapters off for the block.

        Why the private flag: PEFT's ``enable_adapters(True)`` also flips ``requires_grad``
        on adapter weights, and ``set_adapters`` rewrites adapter scales; toggling the
        layer's ``_disable_adapters`` flag (what its ``disable_adapters`` property reads)
        changes nothing else and is put back exactly.
        """
        touched: list[tuple[torch.nn.Module, bool]] = []
        try:
            for name, layer in self.layers:
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

    @property
    def row_maskable(self) -> bool:
        """True when every covered layer is a plain, unmerged LoRA a row mask can switch.

        Asked at every two-line step; answered once (the layers do not change in a call).
        """
        if self._row_maskable is None:
            from bf_core.rowbatch import lora_layer_row_maskable

            self._row_maskable = all(
                lora_layer_row_maskable(layer) for _, layer in self.all_layers
                if self.adapter_names is None
                or set(_adapter_names(layer)) & set(self.adapter_names))
        return self._row_maskable

    @contextmanager
    def rows(self, enabled_rows: torch.Tensor) -> Iterator[None]:
        """Adapters on for the rows where ``enabled_rows`` is 1, off where it is 0.

        The up-projection hooks are installed on first use and stay until ``close`` (a
        session closes its switches when the call ends); between uses they pass outputs
        through untouched, so a step costs no hook registration.
        """
        if self._row_masked is None:
            from bf_core.rowbatch import RowMaskedLoRA

            self._row_masked = RowMaskedLoRA([layer for _, layer in self.all_layers],
                                             self.adapter_names)
        with self._row_masked.rows(enabled_rows):
            yield

    def close(self) -> None:
        """Remove the per-row hooks, if any were installed."""
        if self._row_masked is not None:
            self._row_masked.close()


def adapters_disabled(modules: Iterable[torch.nn.Module | None],
                      adapter_names: Iterable[str] | None = None):
    """Switch PEFT adapters off inside ``modules`` for the block (see ``AdapterSwitch``)."""
    return AdapterSwitch(modules, adapter_names).disabled()


def has_active_adapters(modules: Iterable[torch.nn.Module | None]) -> bool:
    """True when any PEFT layer in ``modules`` is currently applying an adapter."""
    return any(not layer._disable_adapters and _adapter_names(layer)
               for module in modules for _, layer in peft_tuner_layers(module))
