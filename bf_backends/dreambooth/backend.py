"""The DreamBooth backend: a plain SDXL pipeline whose identity lives in a prompt trigger.

ID line: ``id_prompt`` (for example "a photo of sks person") with the pipeline's LoRA
adapters active, as the user set them; with several people, the option ``person_adapters``
keeps only each person's own adapters on in their line (``state``). Semantic line: the scene prompt with every PEFT
adapter switched off in the UNet and both text encoders (``BFConfig.semantic_adapters``
"on" keeps them). T_id: the ID line's prompt embeddings (77 tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from bf_core.config import BFConfig
from bf_core.errors import ConfigError
from bf_core.hosts import flux, sdxl
from bf_core.hosts.sdxl import RowBatch, SDXLModel
from bf_core.records import Identity, Line, LineConditioning
from bf_core.switching import AdapterSwitch, row_mask

from . import state
from .encoder import PersonPromptEncoder


class DreamBoothLines:
    """Per-call state: which adapters each line sees. Host-agnostic: mixed into the SDXL
    and FLUX base sessions, it switches the adapters of the denoiser (the UNet or the
    transformer) and of both text encoders."""

    def open(self, restore: ExitStack) -> None:
        # Found once per call, reused at every step.
        pipe = self.pipe
        self.unet_adapters = AdapterSwitch([self.denoiser])
        restore.callback(self.unet_adapters.close)
        self.text_adapters = AdapterSwitch([pipe.text_encoder, pipe.text_encoder_2])
        restore.callback(self.text_adapters.close)
        entries = state.parse_person_adapters(self.request.backend_options.get(state.OPTION))
        self.person_adapters: list[state.PersonAdapters] | None = None
        if entries is not None:
            entries, self.active_adapters = state.check_person_adapters(
                entries, [self.denoiser, pipe.text_encoder, pipe.text_encoder_2])
            if not (self.unet_adapters.row_maskable and self.text_adapters.row_maskable):
                raise ConfigError(
                    f"{state.OPTION} switches each person's LoRA per row, which needs plain, "
                    "unfused LoRA layers; this pipeline has a fused or DoRA adapter. Call "
                    "pipe.unfuse_lora() first, or leave the option out")
            self.person_adapters = entries
            self.encoder = PersonPromptEncoder(self)
            self._row_masks: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def _semantic_off(self) -> bool:
        return self.config.semantic_adapters == "off"

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        if line is Line.ID:
            return self.person_text(identity.id_prompt, identity.state.get("adapters"))
        self._check_one_entry_per_person()  # asked after every person was encoded
        if line is Line.SEMANTIC and self._semantic_off:
            with self.text_adapters.disabled():  # the scene prompt through the base encoders
                return super().conditioning(line, identity)
        return super().conditioning(line, identity)

    def person_text(self, id_prompt: str, adapters: state.PersonAdapters) -> LineConditioning:
        """A person's ID-line text, with only their adapters on in the text encoders."""
        if adapters is None or not self.text_adapters.all_layers:
            return self.id_text(id_prompt)
        with self.text_adapters.rows(state.text_encoder_switches(adapters, self.active_adapters)):
            return self.id_text(id_prompt, variant=adapters)

    def _check_one_entry_per_person(self) -> None:
        if self.person_adapters is not None and self.encoder.encoded != len(self.person_adapters):
            raise ConfigError(f"{state.OPTION} has {len(self.person_adapters)} entries but the "
                              f"call has {self.encoder.encoded} "
                              f"{'person' if self.encoder.encoded == 1 else 'people'}; give one "
                              "entry per person")

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

    def person_rows(self, batch: RowBatch):
        """Each person's rows with only their adapters on (``person_adapters``); the masks
        are made once per row layout, so a step builds no tensor."""
        key = (state.row_layout(batch), str(batch.sample.device))
        masks = self._row_masks.get(key)
        if masks is None:
            masks = self._row_masks[key] = state.person_row_masks(
                key[0], self.person_adapters, self.active_adapters, not self._semantic_off,
                batch.sample.device)
        return self.unet_adapters.rows(masks)

    def negative_shareable(self) -> bool:
        # With adapters on for both lines, the two lines run the very same model, unless a
        # person keeps only some of them.
        return not self._semantic_off and all(entry is None for entry in self.person_adapters or ())

    def supports_row_batching(self, batch: RowBatch) -> bool:
        return not self._semantic_off or self.unet_adapters.row_maskable

    def predict(self, batch: RowBatch, model: SDXLModel) -> torch.Tensor:
        if self.person_adapters is not None and (batch.parts or batch.line is Line.ID):
            state_now = self.person_rows(batch)
        elif batch.parts:
            state_now = self.rows_state(batch)
        else:
            state_now = self.line_state(batch.line)
        with state_now:
            return model(batch)


class DreamBoothSession(DreamBoothLines, sdxl.SDXLSession):
    """DreamBooth on SDXL: the adapters of the UNet."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet


class DreamBoothFluxSession(DreamBoothLines, flux.FluxSession):
    """DreamBooth on FLUX.1 (a character LoRA of the transformer): the same lines, with the
    transformer's adapters switched per row."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer


class DreamBoothBackend:
    """Identity from a DreamBooth/character LoRA or a textual-inversion token."""

    name = "dreambooth"
    recognizes_description = (
        "any diffusers StableDiffusionXLPipeline or FluxPipeline without an IP-Adapter; the "
        "identity is a prompt trigger (id_prompt) of a LoRA or textual inversion you loaded")
    priority = 0  # the fallback: method-specific backends recognise richer pipelines first
    default_id_prompt = "a photo of sks person"
    hosts = (sdxl.HOST_NAME, flux.HOST_NAME)
    options = {**sdxl.ID_LINE_OPTIONS,
               state.OPTION: "several people, each on their own LoRA: one entry per person, the "
                             "adapter name(s) their ID line keeps on (None: every active one)"}
    #: people are told apart by their id_prompt, each on the same LoRA or their own
    #: (person_adapters); the LoRA rows switch per row, so any number of ID lines shares
    #: one merged call
    max_people = 4

    def refine_prompt(self, prompt: str, id_prompt: str) -> str:
        """The face-refine pass's prompt: the identity is a trigger, so ``P_id`` leads."""
        return f"{id_prompt}, {prompt}"

    def recognizes(self, pipe: Any) -> bool:
        if flux.is_flux_pipeline(pipe):
            return not flux.has_identity_machinery(pipe)
        return sdxl.is_sdxl_pipeline(pipe) and not sdxl.has_ip_adapter(pipe)

    def open_session(self, call: Any, config: BFConfig) -> DreamBoothLines:
        if isinstance(call, flux.FluxCall):
            return DreamBoothFluxSession(self, call, config)
        return DreamBoothSession(self, call, config)


def benchmark_call_kwargs(identity: Any, images: list) -> dict[str, Any]:
    """The identity lives in the LoRA and its trigger prompt; the photos only feed the metrics."""
    id_prompt = identity.option(DreamBoothBackend.name, "id_prompt", identity.id_prompt)
    return {"id_prompt": id_prompt or DreamBoothBackend.default_id_prompt}
