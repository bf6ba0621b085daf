"""Which LoRA adapters each person's ID line keeps on: the call option ``person_adapters``.

With several people, each can come with a character LoRA of their own. The pipeline holds
them all, active together (``pipe.set_adapters([...])``); in person j's rows only j's
adapters stay on, in the UNet (per row, ``bf_core.switching.RowMaskedLoRA``) and in both
text encoders while j's ``id_prompt`` is encoded. An entry of None keeps every active
adapter, which is the DreamBooth backend's behaviour without the option.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from bf_core.errors import ConfigError
from bf_core.protocols import Line
from bf_core.switching import active_adapter_names, peft_tuner_layers, stored_adapter_names

OPTION = "person_adapters"
#: one entry per person: the adapter names their ID line keeps on, None for every active one
PersonAdapters = frozenset[str] | None
#: a row batch's parts as (line, line index, rows): what a row mask depends on
RowLayout = tuple[tuple[Line, int, int], ...]


def parse_person_adapters(value: Any) -> list[PersonAdapters] | None:
    """The option as one entry per person: an adapter name, a list of names, or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{OPTION} must be a list with one entry per person (an adapter name, "
                          f"a list of names, or None for every active adapter), e.g. "
                          f"{OPTION}=['ana', 'ben']; got {value!r:.60}")
    entries: list[PersonAdapters] = []
    for index, entry in enumerate(value):
        names = (entry,) if isinstance(entry, str) else entry
        if entry is not None and (not isinstance(names, (list, tuple, set, frozenset))
                                  or not all(isinstance(name, str) for name in names)):
            raise ConfigError(f"{OPTION}[{index}] must be an adapter name, a list of names or "
                              f"None, got {entry!r:.60}")
        entries.append(None if entry is None else frozenset(names))
    return entries


def adapter_names(modules: Iterable[torch.nn.Module | None]) -> tuple[set[str], set[str]]:
    """(active, loaded): the adapter names the PEFT layers of ``modules`` apply now, and
    every name they hold weights of."""
    active: set[str] = set()
    loaded: set[str] = set()
    for module in modules:
        for _, layer in peft_tuner_layers(module):
            loaded |= stored_adapter_names(layer)
            if not getattr(layer, "_disable_adapters", False):
                active |= active_adapter_names(layer)
    return active, loaded


def check_person_adapters(entries: Sequence[PersonAdapters],
                          modules: Iterable[torch.nn.Module | None]) -> tuple[list[PersonAdapters],
                                                                               frozenset[str]]:
    """Every named adapter must be loaded and active. Returns the entries with "all the
    active ones" written as None (that person's rows need no switch) and the active names."""
    active, loaded = adapter_names(modules)
    named = set().union(*(entry for entry in entries if entry))
    unknown = named - loaded
    if unknown:
        raise ConfigError(
            f"{OPTION} names {sorted(unknown)}, which the pipeline has not loaded; its adapters "
            f"are {sorted(loaded) or 'none'}. Load each person's LoRA with "
            "pipe.load_lora_weights(path, adapter_name=...) first")
    inactive = named - active
    if inactive:
        raise ConfigError(
            f"{OPTION} names {sorted(inactive)}, loaded but not active. Activate every "
            f"person's adapter before the call, e.g. pipe.set_adapters({sorted(named | active)}): "
            "each person's rows then keep only their own")
    full = frozenset(active)
    return [None if entry == full else entry for entry in entries], full


def row_layout(batch: Any) -> RowLayout:
    """A host row batch's (line, line index, rows) per part: one part for a one-line batch."""
    return tuple((part.line, part.line_index, part.rows) for part in (batch.parts or (batch,)))


def person_row_masks(layout: RowLayout, entries: Sequence[PersonAdapters],
                     active: Iterable[str], semantic_on: bool,
                     device: torch.device | str) -> dict[str, torch.Tensor]:
    """Each active adapter's (R,) 0/1 row mask for a batch of ``layout``.

    An adapter is on in the baseline line's rows, in the semantic line's when
    ``semantic_on``, and in ID line j's when person j's entry names it (or is None).
    """
    def on(adapter: str, line: Line, index: int) -> bool:
        if line is Line.ID:
            entry = entries[index - 1]
            return entry is None or adapter in entry
        return line is Line.BASELINE or semantic_on

    return {adapter: torch.tensor([float(on(adapter, line, index))
                                   for line, index, rows in layout for _ in range(rows)],
                                  device=device)
            for adapter in sorted(active)}


def text_encoder_switches(entry: frozenset[str], active: Iterable[str]) -> dict[str, torch.Tensor]:
    """One 0-dim switch per active adapter for encoding one person's prompt: 1 for the
    person's adapters, 0 for the others (every row of the text encoders alike)."""
    return {adapter: torch.tensor(float(adapter in entry)) for adapter in sorted(active)}
