"""Other libraries' notices kept out of the command line's output, while a command runs only.

The ``beyondfacial`` commands (``generate``, ``demo``, ``bench``, every other one) print the
project's own messages and progress. A few notices of the libraries underneath appear in
our runs every time and tell the user nothing to act on; ``quiet_third_party()`` drops
exactly those while a command runs and puts everything back when it returns. A program that
imports ``bf_core`` sees every message, ``beyondfacial --verbose`` shows them all, and a
notice not listed here still shows: it may be about the user's own files.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: Log messages that are noise in our runs (regular expressions, matched at the start).
NOISE_MESSAGES = (
    # transformers 5 without torchvision: the PIL image processors serve, as they always did
    r"`\w+` requires torchvision \(not installed\); falling back to `\w+`",
    # diffusers: a LoRA with no text-encoder layers (PhotoMaker's, the tiny identity LoRAs)
    r"No LoRA keys associated to \w+ found with the prefix",
    # diffusers: `.to(dtype)` on a model that keeps no module in float32 at all
    r"There are modules in \w+ that should be kept in float32: \[\]",
    # diffusers: InstantID's IP-Adapter and the precomputed-embedding set-ups need no image
    # encoder, by design
    r"image_encoder is not loaded since `image_encoder_folder=None` passed",
)
#: The loggers those messages come from: a logger's filters see its own records only, so
#: the filter goes on each (created here if the library is not imported yet; the library
#: then gets the same logger) and on the handlers the libraries' root loggers already have.
NOISY_LOGGERS = (
    "transformers",
    "transformers.utils.import_utils",
    "diffusers",
    "diffusers.loaders.lora_base",
    "diffusers.loaders.lora_pipeline",
    "diffusers.loaders.peft",
    "diffusers.loaders.ip_adapter",
    "diffusers.models.modeling_utils",
)
_LIBRARY_ROOTS = ("transformers", "diffusers")
#: Python warnings that are noise in our runs: (category, module, message), as regular
#: expressions matched at the start, like ``warnings.filterwarnings`` takes them.
NOISE_WARNINGS = (
    # peft: a second adapter on one model, which our tiny pipelines and per-person LoRAs add
    # on purpose
    (UserWarning, r"peft\.", r"Already found a `peft_config` attribute"),
    # scikit-image deprecations inside insightface's face alignment
    (FutureWarning, r"insightface", r""),
)


class NoiseFilter(logging.Filter):
    """Drops the log records whose message starts like one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...] = NOISE_MESSAGES):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the library's to report, not ours to hide
            return True
        return self.pattern.match(message) is None


@contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[None]:
    """While the block runs, drop the listed notices of other libraries; afterwards every
    filter is gone again. ``enabled=False`` (``--verbose``) changes nothing."""
    if not enabled:
        yield
        return
    noise = NoiseFilter()
    targets: list[logging.Logger | logging.Handler] = [logging.getLogger(n) for n in NOISY_LOGGERS]
    targets += [handler for root in _LIBRARY_ROOTS for handler in logging.getLogger(root).handlers]
    with warnings.catch_warnings():  # restores the warning filters when the command returns
        for category, module, message in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for target in targets:
            target.addFilter(noise)
        try:
            yield
        finally:
            for target in targets:
                target.removeFilter(noise)
