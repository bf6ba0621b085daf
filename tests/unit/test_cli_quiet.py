"""The command line prints the project's own messages and progress: other libraries' known
noise is dropped while a command runs, only then, and never under ``--verbose``; an error is
one line and a hint, its traceback only under ``--verbose``."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from bf_core import cli, quiet
from bf_core.errors import ConfigError

# What the libraries print, word for word (transformers 5, diffusers 0.42, peft 0.17+).
NOISE = [
    ("transformers.utils.import_utils",
     "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
     "`CLIPImageProcessorPil` for backward compatibility."),
    ("diffusers.loaders.lora_base",
     "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is "
     "safe to ignore if LoRA state dict didn't originally have any CLIPTextModel related params."),
    ("diffusers.models.modeling_utils",
     "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting "
     "directly with `to()` can lead to inconsistent results."),
    ("diffusers.loaders.ip_adapter",
     "image_encoder is not loaded since `image_encoder_folder=None` passed. You will not be able "
     "to use `ip_adapter_image` when calling the pipeline with IP-Adapter."),
]
# Messages of the same libraries that may concern the user's files: they always show.
KEPT = [
    ("diffusers.models.modeling_utils",
     "There are modules in UNet2DConditionModel that should be kept in float32: ['norm_out']."),
    ("transformers.modeling_utils",
     "Some weights of CLIPVisionModelWithProjection were not initialized from the checkpoint."),
]
PEFT_NOISE = "Already found a `peft_config` attribute in the model. This will lead to multiple"
OURS = "BFConfig.idap_start=0.3 gives step 1 of a 2-step schedule"


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def collected():
    """A handler on each emitting logger (it sees what passed that logger's filters), with
    the loggers at WARNING whatever a test set-up chose for the libraries."""
    handler = Collect()
    loggers = {logging.getLogger(name) for name, _ in NOISE + KEPT}
    levels = {logger: logger.level for logger in loggers}
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.addHandler(handler)
    yield handler
    for logger, level in levels.items():
        logger.setLevel(level)
        logger.removeHandler(handler)


def emit_everything(args=None) -> int:
    for name, message in NOISE + KEPT:
        logging.getLogger(name).warning(message)
    warnings.warn_explicit(PEFT_NOISE, UserWarning, "tuners_utils.py", 1,
                           module="peft.tuners.tuners_utils")
    warnings.warn_explicit(OURS, UserWarning, "loop.py", 1, module="bf_core.loop")
    return 0


def run_main(monkeypatch, *argv: str) -> tuple[int, list[str]]:
    monkeypatch.setattr(cli, "cmd_env", emit_everything)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main([*argv, "env"])
    return code, [str(w.message) for w in caught]


def noise_filters() -> list:
    loggers = [logging.getLogger(name) for name in quiet.NOISY_LOGGERS]
    return [f for logger in loggers for f in logger.filters if isinstance(f, quiet.NoiseFilter)]


def test_known_noise_is_dropped_while_a_command_runs_and_only_then(monkeypatch, collected):
    filters_before = list(warnings.filters)
    code, shown_warnings = run_main(monkeypatch)
    assert code == 0
    assert collected.messages == [message for _, message in KEPT]
    assert shown_warnings == [OURS]
    # Afterwards a program using the library sees everything again.
    assert noise_filters() == [] and warnings.filters == filters_before
    collected.messages.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emit_everything()
    assert collected.messages == [message for _, message in NOISE + KEPT]
    assert [str(w.message) for w in caught] == [PEFT_NOISE, OURS]


def test_verbose_shows_every_message(monkeypatch, collected):
    code, shown_warnings = run_main(monkeypatch, "--verbose")
    assert code == 0
    assert collected.messages == [message for _, message in NOISE + KEPT]
    assert shown_warnings == [PEFT_NOISE, OURS]


def test_the_filters_go_away_when_a_command_fails(monkeypatch, capsys):
    def fail(args):
        assert noise_filters()  # installed while the command runs
        raise ConfigError("bad\n  setting")

    monkeypatch.setattr(cli, "cmd_env", fail)
    assert cli.main(["env"]) == 2
    assert noise_filters() == []


def test_importing_bf_core_or_running_a_command_changes_nothing_for_the_library_user():
    code = ("import logging, os, warnings\n"
            "before = list(warnings.filters)\n"
            "import bf_core, bf_core.cli, bf_core.quiet\n"
            "assert list(warnings.filters) == before\n"
            "names = bf_core.quiet.NOISY_LOGGERS\n"
            "assert not any(logging.getLogger(n).filters for n in names)\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    bf_core.cli.main(['env'])\n"
            "assert list(warnings.filters) == before\n"
            "assert not any(logging.getLogger(n).filters for n in names)\n"
            "print(os.environ.get('DIFFUSERS_VERBOSITY'), os.environ.get('TRANSFORMERS_VERBOSITY'))\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=True)
    assert result.stdout.split() == ["None", "None"]  # no library's verbosity was changed


# -- the real libraries, in the demo -----------------------------------------------------------
PROGRESS = re.compile(r"^beyondfacial demo: +\d+%\|")


def demo(backend: str, out, verbose: bool) -> tuple[list[str], list[str]]:
    """The demo in a fresh process, without a test set-up's verbosity: its stdout lines and
    its stderr lines other than the progress bar."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    argv = [sys.executable, "-m", "bf_core.cli", *(["--verbose"] if verbose else []), "demo",
            "--backend", backend, "--steps", "4", "--size", "64", "--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = [line for line in re.split(r"[\r\n]", result.stderr)
              if line.strip() and not PROGRESS.match(line)]
    return result.stdout.splitlines(), stderr


@pytest.mark.parametrize("backend", ["instantid", "photomaker"])
def test_the_demo_prints_only_its_own_lines_and_its_progress(backend, tmp_path):
    stdout, stderr = demo(backend, tmp_path, verbose=False)
    assert stderr == []
    assert stdout[0].startswith(f"beyondfacial demo ({backend}): a TINY SDXL pipeline")
    assert stdout[1] == "wrote:" and stdout[-1] == cli.REAL_WEIGHTS_HINT
    assert all(line.startswith(f"  {tmp_path}") for line in stdout[2:-1])


def test_verbose_shows_the_libraries_notices_in_the_demo(tmp_path):
    _, stderr = demo("instantid", tmp_path, verbose=True)
    noise = quiet.NoiseFilter()
    dropped = [line for line in stderr
               if not noise.filter(logging.LogRecord("x", logging.WARNING, "", 0, line, (), None))]
    assert dropped  # the notices the quiet demo leaves out are real, and these patterns match


# -- errors ------------------------------------------------------------------------------------
def test_an_error_of_ours_is_one_line_and_the_hint_exit_status_2(monkeypatch, capsys):
    def fail(args):
        raise ConfigError("lambda_id must be in (0, 1e4];\n  the paper uses 5")

    monkeypatch.setattr(cli, "cmd_env", fail)
    assert cli.main(["env"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: lambda_id must be in (0, 1e4]; the paper uses 5", f"({cli.VERBOSE_HINT})"]
    with pytest.raises(ConfigError, match="lambda_id"):
        cli.main(["env", "--verbose"])  # --verbose anywhere: the exception, so its traceback


def test_a_real_error_shows_no_traceback_unless_verbose(tmp_path):
    argv = [sys.executable, "-m", "bf_core.cli", "generate", "--tiny", "--backend", "nope",
            "--prompt", "x", "--out", str(tmp_path)]
    quiet_run = subprocess.run(argv, capture_output=True, text=True)
    assert quiet_run.returncode == 2
    assert quiet_run.stderr.splitlines() == [
        quiet_run.stderr.splitlines()[0], f"({cli.VERBOSE_HINT})"]
    assert quiet_run.stderr.startswith("error: no backend named 'nope'; installed: ")
    verbose_run = subprocess.run([*argv, "--verbose"], capture_output=True, text=True)
    assert verbose_run.returncode == 1
    assert "Traceback (most recent call last)" in verbose_run.stderr
    assert "BackendNotFoundError: no backend named 'nope'" in verbose_run.stderr
