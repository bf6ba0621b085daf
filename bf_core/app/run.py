"""One run of the web app: the pipeline (loaded once, then reused), the BeyondFacial call
and its baseline with the same seed and settings, the files ``generate`` writes, the
decision-map animation, and the command that reproduces it all.

No gradio here: progress goes to a plain ``report(fraction, text)`` callable.
"""

from __future__ import annotations

import re
import shutil
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bf_core.app.form import STEM, AppForm, command_line, generate_argv, parse_generate
from bf_core.errors import ConfigError

Report = Callable[[float, str], None]
#: Library packages whose warnings a run shows on the page (not its dependencies' notices).
_OWN_PACKAGES = ("bf_core", "bf_backends")
_GIF_CELL = 192
_GIF_FRAME_MS = 300
#: room above each frame for its label, below the gallery's own caption
_GIF_LABEL = 30


def load_setup(args):
    """The pipeline of ``generate`` for ``args``: the tiny one or the backend's from files."""
    from bf_core import cli

    try:
        return cli._pipeline_for(args, cli.backend_extras(args.backend))
    except SystemExit as exc:  # the CLI's one-line refusals, as the library's error kind
        raise ConfigError(str(exc).removeprefix("error: ")) from None


class PipelineCache:
    """Pipelines by what they are loaded from (backend, base model, checkpoint, device,
    dtype; the tiny one by backend and base-model family), loaded once and reused; beyond
    ``size`` the least recently used one goes."""

    def __init__(self, size: int = 2, load: Callable[[Any], Any] = load_setup):
        self.size, self._load = size, load
        self._setups: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(args) -> tuple:
        if args.tiny:  # built on the CPU in float32 whatever the device and dtype say
            return (args.backend, getattr(args, "host", None), None, None, None, None)
        return (args.backend, None, args.base_model, args.checkpoint, args.device, args.dtype)

    def get(self, args):
        key = self.key(args)
        with self._lock:
            if key not in self._setups:
                self._setups[key] = self._load(args)
                while len(self._setups) > self.size:
                    self._setups.popitem(last=False)
            self._setups.move_to_end(key)
            return self._setups[key]


@dataclass
class RunOutput:
    """What the page shows: per seed (path, caption) pairs, the settings file, the command."""

    folder: Path
    method: list[tuple[str, str]] = field(default_factory=list)
    baseline: list[tuple[str, str]] = field(default_factory=list)
    strips: list[tuple[str, str]] = field(default_factory=list)
    animations: list[tuple[str, str]] = field(default_factory=list)
    settings: Path | None = None
    command: str = ""
    notes: list[str] = field(default_factory=list)


def new_run_folder(root: Path) -> Path:
    """``root/run-0001``, ``run-0002``, ...: the next free one, made."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"run-(\d+)", p.name))]
    number = max(taken, default=0) + 1
    while True:
        folder = root / f"run-{number:04d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def shown_path(path: Path) -> str:
    """``path`` as the command names it: relative to the folder the app was started in
    when it lies inside it (run the command from there), else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def keep_photos(photos: list[str], folder: Path) -> list[str]:
    """Copies of the uploaded photos beside the results, so the command and the settings
    name files that stay (the upload's own copy is the server's temporary file)."""
    kept = []
    for index, photo in enumerate(photos):
        source = Path(photo)
        target = folder / f"reference_{index}{source.suffix.lower() or '.png'}"
        shutil.copyfile(source, target)
        kept.append(shown_path(target))
    return kept


def threshold_notes(config, steps: int) -> list[str]:
    """What M1 and M2 come to at this step count; M2 before M1 is allowed, and said."""
    if not config.enabled:
        return ["The method is off: both pictures are the backend's own algorithm."]
    m1, m2 = config.thresholds(steps)
    notes = [f"M1 = step {m1} (the ID line and IdAF run at steps i > {m1}); M2 = step {m2} "
             f"(IdAP at steps i > {m2}), of {steps}."]
    if m2 < m1:
        notes.append(f"M2 ({m2}) is before M1 ({m1}): IdAP extends the scene prompt before the "
                     "ID line starts. The library allows it; the paper uses M1 < M2.")
    return notes


class StepCounter:
    """``callback_on_step_end`` of every call of a run, feeding one progress report."""

    def __init__(self, report: Report, total: int):
        self.report, self.total, self.done = report, max(total, 1), 0

    def callback(self, label: str, steps: int):
        def on_step_end(pipe, step, timestep, tensors):
            self.done += 1
            self.report(self.done / self.total, f"{label}: step {step + 1} of {steps}")
            return tensors

        return on_step_end


def decision_animation(result, sample: int, path: Path) -> Path:
    """The decision map of each fused step as one GIF frame: which line won where."""
    import numpy as np
    from PIL import Image, ImageDraw

    from bf_core.visualize import fusion_map_image

    lines = np.asarray(result.fusion_lines.cpu())
    frames = []
    for k, step in enumerate(result.fusion_steps):
        cell = fusion_map_image(lines[k, sample, 0], cell=_GIF_CELL)
        frame = Image.new("RGB", (cell.width, cell.height + _GIF_LABEL), (0, 0, 0))
        frame.paste(cell, (0, _GIF_LABEL))
        share = (lines[k, sample] > 0).mean()
        ImageDraw.Draw(frame).text((4, _GIF_LABEL - 14), f"step {step}: {share:.0%} ID",
                                   fill=(255, 255, 255))
        frames.append(frame)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=_GIF_FRAME_MS, loop=0)
    return path


def _own_warnings(caught, tiny: bool) -> list[str]:
    from bf_core.faces import MultipleFacesWarning

    notes = []
    for item in caught:
        # A random-weight detector "finds" dozens of faces in any photo (as in the demo).
        if tiny and issubclass(item.category, MultipleFacesWarning):
            continue
        own = any(package in Path(item.filename).parts for package in _OWN_PACKAGES)
        text = " ".join(str(item.message).split())
        if own and issubclass(item.category, UserWarning) and text not in notes:
            notes.append(text)
    return notes


def _one_seed(bf, config, call_kwargs, seed: int, counter: StepCounter, steps: int,
              output: RunOutput) -> list[Path]:
    """The method's call and its baseline for one seed; the method's files as ``generate``
    writes them (the baseline and the animation are the app's own additions)."""
    import torch

    from bf_core import cli

    result = bf(**call_kwargs, generator=torch.Generator(device="cpu").manual_seed(seed),
                return_fusion_maps=config.enabled, output_type="pil",
                callback_on_step_end=counter.callback(f"seed {seed}, BeyondFacial", steps))
    written = cli.save_result(result, output.folder, STEM, seed)
    baseline = bf.with_config(enabled=False)(
        **call_kwargs, generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="pil", callback_on_step_end=counter.callback(f"seed {seed}, baseline", steps))
    for index, image in enumerate(baseline.images):
        path = output.folder / f"{STEM}_seed{seed}_{index}_baseline.png"
        cli._save_image(image, path)
        output.baseline.append((str(path), f"seed {seed}"))
    output.method += [(str(p), f"seed {seed}") for p in written if not p.stem.endswith("_fusion")]
    output.strips += [(str(p), f"seed {seed}") for p in written if p.stem.endswith("_fusion")]
    if result.fusion_maps is not None:
        for index in range(len(result.images)):
            gif = decision_animation(result, index, output.folder / f"{STEM}_seed{seed}_{index}"
                                                                    "_steps.gif")
            output.animations.append((str(gif), f"seed {seed}"))
    return written


def run(form: AppForm, photos: list[str], root: Path, cache: PipelineCache,
        report: Report = lambda fraction, text: None) -> RunOutput:
    """One run of the form, into a new folder under ``root``; a refused or failed run
    leaves no folder behind."""
    output = RunOutput(new_run_folder(root))
    try:
        _generate(output, form, photos, cache, report)
    except BaseException:
        shutil.rmtree(output.folder, ignore_errors=True)
        raise
    return output


def _generate(output: RunOutput, form: AppForm, photos: list[str], cache: PipelineCache,
              report: Report) -> None:
    import bf_core
    from bf_core import cli

    argv = generate_argv(form, keep_photos(photos, output.folder),
                         shown_path(output.folder / "cli"))
    args = parse_generate(argv)
    config = cli.config_from_args(args)
    output.command = command_line(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output.notes += threshold_notes(config, args.steps)
        report(0.0, "loading the pipeline")
        setup = cache.get(args)
        bf = bf_core.wrap(setup.pipe, backend=args.backend, config=config)
        call_kwargs = cli.generate_call_kwargs(args, setup)
        counter = StepCounter(report, 2 * args.steps * len(args.seed))
        written = []
        for seed in args.seed:
            written += _one_seed(bf, config, call_kwargs, seed, counter, args.steps, output)
    output.notes += _own_warnings(caught, args.tiny)
    output.settings = output.folder / f"{STEM}_settings.json"
    cli._write_json(cli.settings_record(bf, config, call_kwargs, args.seed, written),
                    output.settings)
