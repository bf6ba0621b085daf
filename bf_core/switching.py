"""Exact, restorable switches for pipeline state that a line turns on or off, per line or
per row.

Every switch is a context manager that records what it changes and puts it back on exit,
also when the body raises. Nothing here allocates new modules or reloads weights.

Per row: when several lines share one model call, a PEFT LoRA must be on for some rows
and off for others. ``RowMaskedLoRA`` scales each LoRA up-projection's output by a per-row
0/1 mask, so an off row gets exactly ``base + 0``. ``row_mask`` gives that mask for the
rows of chosen lines.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from bf_core.errors import ConfigError
from bf_core.protocols import Line


def peft_tuner_layers(module: torch.nn.Module | None) -> list[tuple[str, torch.nn.Module]]:
    """All PEFT tuner layers (LoRA and friends) inside ``module``, with their names."""
    if module is None:
        return []
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft, diffusers cannot have loaded PEFT adapters
        return []
    return [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def active_adapter_names(layer: torch.nn.Module) -> set[str]:
    """The adapters a PEFT layer currently applies (its ``active_adapters``)."""
    names = getattr(layer, "active_adapters", None)
    if names is None:
        names = getattr(layer, "active_adapter", ())
    return {names} if isinstance(names, str) else set(names)


def stored_adapter_names(layer: torch.nn.Module) -> set[str]:
    """Every adapter a PEFT layer holds weights of, active or not."""
    names: set[str] = set()
    for attribute in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attribute, None)
        if hasattr(container, "keys"):
            names.update(container.keys())
    return names


def lora_layer_row_maskable(layer: torch.nn.Module) -> bool:
    """True for a plain, unmerged LoRA layer, whose output a mask on ``lora_B`` can switch."""
    if getattr(layer, "merged", False) or not hasattr(layer, "lora_B"):
        return False
    # DoRA rescales the base output too: a mask on B alone would not switch it off.
    return not any(getattr(layer, "use_dora", {}).values())


def _selected_layers(modules: Iterable[torch.nn.Module | None],
                     adapter_names: Iterable[str] | None) -> list[tuple[str, torch.nn.Module]]:
    """The tuner layers whose active adapters are all among ``adapter_names`` (None: all)."""
    wanted = None if adapter_names is None else set(adapter_names)
    return [(name, layer) for module in modules for name, layer in peft_tuner_layers(module)
            if wanted is None or active_adapter_names(layer) <= wanted]


def active_up_projections(layers: Iterable[torch.nn.Module],
                          adapter_names: Iterable[str] | None = None
                          ) -> list[tuple[str, torch.nn.Module]]:
    """The up-projections (``lora_B``) of the adapters each enabled layer applies, with the
    adapter's name, limited to ``adapter_names`` when given."""
    wanted = None if adapter_names is None else set(adapter_names)
    return [(name, layer.lora_B[name]) for layer in layers if not layer._disable_adapters
            for name in sorted(active_adapter_names(layer))
            if name in layer.lora_B and (wanted is None or name in wanted)]


def row_mask(batch: Any, lines: Iterable[Line]) -> torch.Tensor:
    """(R,) float mask of a row batch's rows that belong to ``lines`` (1) or not (0).

    ``batch`` is a host's row batch (``row_lines``, ``sample``). Cached per row layout and
    device: the layout repeats at every step, and building the tensor anew would copy from
    the host (and wait for the device) at every step.
    """
    return _cached_row_mask(batch.row_lines, frozenset(lines), str(batch.sample.device))


@functools.lru_cache(maxsize=64)
def _cached_row_mask(row_lines: tuple[Line, ...], wanted: frozenset, device: str) -> torch.Tensor:
    return torch.tensor([1.0 if line in wanted else 0.0 for line in row_lines], device=device)


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R,) mask shaped to broadcast over ``like`` (R, ...), in its dtype; a 0-dim mask
    (one switch for every row) broadcasts as it is."""
    if mask.ndim == 0:
        return mask.to(like.dtype)
    if like.shape[0] != mask.shape[0]:
        raise RuntimeError(f"a row-masked layer saw {like.shape[0]} rows but the mask has "
                           f"{mask.shape[0]}; this layer folds the batch and cannot be row-masked")
    return mask.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


RowMasks = torch.Tensor | Mapping[str, torch.Tensor]


class RowMaskedLoRA:
    """Named LoRA adapters of some PEFT layers, switched per row at many model calls.

    A forward hook on each active LoRA up-projection multiplies its output by the row mask
    of the current ``rows`` block, so an off row adds exactly zero to the base layer's
    output. The hooks are installed at the first ``rows`` and stay until ``close`` (a
    session registers ``close`` for restore); outside a ``rows`` block they pass outputs
    through untouched. Registering and removing hundreds of hooks at every step would cost
    milliseconds of Python per step at SDXL size.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], adapter_names: Iterable[str] | None = None):
        self.layers = list(layers)
        self.adapter_names = None if adapter_names is None else list(adapter_names)
        self._hooks: list | None = None
        self._masks: RowMasks | None = None
        # Each mask reshaped per output layout, made once per block, not once per layer.
        self._shaped: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def rows(self, enabled_rows: RowMasks) -> Iterator[None]:
        """LoRA on for the rows where the mask is 1 and off where it is 0.

        ``enabled_rows``: one (R,) mask for every adapter, or a mapping from adapter name to
        its own (R,) mask (an adapter the mapping leaves out stays on). A 0-dim mask
        switches every row at once, for modules that see a batch of another size (a text
        encoder encoding one prompt).
        """
        if self._hooks is None:
            self._hooks = [up.register_forward_hook(functools.partial(self._scale, name))
                           for name, up in active_up_projections(self.layers, self.adapter_names)]
        self._masks, self._shaped = enabled_rows, {}
        try:
            yield
        finally:
            self._masks, self._shaped = None, {}

    def _scale(self, adapter_name: str, module: torch.nn.Module, args: Any, output: torch.Tensor):
        masks = self._masks
        mask = masks.get(adapter_name) if isinstance(masks, Mapping) else masks
        if mask is None:
            return None
        layout = (adapter_name, output.shape[0], output.ndim, output.dtype)
        shaped = self._shaped.get(layout)
        if shaped is None:
            shaped = self._shaped[layout] = _per_row(mask, output)
        return output * shaped

    def close(self) -> None:
        """Remove the hooks, if any were installed."""
        for handle in self._hooks or ():
            handle.remove()
        self._hooks, self._masks = None, None


class AdapterSwitch:
    """PEFT adapters of some modules, found once, then switched off (or per row) many times.

    Walking every module of an SDXL UNet to find its LoRA layers takes milliseconds; a
    session builds one switch per component and reuses it at every step.

    ``adapter_names=None`` covers every adapter (off = the base model exactly). Given names,
    only layers whose active adapters are all among them are switched off whole, which is
    exact for those adapters only when no other adapter shares the layer; per-row masks act
    on each named adapter's own up-projection, so ``rows`` also covers shared layers.
    """

    def __init__(self, modules: Iterable[torch.nn.Module | None],
                 adapter_names: Iterable[str] | None = None):
        modules = list(modules)
        self.adapter_names = None if adapter_names is None else list(adapter_names)
        self.layers = _selected_layers(modules, self.adapter_names)
        self.all_layers = _selected_layers(modules, None)
        self._row_masked: RowMaskedLoRA | None = None
        self._row_maskable: bool | None = None

    def named_layers(self) -> list[torch.nn.Module]:
        """The layers where one of the named adapters (any, with no names) is active."""
        if self.adapter_names is None:
            return [layer for _, layer in self.all_layers]
        return [layer for _, layer in self.all_layers
                if active_adapter_names(layer) & set(self.adapter_names)]

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

        Asked at every multi-line step; answered once (the layers do not change in a call).
        """
        if self._row_maskable is None:
            self._row_maskable = all(lora_layer_row_maskable(layer)
                                     for layer in self.named_layers())
        return self._row_maskable

    @contextmanager
    def rows(self, enabled_rows: RowMasks) -> Iterator[None]:
        """Adapters on for the rows where ``enabled_rows`` is 1, off where it is 0 (one
        mask, or one per adapter name: ``RowMaskedLoRA.rows``).

        The up-projection hooks are installed on first use and stay until ``close``; between
        uses they pass outputs through untouched, so a step costs no hook registration.
        """
        if self._row_masked is None:
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


@contextmanager
def lora_rows(modules: Iterable[torch.nn.Module | None], enabled_rows: torch.Tensor,
              adapter_names: Iterable[str] | None = None) -> Iterator[None]:
    """``AdapterSwitch.rows`` for every PEFT layer in ``modules``, found now and unhooked on
    exit (a session that switches at every step keeps an ``AdapterSwitch`` instead)."""
    switch = AdapterSwitch(modules, adapter_names)
    try:
        with switch.rows(enabled_rows):
            yield
    finally:
        switch.close()
