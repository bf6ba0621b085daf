"""Safe checkpoint reading and strict key/shape checking, shared by every backend.

Rules (see DESIGN.md): safetensors first; pickled files only through
``torch.load(weights_only=True)``; unknown, missing or mis-shaped keys are an error that
names them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from bf_core.errors import CheckpointError

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
_MAX_LISTED = 8


def load_state_dict_file(path: str | os.PathLike, device: str = "cpu") -> dict:
    """Read a ``.safetensors`` file or a pickled ``.bin``/``.pt`` file safely.

    Returns the raw object: a flat ``{key: tensor}`` dict for safetensors, and whatever
    (tensors, dicts, lists, numbers) ``torch.load(weights_only=True)`` accepts for pickles.
    Raises ``CheckpointError`` for a missing, unreadable or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}. Pass the path of a "
                              f".safetensors or .bin file that exists.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=device)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}). "
                                  "It may be truncated or corrupt: download it again.") from exc
    if suffix in _PICKLE_SUFFIXES:
        try:
            return torch.load(str(path), map_location=device, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path} could not be loaded with torch.load(weights_only=True) ({exc}). "
                "Either the file is corrupt, or it contains pickled code, which this "
                "library never executes: convert it to .safetensors with the tool that "
                "made it.") from exc
    raise CheckpointError(f"{path}: unsupported checkpoint format {suffix!r}; expected "
                          ".safetensors, .bin, .pt, .pth or .ckpt.")


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly ``expected``'s keys and shapes.

    ``what`` names the thing being loaded ("PhotoMaker V2 id_encoder") for the message.
    """
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = expected.keys() - got.keys()
    unexpected = got.keys() - expected.keys()
    wrong = {k for k in expected.keys() & got.keys() if tuple(expected[k]) != got[k]}
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if wrong:
        shown = sorted(wrong)[:_MAX_LISTED]
        parts.append("wrong shape(s): " + ", ".join(
            f"{k} is {got[k]} but must be {tuple(expected[k])}" for k in shown))
    raise CheckpointError(f"{what}: the state dict does not match; " + "; ".join(parts) +
                          ". Check that the file is the right method and version.")


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a module's state dict (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Check keys and shapes with a named error, then ``load_state_dict(strict=True)``.

    Loads with ``assign=True`` when the module lives on the meta device.
    """
    check_state_dict(state_dict, expected_shapes(module), what)
    on_meta = any(p.is_meta for p in module.parameters())
    module.load_state_dict(dict(state_dict), strict=True, assign=on_meta)
