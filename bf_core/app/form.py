"""The web app's form, as the ``beyondfacial generate`` command line it stands for.

A run of the app is a run of ``generate``: the form's values become that command's
arguments, which the CLI's own parser reads and the CLI's own ``config_from_args`` turns
into a ``BFConfig``. So the command the page shows reproduces the run by construction, and
a setting is validated once, by the library, whichever way it was given.

Only the standard library and ``bf_core.config`` are imported here (no torch, no gradio).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
from dataclasses import dataclass, fields

from bf_core.config import BFConfig
from bf_core.errors import ConfigError

#: How M1 and M2 are read: a fraction of the step count, or a step index.
FRACTION = "fraction of the steps"
STEP_INDEX = "step index"
THRESHOLD_UNITS = (FRACTION, STEP_INDEX)
#: The app takes one person's photos; several people are the CLI's ``--person``.
MAX_PHOTOS = 4
#: The file-name stem of every run (``generate``'s default ``--name``).
STEM = "image"

_PAPER = BFConfig()


@dataclass
class AppForm:
    """Every value of the form, with the defaults of ``generate`` (the paper's settings).

    seeds: integers separated by commas or spaces. guidance_scale: a number, or empty for
    the pipeline's own. height, width: None or 0 for the pipeline's own size.
    idap_temperature: "" (none, eq. 11 as written), "sqrt_d" or a number.
    base_model: empty for the tiny offline pipeline of ``backend``.
    """

    backend: str = "photomaker"
    prompt: str = ""
    id_prompt: str = ""
    negative_prompt: str = ""
    seeds: str = "0"
    steps: int = 20
    guidance_scale: str | float | None = ""
    height: int | None = None
    width: int | None = None
    method_on: bool = _PAPER.enabled
    threshold_unit: str = FRACTION
    idaf_start: float = _PAPER.idaf_start
    idap_start: float = _PAPER.idap_start
    use_idaf: bool = _PAPER.use_idaf
    use_idap: bool = _PAPER.use_idap
    lambda_id: float = _PAPER.idaf.lambda_id
    lambda_sem: float = _PAPER.idaf.lambda_sem
    lambda_mode: str = _PAPER.idaf.lambda_mode
    smoothing: str = _PAPER.idaf.smoothing
    smooth_kernel: int = _PAPER.idaf.smooth_kernel
    saliency: str = _PAPER.idaf.saliency
    idap_tokens: int = _PAPER.idap.num_tokens
    idap_seed: int = _PAPER.idap.seed
    idap_temperature: str = ""
    idap_negative: str = _PAPER.idap.negative
    idap_query_file: str = ""
    semantic_adapters: str = _PAPER.semantic_adapters
    share_negative: bool = _PAPER.share_negative
    batch_lines: bool = _PAPER.batch_lines
    idap_people: str = _PAPER.idap_people
    auto_region_scale: float = _PAPER.auto_region_scale
    auto_region_fallback: str = _PAPER.auto_region_fallback
    refine_faces: bool = False
    refine_strength: float = _PAPER.refine.strength
    base_model: str = ""
    checkpoint: str = ""
    device: str = ""
    dtype: str = "float16"

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def tiny(self) -> bool:
        return not self.base_model.strip()


#: Form fields given as ``--flag value`` when they differ from the defaults.
_VALUE_FLAGS = {
    "lambda_id": "--lambda-id", "lambda_sem": "--lambda-sem", "lambda_mode": "--lambda-mode",
    "smoothing": "--smoothing", "smooth_kernel": "--smooth-kernel", "saliency": "--saliency",
    "idap_tokens": "--idap-tokens", "idap_seed": "--idap-seed",
    "idap_negative": "--idap-negative", "semantic_adapters": "--semantic-adapters",
    "idap_people": "--idap-people", "auto_region_scale": "--auto-region-scale",
    "auto_region_fallback": "--auto-region-fallback", "refine_strength": "--refine-strength",
}
#: Form switches whose value False is the flag (``method_on=False`` is ``--disable``).
_OFF_FLAGS = {"method_on": "--disable", "use_idaf": "--no-idaf", "use_idap": "--no-idap",
              "batch_lines": "--no-batch-lines"}


def parse_seeds(text: str) -> list[int]:
    """'0, 1 2' -> [0, 1, 2]; at least one non-negative integer."""
    parts = str(text).replace(",", " ").split()
    try:
        seeds = [int(part) for part in parts]
    except ValueError:
        seeds = []
    if not seeds or any(seed < 0 for seed in seeds):
        raise ConfigError(f"seeds must be integers >= 0 separated by commas, got {text!r}")
    return seeds


def threshold_text(name: str, value, unit: str) -> str:
    """M1 or M2 as ``generate`` reads it: '10' is a step index, '0.2' a fraction."""
    if unit not in THRESHOLD_UNITS:
        raise ConfigError(f"M1/M2 are given as one of {THRESHOLD_UNITS}, got {unit!r}")
    if value is None:
        raise ConfigError(f"{name} is empty: give a {unit}")
    if unit == FRACTION:
        return repr(float(value))
    if float(value) != int(value):
        raise ConfigError(f"{name} as a step index must be a whole number, got {value!r}")
    return str(int(value))


def convert_thresholds(unit: str, m1, m2, steps) -> tuple:
    """M1 and M2 moved into ``unit`` (the other unit's values) at this step count, for the
    page's unit switch: a fraction f is step round(f * T), a step index M is M / T."""
    if not steps or steps < 1:
        return m1, m2

    def convert(value):
        if value is None:
            return None
        if unit == STEP_INDEX:
            return int(round(float(value) * steps))
        return round(float(value) / steps, 4)

    return convert(m1), convert(m2)


#: Form fields ``generate`` reads as ints (a number box may hand over 8.0).
_INT_FIELDS = frozenset({"steps", "smooth_kernel", "idap_tokens", "idap_seed"})


def _value_text(name: str, value) -> str:
    """A form value as ``generate`` reads it; a fractional int is left for its parser to
    refuse, naming the option."""
    if value is None:
        raise ConfigError(f"{name} is empty: give a value (default {getattr(AppForm, name)})")
    if isinstance(value, str):
        return value
    if name in _INT_FIELDS and float(value).is_integer():
        return str(int(value))
    return repr(value)


def _temperature_text(text: str) -> str | None:
    text = str(text or "").strip()
    if text in ("", "none", "None"):
        return None
    if text != "sqrt_d":
        try:
            float(text)
        except ValueError:
            raise ConfigError(f"the IdAP temperature is empty (none), sqrt_d or a number, "
                              f"got {text!r}") from None
    return text


def config_argv(form: AppForm) -> list[str]:
    """The BeyondFacial options of ``generate`` for the form's settings, defaults left out."""
    default = AppForm()
    argv = [flag for name, flag in _OFF_FLAGS.items() if not getattr(form, name)]
    if form.share_negative:
        argv.append("--share-negative")
    if form.refine_faces:  # the face-refine pass (docs/refine.md)
        argv.append("--refine-faces")
    for name, label in (("idaf_start", "M1"), ("idap_start", "M2")):
        text = threshold_text(label, getattr(form, name), form.threshold_unit)
        if text != repr(float(getattr(default, name))):
            argv += [f"--{name.replace('_', '-')}", text]
    for name, flag in _VALUE_FLAGS.items():
        value = getattr(form, name)
        if value != getattr(default, name):
            argv += [flag, _value_text(name, value)]
    temperature = _temperature_text(form.idap_temperature)
    if temperature is not None:
        argv += ["--idap-temperature", temperature]
    if form.idap_query_file.strip():
        argv += ["--idap-query-file", form.idap_query_file.strip()]
    return argv


def _model_argv(form: AppForm) -> list[str]:
    if form.tiny:
        if form.checkpoint.strip():
            raise ConfigError("a checkpoint needs its base model: fill in the base-model folder "
                              "or hub id, or clear the checkpoint to run the tiny pipeline")
        return ["--tiny"]
    argv = ["--base-model", form.base_model.strip()]
    if form.checkpoint.strip():
        argv += ["--checkpoint", form.checkpoint.strip()]
    if form.device:
        argv += ["--device", form.device]
    return argv + ["--dtype", form.dtype]


def _guidance_argv(value) -> list[str]:
    text = "" if value is None else str(value).strip()
    if not text:
        return []  # the pipeline's own default
    try:
        return ["--guidance-scale", repr(float(text))]
    except ValueError:
        raise ConfigError(f"the guidance scale is a number, or empty for the pipeline's own; "
                          f"got {text!r}") from None


def _size_argv(form: AppForm) -> list[str]:
    argv = []
    for name in ("height", "width"):
        value = getattr(form, name)
        if value not in (None, 0):
            argv += [f"--{name}", str(int(value))]
    return argv


def generate_argv(form: AppForm, id_images: list[str], out: str) -> list[str]:
    """The arguments of ``beyondfacial generate`` that make the form's run into ``out``."""
    if len(id_images) > MAX_PHOTOS:
        raise ConfigError(f"{len(id_images)} reference photos were given; the app takes 1 to "
                          f"{MAX_PHOTOS} of the one person")
    argv = ["--backend", form.backend, *_model_argv(form), "--prompt", form.prompt]
    if form.negative_prompt.strip():
        argv += ["--negative-prompt", form.negative_prompt]
    if form.id_prompt.strip():
        argv += ["--id-prompt", form.id_prompt]
    for image in id_images:
        argv += ["--id-image", str(image)]
    for seed in parse_seeds(form.seeds):
        argv += ["--seed", str(seed)]
    argv += ["--steps", _value_text("steps", form.steps), *_guidance_argv(form.guidance_scale)]
    return argv + _size_argv(form) + config_argv(form) + ["--out", str(out), "--name", STEM]


def parse_generate(argv: list[str]) -> argparse.Namespace:
    """``argv`` read by the CLI's own ``generate`` parser; its complaint is a ConfigError."""
    from bf_core.cli import build_parser

    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            return build_parser().parse_args(["generate", *argv])
    except SystemExit:
        lines = complaint.getvalue().strip().splitlines() or ["the settings were refused"]
        raise ConfigError(lines[-1].removeprefix("beyondfacial generate: error: ")) from None


def config_from_form(form: AppForm) -> BFConfig:
    """The ``BFConfig`` of the form: exactly what its ``generate`` command would use."""
    from bf_core.cli import config_from_args

    return config_from_args(parse_generate(generate_argv(form, [], "outputs")))


def command_line(argv: list[str]) -> str:
    """The shell command that runs ``generate`` with ``argv``."""
    return shlex.join(["beyondfacial", "generate", *argv])
