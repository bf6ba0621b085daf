"""PuLID-FLUX's injection as forward hooks on the blocks of a diffusers FLUX transformer.

diffusers' ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock`` both return
``(encoder_hidden_states, hidden_states)`` with the image tokens apart, so a forward hook on
the blocks of ``injection_positions`` that returns ``(encoder_hidden_states, hidden_states +
w * CA(T_id, hidden_states))`` is the official ``img = img + id_weight * pulid_ca[k](id,
img)`` (flux/model.py; spec 3.4). The transformer itself is never changed.

Which rows get which ID tokens is read at call time from one ``PuLIDFluxState``: a tuple of
``IdentityRun`` (rows [start, stop) and their tokens). Rows in no run are returned as the
block computed them, untouched: that is a zero ID weight, exactly. The hooks are installed
when a call opens and removed when it ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bf_backends.pulid_flux.modules import BlockPosition, PerceiverAttentionCA
from bf_core.errors import ConfigError

#: The official demo's id_weight slider spans 0 to 3; beyond 10 the image is noise.
MAX_ID_WEIGHT = 10.0


@dataclass(frozen=True)
class PuLIDFluxSettings:
    """How strongly and from which step the ID is injected (the official ``denoise``)."""

    id_weight: float = 1.0
    """w in ``img + w * CA(T_id, img)``; 0 leaves every row as the plain block output."""
    start_step: int = 0
    """The ID is injected at step indices i >= start_step (0 = every step)."""

    def __post_init__(self) -> None:
        weight = self.id_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or not 0 <= weight <= MAX_ID_WEIGHT:
            raise ConfigError(f"id_weight must be a number in [0, {MAX_ID_WEIGHT:g}] (the "
                              f"official demo uses 0 to 3, default 1), got {weight!r}.")
        start = self.start_step
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"start_step must be a step index >= 0 (an integer), got "
                              f"{start!r}.")

    def injects_at(self, step_index: int) -> bool:
        """Whether any row carries the ID at ``step_index``."""
        return self.id_weight != 0 and step_index >= self.start_step


@dataclass(frozen=True)
class IdentityRun:
    """Rows [start, stop) of one transformer call that carry the same ID tokens.

    tokens: (1, T, kv_dim) in the cross-attention modules' dtype and device.
    """

    start: int
    stop: int
    tokens: torch.Tensor


class PuLIDFluxState:
    """The rows of the next transformer call that get the ID, read by every block hook.

    runs: ``IdentityRun``s in row order (empty: no row has the ID); weight: the ID weight
    of every row inside a run.
    """

    def __init__(self) -> None:
        self.runs: tuple[IdentityRun, ...] = ()
        self.weight = 1.0

    @contextmanager
    def using(self, runs: Sequence[IdentityRun], weight: float) -> Iterator[PuLIDFluxState]:
        """``runs`` and ``weight`` for the calls inside the block; the previous ones after."""
        previous = self.runs, self.weight
        self.runs, self.weight = tuple(runs), weight
        try:
            yield self
        finally:
            self.runs, self.weight = previous


def add_identity(hidden_states: torch.Tensor, module: PerceiverAttentionCA,
                 runs: Sequence[IdentityRun], weight: float) -> torch.Tensor:
    """hidden_states (R, N, dim) -> (R, N, dim): rows in a run get ``+ weight * CA(tokens,
    rows)`` (spec 3.4), rows in none are the input rows themselves.

    ``weight`` stays a Python float, as the official ``id_weight``: a tensor weight would be
    rounded to the working dtype first and change the half-precision result.
    """
    rows = hidden_states.shape[0]
    if runs and runs[-1].stop > rows:
        raise RuntimeError(f"the PuLID-FLUX state covers rows up to {runs[-1].stop} but the "
                           f"block has {rows}; the ID rows were set for another call")
    pieces, done = [], 0
    for run in runs:
        if run.start > done:
            pieces.append(hidden_states[done:run.start])
        image = hidden_states[run.start:run.stop]
        pieces.append(image + weight * module(run.tokens, image))
        done = run.stop
    if done < rows:
        pieces.append(hidden_states[done:])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _check_device(module: PerceiverAttentionCA, hidden_states: torch.Tensor) -> None:
    device = module.to_q.weight.device
    if device != hidden_states.device:
        raise ConfigError(f"PuLID-FLUX's modules are on {device} but the transformer runs on "
                          f"{hidden_states.device}; call pipe.pulid_flux.to("
                          f"'{hidden_states.device}') after moving the pipeline.")


def block_hook(module: PerceiverAttentionCA, state: PuLIDFluxState):
    """A forward hook for one FLUX block: the block's output, plus the ID on the state's rows."""
    def hook(block: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]):
        if not state.runs:
            return None  # the block's own output, untouched
        encoder_hidden_states, hidden_states = output
        _check_device(module, hidden_states)
        return encoder_hidden_states, add_identity(hidden_states, module, state.runs,
                                                   state.weight)
    return hook


@dataclass
class BlockHooks:
    """The hooks of one call; ``remove`` takes them all off."""

    handles: list[Any]

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def install_block_hooks(transformer: nn.Module, modules: Sequence[PerceiverAttentionCA],
                        positions: Sequence[BlockPosition], state: PuLIDFluxState) -> BlockHooks:
    """Hook ``modules[k]`` after block ``positions[k]`` of ``transformer``."""
    if len(modules) != len(positions):
        raise ConfigError(f"PuLID-FLUX has {len(modules)} cross-attention modules for "
                          f"{len(positions)} block positions of this transformer; attach it "
                          "again to this pipeline")
    hooks = BlockHooks([])
    try:
        for module, position in zip(modules, positions, strict=True):
            block = getattr(transformer, position.blocks)[position.index]
            hooks.handles.append(block.register_forward_hook(block_hook(module, state)))
    except BaseException:
        hooks.remove()
        raise
    return hooks
