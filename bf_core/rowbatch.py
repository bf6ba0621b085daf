"""Both lines in one UNet call: merging row batches, and per-row switches.

At a step where both lines run, the loop can evaluate the semantic rows and the ID rows in
one UNet call instead of two (on a GPU one batch-4 call costs far less than two batch-2
calls). That needs every piece of per-line model state to be switchable per *row*:

- a PEFT LoRA on for some rows and off for others: ``lora_rows`` scales each LoRA
  up-projection's output by a per-row 0/1 mask, so off rows get exactly ``base + 0``;
- attention-processor adapters: their identity tokens zeroed for the off rows (a zero
  token gives zero keys and values through bias-free projections, so exactly zero
  attention output) or a processor's own per-row switch;
- ControlNet residuals computed for the ID rows only, zero for the others;
- per-row context lengths: after M2 the semantic rows carry K + 77 tokens and the ID rows
  77. Shorter rows are padded at the end with zero tokens that an encoder attention mask
  removes; the padded keys get exactly zero softmax weight.

Equality with separate calls is to float round-off only, not bit for bit: CPU and GPU
matrix kernels depend on the batch size (the stock UNet itself gives results about 1e-6
apart for one batch-4 call and two batch-2 calls), and a longer masked sequence changes the
attention kernel's summation. ``BFConfig(batch_lines=False)`` keeps separate calls.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from bf_core.protocols import Line, RowBatch


def pad_tokens(embeds: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (R, L, D) tokens at the end to ``length`` with zeros; return them and the mask.

    The mask (R, length) is 1 for real tokens and 0 for padding, as the UNet's
    ``encoder_attention_mask`` expects.
    """
    rows, current, dim = embeds.shape
    mask = torch.ones(rows, length, device=embeds.device, dtype=embeds.dtype)
    if current == length:
        return embeds, mask
    padding = embeds.new_zeros(rows, length - current, dim)
    mask[:, current:] = 0
    return torch.cat([embeds, padding], dim=1), mask


def merge_row_batches(batches: Sequence[RowBatch]) -> RowBatch:
    """One batch holding every row of ``batches``, in order, tagged per row with its line.

    Context lengths are padded to the longest with an attention mask (``pad_tokens``); the
    mask is None when all lengths agree, so no masked-attention kernel is used needlessly.
    """
    length = max(b.encoder_hidden_states.shape[1] for b in batches)
    padded = [pad_tokens(b.encoder_hidden_states, length) for b in batches]
    same_length = all(b.encoder_hidden_states.shape[1] == length for b in batches)
    row_lines = tuple(line for b in batches for line in [b.line] * b.rows)
    first = batches[0]
    return RowBatch(
        line=None,
        step_index=first.step_index,
        timestep=first.timestep,
        sample=torch.cat([b.sample for b in batches]),
        branches=tuple(branch for b in batches for branch in b.branches),
        encoder_hidden_states=torch.cat([embeds for embeds, _ in padded]),
        text_embeds=torch.cat([b.text_embeds for b in batches]),
        time_ids=torch.cat([b.time_ids for b in batches]),
        timestep_cond=(None if first.timestep_cond is None
                       else torch.cat([b.timestep_cond for b in batches])),
        cross_attention_kwargs=first.cross_attention_kwargs,
        conditioning=None,
        row_lines=row_lines,
        parts=tuple(batches),
        encoder_attention_mask=None if same_length else torch.cat([mask for _, mask in padded]),
    )


def split_rows(output: torch.Tensor, merged: RowBatch) -> list[torch.Tensor]:
    """Undo ``merge_row_batches`` on the UNet output: one tensor per original batch."""
    return list(output.split([part.rows for part in merged.parts]))


def row_mask(batch: RowBatch, lines: Iterable[Line]) -> torch.Tensor:
    """(R,) float mask of the batch's rows that belong to ``lines`` (1) or not (0).

    Cached per row layout and device: the layout repeats at every step, and building the
    tensor anew would copy from the host (and wait for the device) at every step.
    """
    row_lines = batch.row_lines or (batch.line,) * batch.rows
    return _cached_row_mask(tuple(row_lines), frozenset(lines), str(batch.sample.device))


@functools.lru_cache(maxsize=64)
def _cached_row_mask(row_lines: tuple[Line, ...], wanted: frozenset, device: str) -> torch.Tensor:
    return torch.tensor([1.0 if line in wanted else 0.0 for line in row_lines], device=device)


def _per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R,) mask shaped to broadcast over ``like`` (R, ...), in its dtype."""
    if like.shape[0] != mask.shape[0]:
        raise RuntimeError(f"a row-masked layer saw {like.shape[0]} rows but the mask has "
                           f"{mask.shape[0]}; this layer folds the batch and cannot be row-masked")
    return mask.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def lora_layer_row_maskable(layer: torch.nn.Module) -> bool:
    """True for a plain, unmerged LoRA layer, whose output a mask on ``lora_B`` can switch."""
    if getattr(layer, "merged", False) or not hasattr(layer, "lora_B"):
        return False
    # DoRA rescales the base output too: a mask on B alone would not switch it off.
    return not any(getattr(layer, "use_dora", {}).values())


def lora_row_maskable(modules: Iterable[torch.nn.Module | None]) -> bool:
    """True when every PEFT layer in ``modules`` can be switched per row."""
    from bf_core.switching import AdapterSwitch

    return AdapterSwitch(modules).row_maskable


def _active_up_projections(layers: Iterable[torch.nn.Module],
                           adapter_names: Iterable[str] | None) -> list[torch.nn.Module]:
    from bf_core.switching import _adapter_names

    wanted = None if adapter_names is None else set(adapter_names)
    return [layer.lora_B[name] for layer in layers if not layer._disable_adapters
            for name in _adapter_names(layer)
            if name in layer.lora_B and (wanted is None or name in wanted)]


class RowMaskedLoRA:
    """Named LoRA adapters of some PEFT layers, switched per row at many UNet calls.

    A forward hook on each active LoRA up-projection multiplies its output by the row mask
    of the current ``rows`` block, so an off row adds exactly zero to the base layer's
    output. The hooks are installed at the first ``rows`` and stay until ``close`` (a
    session closes it when the call ends); outside a ``rows`` block they pass outputs
    through untouched. Registering and removing hundreds of hooks at every step would cost
    milliseconds of Python per step at SDXL size.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], adapter_names: Iterable[str] | None = None):
        self.layers = list(layers)
        self.adapter_names = None if adapter_names is None else list(adapter_names)
        self._hooks: list | None = None
        self._mask: torch.Tensor | None = None
        # The mask reshaped per output layout, made once per block, not once per layer.
        self._shaped: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def rows(self, enabled_rows: torch.Tensor) -> Iterator[None]:
        """LoRA on for the rows where ``enabled_rows`` (R,) is 1 and off where it is 0."""
        if self._hooks is None:
            self._hooks = row_masked_hooks(self.layers, self.adapter_names, self._mask_for)
        self._mask, self._shaped = enabled_rows, {}
        try:
            yield
        finally:
            self._mask, self._shaped = None, {}

    def _mask_for(self, output: torch.Tensor) -> torch.Tensor | None:
        if self._mask is None:
            return None
        layout = (output.shape[0], output.ndim, output.dtype)
        shaped = self._shaped.get(layout)
        if shaped is None:
            shaped = self._shaped[layout] = _per_row(self._mask, output)
        return shaped

    def close(self) -> None:
        """Remove the hooks, if any were installed."""
        for handle in self._hooks or ():
            handle.remove()
        self._hooks, self._mask = None, None


def row_masked_hooks(layers: Sequence[torch.nn.Module], adapter_names: Iterable[str] | None,
                     mask_for) -> list:
    """Hooks on the active LoRA up-projections of ``layers`` that multiply each output by
    ``mask_for(output)`` (the row mask shaped for it), or leave it untouched when that is None."""
    def scale(module, args, output):
        mask = mask_for(output)
        return None if mask is None else output * mask

    return [up.register_forward_hook(scale)
            for up in _active_up_projections(layers, adapter_names)]


@contextmanager
def lora_rows(modules: Iterable[torch.nn.Module | None], enabled_rows: torch.Tensor,
              adapter_names: Iterable[str] | None = None) -> Iterator[None]:
    """``RowMaskedLoRA.rows`` for every PEFT layer in ``modules``, found now and unhooked on
    exit (a session that switches at every step keeps an ``AdapterSwitch`` instead)."""
    from bf_core.switching import AdapterSwitch

    switch = AdapterSwitch(modules, adapter_names)
    try:
        with switch.rows(enabled_rows):
            yield
    finally:
        switch.close()


def lora_up_projections(modules: Iterable[torch.nn.Module | None],
                        adapter_names: Iterable[str] | None = None) -> list[torch.nn.Module]:
    """The active LoRA up-projections (``lora_B``) of every PEFT LoRA layer in ``modules``."""
    from bf_core.switching import AdapterSwitch

    switch = AdapterSwitch(modules, adapter_names)
    return _active_up_projections([layer for _, layer in switch.all_layers], adapter_names)
