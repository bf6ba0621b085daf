"""The DreamBooth backend: a plain SDXL pipeline whose identity lives in a prompt trigger.

ID line: ``id_prompt`` (for example "a photo of sks person") with the pipeline's LoRA
adapters active, as the user set them. Semantic line: the scene prompt with every PEFT
adapter switched off in the UNet and both text encoders (``BFConfig.semantic_adapters``
"on" keeps them). T_id: the ID line's prompt embeddings (77 tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from bf_core.config import BFConfig
from bf_core.hosts import sdxl
from bf_core.hosts.sdxl import RowBatch, SDXLModel
from bf_core.records import Identity, Line, LineConditioning
from bf_core.switching import AdapterSwitch, row_mask


class DreamBoothSession(sdxl.SDXLSession):
    """Per-call state: which adapters each line sees."""

    def open(self, restore: ExitStack) -> None:
        # Found once per call, reused at every step.
        self.unet_adapters = AdapterSwitch([self.pipe.unet])
        restore.callback(self.unet_adapters.close)
        self.text_adapters = AdapterSwitch([self.pipe.text_encoder, self.pipe.text_encoder_2])

    @property
    def _semantic_off(self) -> bool:
        return self.config.semantic_adapters == "off"

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        if line is Line.SEMANTIC and self._semantic_off:
            with self.text_adapters.disabled():  # the scene prompt through the base encoders
                return super().conditioning(line, identity)
        return super().conditioning(line, identity)

    @contextmanager
    def line_state(self, line: Line) -> Iterator[None]:
        """The UNet's adapters for a one-line batch: off for the semantic line."""
        if line is Line.SEMANTIC and self._semantic_off:
            with self.unet_adapters.disabled():
                yield
        else:
            yield

    @contextmanager
    def rows_state(self, batch: RowBatch) -> Iterator[None]:
        """A merged batch: the adapters on for the ID (and baseline) rows only."""
        if not self._semantic_off:
            yield  # every row runs the same model
            return
        with self.unet_adapters.rows(row_mask(batch, (Line.ID, Line.BASELINE))):
            yield

    def negative_shareable(self) -> bool:
        # With adapters on for both lines, the two lines run the very same model.
        return not self._semantic_off

    def supports_row_batching(self, batch: RowBatch) -> bool:
        return not self._semantic_off or self.unet_adapters.row_maskable

    def predict(self, batch: RowBatch, model: SDXLModel) -> torch.Tensor:
        state = self.rows_state(batch) if batch.parts else self.line_state(batch.line)
        with state:
            return model(batch)


class DreamBoothBackend:
    """Identity from a DreamBooth/character LoRA or a textual-inversion token."""

    name = "dreambooth"
    recognizes_description = (
        "any diffusers StableDiffusionXLPipeline without an IP-Adapter; the identity is a "
        "prompt trigger (id_prompt) of a LoRA or textual inversion you loaded")
    priority = 0  # the fallback: method-specific backends recognise richer pipelines first
    default_id_prompt = "a photo of sks person"
    hosts = (sdxl.HOST_NAME,)
    options = sdxl.ID_LINE_OPTIONS
    #: people are told apart by their id_prompt; the LoRA rows switch per line kind, so any
    #: number of ID lines shares one merged call
    max_people = 4

    def recognizes(self, pipe: Any) -> bool:
        return sdxl.is_sdxl_pipeline(pipe) and not sdxl.has_ip_adapter(pipe)

    def open_session(self, call: sdxl.SDXLCall, config: BFConfig) -> DreamBoothSession:
        return DreamBoothSession(self, call, config)


def benchmark_call_kwargs(identity: Any, images: list) -> dict[str, Any]:
    """The identity lives in the LoRA and its trigger prompt; the photos only feed the metrics."""
    id_prompt = identity.option(DreamBoothBackend.name, "id_prompt", identity.id_prompt)
    return {"id_prompt": id_prompt or DreamBoothBackend.default_id_prompt}
