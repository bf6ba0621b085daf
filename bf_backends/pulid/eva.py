"""EVA02-CLIP-L-14-336 image features for PuLID, through timm.

PuLID reads two things from the EVA-CLIP vision tower for each masked grey face crop:
the CLIP image embedding (final LayerNorm, CLS token, 1024 -> 768 head) and five raw
intermediate hidden states, the residual stream entering blocks 4, 8, 12, 16 and 20
(the outputs of blocks 3, 7, 11, 15 and 19), CLS token included. timm's
``eva02_large_patch14_clip_336`` is the same architecture as PuLID's vendored tower, and
timm's ``checkpoint_filter_fn`` reads the original ``EVA02_CLIP_L_336_psz14_s6B.pt`` (or
timm's own ``eva02_large_patch14_clip_336.merged2b`` files) directly.

timm needs a torchvision that matches the installed torch; it is an optional dependency
(the ``pulid`` extra) imported only inside :func:`build_eva_tower`.
``EVAFeatures`` itself needs only torch: it reads hidden states with forward hooks on
``tower.blocks``, so any tower with that layout (timm's, or the tiny stand-in the tests
use) serves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bf_core.errors import ConfigError, MissingDependencyError

#: Blocks whose *outputs* PuLID reads (0-based), i.e. the inputs of blocks 4, 8, 12, 16, 20.
PULID_HIDDEN_BLOCKS = (3, 7, 11, 15, 19)
#: The weight file of the original EVA-CLIP release that PuLID loads (QuanSun/EVA-CLIP).
EVA_CLIP_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
#: timm's name for the same vision tower and the pretrained tag of the same training run.
TIMM_MODEL = "eva02_large_patch14_clip_336"
TIMM_PRETRAINED_TAG = "eva02_large_patch14_clip_336.merged2b"
#: OpenAI CLIP normalisation constants (what PuLID's ``eva_transform_mean/std`` hold).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PULID_EXTRA_HINT = ("Install the PuLID extra: pip install 'beyondfacial[pulid]' (timm with a "
                    "torchvision built for your torch; with a CPU-only torch install "
                    "torch and torchvision together, e.g. torch==2.14.1 torchvision==0.29.1).")


def eva02_clip_l_336_args() -> dict[str, Any]:
    """Constructor arguments of timm's ``Eva`` for EVA02-CLIP-L-14-336's vision tower.

    The same values as timm's ``eva02_large_patch14_clip_336`` with ``num_classes=768``
    (the CLIP head) and the "token" pool (final norm, then CLS, then head).
    """
    return dict(img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                mlp_ratio=4 * 2 / 3, qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16),
                global_pool="token", num_classes=768)


def _import_timm():
    try:
        import timm
        import timm.models.eva  # noqa: F401  (the Eva class and its checkpoint filter)
    except ImportError as exc:
        raise MissingDependencyError(
            f"PuLID's EVA-CLIP image encoder needs timm, which could not be imported ({exc}). "
            f"{PULID_EXTRA_HINT}") from exc
    except (RuntimeError, OSError) as exc:
        # A torchvision built for another torch fails at import with a RuntimeError
        # ("operator torchvision::nms does not exist"), and timm imports torchvision.
        raise MissingDependencyError(
            f"timm is installed but could not be imported, usually because torchvision does "
            f"not match torch ({exc}). {PULID_EXTRA_HINT}") from exc
    return timm


def build_eva_tower(weights: str | os.PathLike | dict | None = None, *,
                    model_args: dict[str, Any] | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """timm's EVA02 vision tower, float32, in eval mode, loaded strictly from ``weights``.

    weights: the original ``EVA02_CLIP_L_336_psz14_s6B.pt`` (``visual.`` keys, read with
        ``torch.load(weights_only=True)``), timm's ``model.safetensors`` /
        ``open_clip_pytorch_model.bin`` of ``eva02_large_patch14_clip_336.merged2b``, or a
        state dict; None leaves random weights (tests). Converted by timm's own
        ``checkpoint_filter_fn``; the text tower's keys of a full CLIP file are ignored.
    model_args: ``Eva`` constructor arguments; default :func:`eva02_clip_l_336_args`.
    """
    _import_timm()
    from timm.models.eva import Eva, checkpoint_filter_fn

    from bf_core.checkpoints import load_state_dict_file, load_strict

    tower = Eva(**(model_args or eva02_clip_l_336_args()))
    if weights is not None:
        state_dict = weights if isinstance(weights, dict) else load_state_dict_file(weights)
        converted = checkpoint_filter_fn(dict(state_dict), tower)
        load_strict(tower, converted, "EVA02-CLIP vision tower")
    return tower.to(device=device, dtype=torch.float32).eval()


class EVAFeatures(nn.Module):
    """A CLIP vision tower as PuLID reads it: pixels -> (embedding, five hidden states).

    tower: a module with ``blocks`` (a sequence of transformer blocks whose outputs are
        (N, tokens, width)) whose forward returns the CLIP embedding (N, E).
    image_size: the tower's input side (336 for EVA02-CLIP-L-14-336).
    hidden_blocks: blocks whose outputs are returned (PuLID: 3, 7, 11, 15, 19).
    """

    def __init__(self, tower: nn.Module, image_size: int = 336,
                 hidden_blocks: Sequence[int] = PULID_HIDDEN_BLOCKS) -> None:
        super().__init__()
        blocks = getattr(tower, "blocks", None)
        if blocks is None or len(blocks) <= max(hidden_blocks):
            have = "no 'blocks'" if blocks is None else f"{len(blocks)} blocks"
            raise ConfigError(f"the vision tower has {have}; PuLID reads the outputs of blocks "
                              f"{tuple(hidden_blocks)}, so it needs at least "
                              f"{max(hidden_blocks) + 1} (EVA02-CLIP-L has 24).")
        self.tower = tower
        self.image_size = int(image_size)
        self.hidden_blocks = tuple(hidden_blocks)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels (N, 3, S, S), normalised -> embedding (N, E), five (N, tokens, width).

        The hidden states are raw (no LayerNorm) and keep the CLS token first.
        """
        captured: dict[int, torch.Tensor] = {}
        handles = [self.tower.blocks[index].register_forward_hook(_capture_into(captured, index))
                   for index in self.hidden_blocks]
        try:
            embedding = self.tower(pixels)
        finally:  # the hooks are ours only for this call
            for handle in handles:
                handle.remove()
        return embedding, [captured[index] for index in self.hidden_blocks]


def _capture_into(store: dict[int, torch.Tensor], index: int):
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        store[index] = output

    return hook


def load_eva_features(weights: str | os.PathLike | dict | None = None, *,
                      device: torch.device | str | None = None) -> EVAFeatures:
    """EVA02-CLIP-L-14-336 from ``weights`` (see :func:`build_eva_tower`), ready for PuLID."""
    return EVAFeatures(build_eva_tower(weights, device=device), image_size=336)
