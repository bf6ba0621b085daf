"""The DreamBooth backend: a plain SDXL pipeline whose identity lives in a prompt trigger.

ID line: ``id_prompt`` (for example "a photo of sks person") with the pipeline's LoRA
adapters active, as the user set them. Semantic line: the scene prompt with every PEFT
adapter switched off in the UNet and both text encoders (``BFConfig.semantic_adapters``
"on" keeps them). T_id: the ID line's prompt embeddings (77 tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bf_core.protocols import GenerationRequest, Line, RowBatch
from bf_core.rowbatch import row_mask
from bf_core.sdxl import SDXLSession, has_ip_adapter, is_sdxl_pipeline
from bf_core.switching import AdapterSwitch


class DreamBoothSession(SDXLSession):
    """Per-call state: which adapters each line sees."""

    def setup(self) -> None:
        # Found once per call, reused at every step.
        self.unet_adapters = AdapterSwitch([self.pipe.unet])
        self.restore_stack.callback(self.unet_adapters.close)
        self.text_adapters = AdapterSwitch([self.pipe.text_encoder, self.pipe.text_encoder_2])

    @property
    def _semantic_off(self) -> bool:
        return self.config.semantic_adapters == "off"

    @contextmanager
    def text_state(self, line: Line) -> Iterator[None]:
        if line is Line.SEMANTIC and self._semantic_off:
            with self.text_adapters.disabled():
                yield
        else:
            yield

    @contextmanager
    def line_state(self, line: Line) -> Iterator[None]:
        if line is Line.SEMANTIC and self._semantic_off:
            with self.unet_adapters.disabled():
                yield
        else:
            yield

    def negative_shareable(self) -> bool:
        # With adapters on for both lines, the two lines run the very same model.
        return not self._semantic_off

    def supports_row_batching(self, batches: Sequence[RowBatch]) -> bool:
        return not self._semantic_off or self.unet_adapters.row_maskable

    @contextmanager
    def row_state(self, batch: RowBatch) -> Iterator[None]:
        if not self._semantic_off:
            yield  # every row runs the same model
            return
        with self.unet_adapters.rows(row_mask(batch, (Line.ID, Line.BASELINE))):
            yield


class DreamBoothBackend:
    """Identity from a DreamBooth/character LoRA or a textual-inversion token."""

    name = "dreambooth"
    recognizes_description = (
        "any diffusers StableDiffusionXLPipeline without an IP-Adapter; the identity is a "
        "prompt trigger (id_prompt) of a LoRA or textual inversion you loaded")
    priority = 0  # the fallback: method-specific backends recognise richer pipelines first
    default_id_prompt = "a photo of sks person"

    def recognizes(self, pipe: Any) -> bool:
        return is_sdxl_pipeline(pipe) and not has_ip_adapter(pipe)

    def open_session(self, pipe: Any, request: GenerationRequest, config: Any) -> DreamBoothSession:
        return DreamBoothSession(self, pipe, request, config)

    def demo_setup(self, seed: int = 0) -> tuple[Any, dict[str, Any]]:
        """A tiny offline pipeline with a random identity LoRA, and its call keywords."""
        from bf_core.testing.tiny import add_tiny_lora, tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(seed=seed)
        add_tiny_lora(pipe, adapter_name="identity", seed=seed)
        return pipe, {"prompt": "a person is kneeling by a small lake, touching the water",
                      "id_prompt": self.default_id_prompt}

    def from_pretrained(self, base_model: str, checkpoint: str | None = None, **kwargs: Any):
        """Build the pipeline from a base SDXL model and an optional identity LoRA file."""
        from bf_backends.dreambooth.loader import load_dreambooth_pipeline

        return load_dreambooth_pipeline(base_model, checkpoint, **kwargs)
