"""Every knob of the method, validated, with the paper's defaults.

Small frozen dataclasses, one per component (``IdAFConfig``, ``IdAPConfig``) composed by
``BFConfig``. Each field is checked in ``__post_init__`` with a message that names the
field and the allowed range. Thresholds that depend on the step count are checked again
by ``resolve_step`` once the number of steps is known.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass, field

from bf_core.errors import ConfigError

LAMBDA_MODES = ("temperature", "weight")
SMOOTHINGS = ("avgpool", "downup", "none")
SALIENCIES = ("guided", "cfg_delta", "x0")
NEGATIVE_POLICIES = ("aggregate", "zeros")
SEMANTIC_ADAPTER_POLICIES = ("off", "on")
IDAP_PEOPLE_POLICIES = ("all", "none")
AUTO_REGION_FALLBACKS = ("bands", "error")  # bf_core.regions reads them from here


#: Upper bounds that keep every setting meaningful. A lambda times a saliency must stay far
#: from float32 overflow; K prepended tokens beyond a few hundred only dilute the prompt; a
#: box kernel wider than any latent only averages padding.
MAX_LAMBDA = 1e4
TEMPERATURE_RANGE = (1e-3, 1e3)
MAX_IDAP_TOKENS = 256
MAX_SMOOTH_KERNEL = 128
MAX_AUTO_REGION_SCALE = 20.0
MAX_SEED = 2**63 - 1

#: a main call of at most this many steps is a few-step model's: the face-refine pass keeps
#: its step count (RefineConfig.steps)
FEW_STEP_MAIN_CALL = 8


def _require_positive(name: str, value, upper: float = MAX_LAMBDA, lower: float = 0.0) -> None:
    """A finite real number in (lower, upper] (``lower`` itself allowed when it is > 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0 or value < lower or value > upper:
        bounds = f"<= {upper:g}" if lower == 0.0 else f"in [{lower:g}, {upper:g}]"
        raise ConfigError(f"{name} must be a finite number > 0 and {bounds}, got {value!r}")


def _require_int(name: str, value, lowest: int, highest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not lowest <= value <= highest:
        raise ConfigError(f"{name} must be an int >= {lowest} and <= {highest}, got {value!r}")


def _require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _require_threshold(name: str, value) -> None:
    """A threshold is an int step index >= 0 or a float fraction in [0, 1)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an int step index >= 0 or a float in [0, 1), "
                          f"got the bool {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ConfigError(f"{name} as a step index must be >= 0, got {value}")
        return
    if isinstance(value, numbers.Real):
        if not (0.0 <= value < 1.0):
            raise ConfigError(f"{name} as a fraction of the step count must be in [0, 1), "
                              f"got {value!r}; give an int for a step index")
        return
    raise ConfigError(f"{name} must be an int step index or a float in [0, 1), got {value!r}")


@dataclass(frozen=True)
class IdAFConfig:
    """Identity Adaptive Fusion (paper eq. 6-10).

    lambda_id, lambda_sem: softmax inverse temperatures (``"temperature"``) or output
        weights (``"weight"``) of the ID and semantic lines; paper: 5 and 1; in (0, 1e4].
    lambda_mode: where lambda acts, see docs/method.md for why both readings exist.
    smoothing: ``"avgpool"`` (box average of ``smooth_kernel`` then bilinear back up),
        ``"downup"`` (bilinear down by ``smooth_kernel`` then back up) or ``"none"``.
    smooth_kernel: box size or down factor; 4 as in the reference code; 1 to 128.
    saliency: ``"guided"`` (|guided noise|, the paper; on FLUX |guided velocity|),
        ``"cfg_delta"`` (|s * (eps_cond - eps_uncond_sem)|, the MagicFusion reading) or
        ``"x0"`` (|each line's clean-latent estimate|, an ablation; on FLUX |x_t - sigma v|).
    """

    lambda_id: float = 5.0
    lambda_sem: float = 1.0
    lambda_mode: str = "temperature"
    smoothing: str = "avgpool"
    smooth_kernel: int = 4
    saliency: str = "guided"

    def __post_init__(self):
        _require_positive("IdAFConfig.lambda_id", self.lambda_id)
        _require_positive("IdAFConfig.lambda_sem", self.lambda_sem)
        _require_choice("IdAFConfig.lambda_mode", self.lambda_mode, LAMBDA_MODES)
        _require_choice("IdAFConfig.smoothing", self.smoothing, SMOOTHINGS)
        _require_choice("IdAFConfig.saliency", self.saliency, SALIENCIES)
        _require_int("IdAFConfig.smooth_kernel", self.smooth_kernel, 1, MAX_SMOOTH_KERNEL)


@dataclass(frozen=True)
class IdAPConfig:
    """Identity Aggregation Prepending (paper eq. 11-12).

    num_tokens: K, the number of aggregated ID tokens prepended to the scene prompt (paper: 8;
        1 to 256).
    seed: seed of the CPU generator that draws the fixed query Q ~ N(0, 1), shape (K, D).
    temperature: ``None`` (eq. 11 as written, unscaled), a float in [1e-3, 1e3] dividing the logits,
        or ``"sqrt_d"`` for sqrt(D).
    negative: how the negative branch gets K tokens too: ``"aggregate"`` (the same
        aggregation of the ID line's negative tokens) or ``"zeros"``.
    query_file: optional safetensors file with a trained ``idap_query`` (K, D) used instead
        of the seeded random Q.
    """

    num_tokens: int = 8
    seed: int = 0
    temperature: float | str | None = None
    negative: str = "aggregate"
    query_file: str | None = None

    def __post_init__(self):
        _require_int("IdAPConfig.num_tokens (K)", self.num_tokens, 1, MAX_IDAP_TOKENS)
        _require_int("IdAPConfig.seed", self.seed, 0, MAX_SEED)
        if self.temperature is not None and self.temperature != "sqrt_d":
            low, high = TEMPERATURE_RANGE
            _require_positive("IdAPConfig.temperature (or None, or 'sqrt_d')", self.temperature,
                              upper=high, lower=low)
        _require_choice("IdAPConfig.negative", self.negative, NEGATIVE_POLICIES)
        if self.query_file is not None and not isinstance(self.query_file, (str, os.PathLike)):
            raise ConfigError(f"IdAPConfig.query_file must be a path (str or os.PathLike) of a "
                              f"safetensors file, or None; got {self.query_file!r}")


@dataclass(frozen=True)
class RefineConfig:
    """The face-refine pass (``refine_faces=True``; docs/refine.md), the spec's defaults.

    max_faces: faces refined per person (the largest first); max_face_px: only faces whose
    short side is below this are refined (larger ones are drawn well already);
    mask_scale: the face box is scaled by it about its centre (forehead, hairline, chin);
    mask_dilate_px: the sampler's binary mask grows by it; mask_blur_px: the paste mask's
    soft edge (its support is the scaled box grown by this much); crop_factor: the crop is
    a square of this times the face's long side; work_size: the side the crop is denoised
    at (None: the host's native size); strength: how far the crop is noised back (0, 1];
    effective_steps: about this many steps really run (steps = ceil(effective / strength));
    min_effective_steps: a few-step model (<= 8 steps in the main call) keeps its own step
    count and at least this many effective steps; detector_size: the face analysis'
    detection size; identity: ``"on"`` (the backend's identity machinery in the pass) or
    ``"off"`` (the ablation: the base model alone).
    """

    max_faces: int = 1
    max_face_px: int = 256
    mask_scale: float = 1.2
    mask_dilate_px: int = 4
    mask_blur_px: int = 4
    crop_factor: float = 3.0
    work_size: int | None = None
    strength: float = 0.45
    effective_steps: int = 20
    min_effective_steps: int = 2
    detector_size: int = 1024
    identity: str = "on"

    def __post_init__(self):
        _require_int("RefineConfig.max_faces", self.max_faces, 1, 64)
        _require_int("RefineConfig.max_face_px", self.max_face_px, 1, 1 << 16)
        _require_positive("RefineConfig.mask_scale", self.mask_scale, upper=10.0, lower=1.0)
        _require_int("RefineConfig.mask_dilate_px", self.mask_dilate_px, 0, 256)
        _require_int("RefineConfig.mask_blur_px", self.mask_blur_px, 0, 256)
        _require_positive("RefineConfig.crop_factor", self.crop_factor, upper=20.0, lower=1.0)
        if self.work_size is not None:
            _require_int("RefineConfig.work_size", self.work_size, 16, 4096)
        _require_positive("RefineConfig.strength", self.strength, upper=1.0)
        _require_int("RefineConfig.effective_steps", self.effective_steps, 1, 1000)
        _require_int("RefineConfig.min_effective_steps", self.min_effective_steps, 1, 1000)
        _require_int("RefineConfig.detector_size", self.detector_size, 32, 4096)
        _require_choice("RefineConfig.identity", self.identity, ("on", "off"))
        if self.mask_blur_px > self.mask_dilate_px:
            raise ConfigError(f"RefineConfig.mask_blur_px={self.mask_blur_px} is larger than "
                              f"mask_dilate_px={self.mask_dilate_px}: the soft edge would paste "
                              "pixels the pass did not denoise; keep blur <= dilate")

    def steps(self, main_steps: int) -> tuple[int, float]:
        """(steps, strength) of the pass: ceil(effective / strength) steps at ``strength``;
        after a few-step model's main call (<= ``FEW_STEP_MAIN_CALL`` steps), its own step
        count, the strength raised so that at least ``min_effective_steps`` run."""
        if main_steps <= FEW_STEP_MAIN_CALL:
            strength = max(self.strength, min(1.0, self.min_effective_steps / main_steps))
            return main_steps, strength
        return math.ceil(self.effective_steps / self.strength), self.strength


def effective_steps(steps: int, strength: float) -> int:
    """How many steps an img2img pass of ``steps`` at ``strength`` runs: diffusers' rule,
    steps - int(steps - strength * steps), i.e. ceil(strength * steps) up to round-off."""
    init = min(steps * strength, steps)
    return steps - int(max(steps - init, 0))


@dataclass(frozen=True)
class BFConfig:
    """Top-level configuration of BeyondFacial.

    enabled: ``False`` runs the backend's stock single-line algorithm (baseline parity).
    idaf_start: M1. The ID line runs and IdAF fuses at steps ``i > M1``. A float in
        [0, 1) is a fraction of the step count (M = round(f * T)); an int is a step index.
    idap_start: M2. The semantic line carries the IdAP tokens at steps ``i > M2``.
    use_idaf, use_idap: switch each component off for ablations. Without IdAF the ID line
        is never evaluated; without IdAP the scene prompt is never extended.
    idaf, idap: component settings.
    semantic_adapters: ``"off"`` (the semantic line runs the base model with the backend's
        identity machinery switched off, the paper) or ``"on"`` (it stays on).
    share_negative: compute the negative branch once for both lines when they are provably
        identical (same tensors, same model state); changes nothing beyond round-off.
    batch_lines: evaluate both lines in one row-masked UNet call when the backend can
        switch its state per row (faster on a GPU; equal to separate calls up to float
        round-off, see ``bf_core.rowbatch``); False keeps one call per line.
    idap_people: with several people, ``"all"`` prepends every person's K IdAP tokens to the
        scene prompt (N*K + L tokens), ``"none"`` prepends none (IdAP off).
    auto_region_scale: a ``region="auto"`` is the face found in the step-M1 preview, its box
        scaled by this factor about its centre (head and hair); in [1, 20].
    auto_region_fallback: when the preview shows fewer faces than ``"auto"`` persons:
        ``"bands"`` (equal vertical bands of the free width, with a warning) or ``"error"``
        (``RegionNotFoundError``).
    refine: the face-refine pass's settings (``RefineConfig``), used with ``refine_faces``.
    """

    enabled: bool = True
    idaf_start: int | float = 0.2
    idap_start: int | float = 0.3
    use_idaf: bool = True
    use_idap: bool = True
    idaf: IdAFConfig = field(default_factory=IdAFConfig)
    idap: IdAPConfig = field(default_factory=IdAPConfig)
    semantic_adapters: str = "off"
    share_negative: bool = False
    batch_lines: bool = True
    idap_people: str = "all"
    auto_region_scale: float = 2.5
    auto_region_fallback: str = "bands"
    refine: RefineConfig = field(default_factory=RefineConfig)

    def __post_init__(self):
        for name in ("enabled", "use_idaf", "use_idap", "share_negative", "batch_lines"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"BFConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _require_threshold("BFConfig.idaf_start", self.idaf_start)
        _require_threshold("BFConfig.idap_start", self.idap_start)
        if not isinstance(self.idaf, IdAFConfig):
            raise ConfigError(f"BFConfig.idaf must be an IdAFConfig, got {type(self.idaf).__name__}")
        if not isinstance(self.idap, IdAPConfig):
            raise ConfigError(f"BFConfig.idap must be an IdAPConfig, got {type(self.idap).__name__}")
        _require_choice("BFConfig.semantic_adapters", self.semantic_adapters, SEMANTIC_ADAPTER_POLICIES)
        _require_choice("BFConfig.idap_people", self.idap_people, IDAP_PEOPLE_POLICIES)
        _require_positive("BFConfig.auto_region_scale", self.auto_region_scale,
                          upper=MAX_AUTO_REGION_SCALE, lower=1.0)
        _require_choice("BFConfig.auto_region_fallback", self.auto_region_fallback,
                        AUTO_REGION_FALLBACKS)
        if not isinstance(self.refine, RefineConfig):
            raise ConfigError(f"BFConfig.refine must be a RefineConfig, got "
                              f"{type(self.refine).__name__}")

    def thresholds(self, num_steps: int, rounding: str = "nearest") -> tuple[int, int]:
        """(M1, M2) as step indices for a schedule of ``num_steps`` steps; ``rounding`` of
        a fraction is the host's (``"nearest"`` on SDXL, ``"floor"`` on FLUX)."""
        return (resolve_step("BFConfig.idaf_start", self.idaf_start, num_steps, rounding),
                resolve_step("BFConfig.idap_start", self.idap_start, num_steps, rounding))


THRESHOLD_ROUNDINGS = ("nearest", "floor")


def resolve_step(name: str, value: int | float, num_steps: int, rounding: str = "nearest") -> int:
    """Turn a threshold into a step index M for a schedule of ``num_steps`` steps.

    A float f in [0, 1) gives round(f * T) (``rounding="floor"``: floor(f * T), FLUX's
    choice: 0.2 and 0.3 of 28 steps are 5 and 8). An int is taken as is; since a component
    runs at steps ``i > M``, an int M >= T - 1 would never run and is refused.
    """
    if rounding not in THRESHOLD_ROUNDINGS:
        raise ConfigError(f"threshold rounding must be one of {THRESHOLD_ROUNDINGS}, got {rounding!r}")
    _require_threshold(name, value)
    if isinstance(value, numbers.Integral):
        if value >= num_steps - 1:
            raise ConfigError(
                f"{name}={value} is a step index at or beyond the last step of a {num_steps}-step "
                f"schedule (steps i > {value} never happen): use an int in [0, {max(num_steps - 2, 0)}] "
                "or a fraction in [0, 1)")
        return int(value)
    step = int(value * num_steps) if rounding == "floor" else int(round(value * num_steps))
    if step >= num_steps - 1:
        warnings.warn(f"{name}={value} gives step {step} of a {num_steps}-step schedule: steps "
                      f"i > {step} never happen, so this component will not run", stacklevel=3)
    return step
