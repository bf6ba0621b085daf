"""Finding NaN and infinity in each line's prediction early, without waiting on the device.

A NaN in the ID line's prediction, even one element, makes every IdAF comparison false:
the semantic line then wins everywhere and a finite image without the identity comes
out. So every line's guided prediction is checked at every step, on the device: a small
tensor keeps, per line, the first step whose prediction was not finite. Reading it on the
host would make the CPU wait for the device at every step, so it is copied out
asynchronously every few steps (into pinned memory, with an event on CUDA) and read once
the copy has landed: a fault is reported a few steps after it happened, never at the
cost of a sync. On the CPU the copy is immediate and a fault is reported at its step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bf_core.errors import NonFiniteError

#: steps between two asynchronous copies of the flags to the host (on an accelerator)
CHECK_EVERY = 4


def likely_cause(line: str, dtype: torch.dtype, device: torch.device) -> str:
    """Advice for a non-finite prediction of ``line``, from the model's dtype and device."""
    machinery = (" The ID line's identity machinery produced it (the semantic line stayed "
                 "finite): check the method's checkpoint and that its encoders run in a dtype "
                 "they were trained in." if line.startswith("ID") else "")
    if dtype == torch.float16:
        advice = ("In float16 this is usually an overflow: run the UNet in float32 or bfloat16 "
                  "(bfloat16 needs an Ampere or newer GPU), or lower guidance_scale.")
    elif dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        advice = "This GPU does not support bfloat16: load the pipeline in float16 instead."
    else:
        advice = ("Check the checkpoints (a corrupt or mismatched file gives NaN weights) and "
                  "the settings (an extreme guidance_scale).")
    return advice + machinery


class FiniteWatch:
    """Per line, the first step at which its guided prediction held NaN or infinity.

    line_names: how each line is named in the error, in loop order (semantic first).
    """

    def __init__(self, line_names: Sequence[str], every: int = CHECK_EVERY):
        self.line_names = list(line_names)
        self.every = every
        self._first_bad: torch.Tensor | None = None  # (lines,) int64, -1 while finite
        self._host: torch.Tensor | None = None
        self._event = None
        self._dtype = torch.float32

    def observe(self, step: int, line: int, prediction: torch.Tensor) -> None:
        """Remember ``step`` for ``line`` if ``prediction`` is not all finite (device ops only)."""
        if self._first_bad is None:
            self._first_bad = torch.full((len(self.line_names),), -1, dtype=torch.long,
                                         device=prediction.device)
            self._dtype = prediction.dtype
        bad = ~torch.isfinite(prediction).all()
        current = self._first_bad[line]
        self._first_bad[line] = torch.where(bad & (current < 0), step, current)

    def check(self, step: int) -> None:
        """Raise for a fault seen in an earlier copy; start a new copy every few steps."""
        if self._first_bad is None:
            return
        if self._host is not None and (self._event is None or self._event.query()):
            self._raise_if_bad(self._host.numpy(), step)  # landed: reading it waits for nothing
            self._host = None
        if self._host is None and (self._first_bad.device.type == "cpu" or step % self.every == 0):
            self._copy_to_host()
            if self._event is None:  # on the CPU the copy is already there
                self._raise_if_bad(self._host.numpy(), step)
                self._host = None

    def _copy_to_host(self) -> None:
        flags = self._first_bad
        if flags.device.type == "cpu":
            self._host, self._event = flags.clone(), None
            return
        self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        self._host.copy_(flags, non_blocking=True)
        self._event = torch.cuda.Event() if flags.device.type == "cuda" else None
        if self._event is not None:
            self._event.record()
        else:  # an accelerator without events: a plain copy, once every few steps
            self._host.copy_(flags)

    def finish(self, last_step: int, latents: torch.Tensor) -> None:
        """The last check, after the loop: every line's flag and the final latents, in one read."""
        latents_bad = ~torch.isfinite(latents).all().view(1)
        faults = latents_bad if self._first_bad is None else torch.cat(
            [self._first_bad >= 0, latents_bad.to(self._first_bad.device)])
        if not faults.any():  # the one read: after the loop, waiting is free
            return
        if self._first_bad is not None:
            self._raise_if_bad(self._first_bad.cpu().numpy(), last_step)
        if latents_bad.any():
            raise NonFiniteError(
                "the final latents hold NaN or infinity although every line's prediction was "
                "finite: the scheduler's step overflowed. "
                + likely_cause("latents", latents.dtype, latents.device))

    def _raise_if_bad(self, first_bad, seen_by: int) -> None:
        faults = [(int(step), name) for step, name in zip(first_bad, self.line_names, strict=True)
                  if step >= 0]
        if not faults:
            return
        step, name = min(faults)
        device = self._first_bad.device
        raise NonFiniteError(
            f"the {name}'s prediction holds NaN or infinity from step {step} on (found by "
            f"step {seen_by}), so the call was stopped. {likely_cause(name, self._dtype, device)}")


def check_decoded(image: torch.Tensor, vae_dtype: torch.dtype) -> None:
    """Raise when the decoded image holds NaN or infinity (a VAE overflow gives black images)."""
    if torch.isfinite(image).all():
        return
    fp16 = (" The SDXL VAE overflows in float16: keep vae.config.force_upcast=True (the default) "
            "or load an fp16-fixed VAE (for example madebyollin/sdxl-vae-fp16-fix)."
            if vae_dtype == torch.float16 else " Check the VAE's weights.")
    raise NonFiniteError("the VAE decoded NaN or infinity from finite latents, which would give a "
                         "black image." + fp16)
