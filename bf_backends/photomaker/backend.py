"""The PhotoMaker V1/V2 backend.

Lines (see docs/backends/photomaker.md):

- ID line: the trigger-word prompt ``P_id`` (default "a person img") with the class word
  repeated N x T times and fused with the ID tokens of the N reference images; PhotoMaker's
  LoRA on. Its negative branch is the negative prompt encoded as text (no identity).
- semantic line: the caller's prompt (trigger word, if any, removed as PhotoMaker's own
  text-only prompt does) with the PhotoMaker LoRA off; ``BFConfig.semantic_adapters="on"``
  keeps it on.
- baseline (``BFConfig(enabled=False)``): the official single-line algorithm: text-only
  conditioning for step indices ``0 .. start_merge_step``, the ID-fused prompt afterwards,
  the LoRA on throughout.

Row batching: where both lines run, the two lines' rows can share one UNet call; the
PhotoMaker LoRA is then switched per row (a row mask on its adapter only, so a style LoRA
stays on for every row). Where that switch is not exact (a fused LoRA, DoRA, or a LoRA
that is not a PEFT adapter) the lines run in separate calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from bf_backends.photomaker.encoder import (
    PhotoMakerIdentityEncoder,
    PhotoMakerParts,
    ReferenceInputs,
    as_prompt_list,
    fused_prompts,
    is_official_photomaker_pipeline,
    text_only_prompt,
)
from bf_backends.photomaker.loader import PhotoMakerState
from bf_backends.photomaker.prompt import DEFAULT_TRIGGER_WORD
from bf_core.config import BFConfig
from bf_core.errors import ConfigError
from bf_core.hosts.sdxl import (
    HOST_NAME,
    ID_LINE_OPTIONS,
    RowBatch,
    SDXLCall,
    SDXLModel,
    SDXLSession,
    encode_line_text,
    has_ip_adapter,
    is_sdxl_pipeline,
)
from bf_core.records import Identity, Line, LineConditioning
from bf_core.switching import AdapterSwitch, active_adapter_names, lora_layer_row_maskable, row_mask

#: The official pipelines' default: step indices 0..10 use the text-only prompt.
DEFAULT_START_MERGE_STEP = 10

#: Per-call keywords this backend understands (besides the pipeline's and the method's).
OPTIONS = {
    "start_merge_step": "baseline: last step index that uses the text-only prompt (default 10)",
    "id_embeds": "V2: precomputed raw insightface embeddings (N, 512), one per reference image",
    "face_analyzer": "V2: a bf_core.faces.FaceAnalyzer to use instead of the default",
    "face_model": "V2: insightface pack name or folder (default 'buffalo_l')",
    "face_root": "V2: folder holding the pack, or an insightface root with models/<pack>/",
    "face_providers": "V2: onnxruntime execution providers (default CUDA if available, CPU)",
    "face_policy": "V2: 'highest_score' (default, as upstream), 'largest' or 'error'",
    **ID_LINE_OPTIONS,
}


@contextmanager
def lora_adapter_off(unet: torch.nn.Module, adapter_name: str,
                     switch: AdapterSwitch | None = None) -> Iterator[None]:
    """Switch one PEFT adapter off in ``unet`` for the block, leaving others as they are.

    Layers where it is the only active adapter are switched off with the core's exact
    switch. Where another adapter (a style LoRA) shares the layer, the adapter's scale is
    set to 0 instead: the layer then adds exact zeros for it, and the other adapter keeps
    its contribution. Both are put back on exit. ``switch``: the session's
    ``AdapterSwitch([unet], [adapter_name])``, so the UNet is not walked at every step.
    """
    switch = switch or AdapterSwitch([unet], [adapter_name])
    shared = []
    for name, layer in switch.all_layers:
        active = active_adapter_names(layer)
        if adapter_name in active and len(active) > 1 and not layer._disable_adapters:
            if getattr(layer, "merged", False):
                raise ConfigError(
                    f"the PhotoMaker LoRA at {name} is fused into the base weights, so the "
                    "semantic line cannot switch it off; call pipe.unfuse_lora() before "
                    "wrapping, or use BFConfig(semantic_adapters='on')")
            shared.append(layer)
    saved = [(layer, layer.scaling[adapter_name]) for layer in shared]
    try:
        for layer in shared:
            layer.scaling[adapter_name] = 0.0
        with switch.disabled():
            yield
    finally:
        for layer, scale in saved:
            layer.scaling[adapter_name] = scale


def _start_merge_step(options: dict[str, Any]) -> int:
    value = options.get("start_merge_step", DEFAULT_START_MERGE_STEP)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"start_merge_step must be an int step index >= 0, got {value!r}; "
                          "the official default is 10 (of 50 steps)")
    return value


class PhotoMakerSession(SDXLSession):
    """One call's state: each line's conditioning and the PhotoMaker LoRA switch."""

    def __init__(self, backend: Any, call: SDXLCall, config: BFConfig):
        super().__init__(backend, call, config)
        self.parts = PhotoMakerParts.of(self.pipe)
        self.encoder = PhotoMakerIdentityEncoder(self.pipe, self.request, self.parts,
                                                 backend.face_analyzer)
        self.start_merge_step = _start_merge_step(self.request.backend_options)
        self._text_only: LineConditioning | None = None
        self._lora_rows_switchable: bool | None = None

    def open(self, restore: ExitStack) -> None:
        # Found once per call (walking the UNet at every step would cost milliseconds); the
        # per-row hooks come off when the call ends.
        self.adapter_switch = AdapterSwitch([self.pipe.unet], [self.parts.adapter_name])
        restore.callback(self.adapter_switch.close)

    # -- text -----------------------------------------------------------------------------
    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        if line is Line.ID:
            return identity.state["conditioning"]
        if line is Line.BASELINE:
            return self.baseline_text(identity.state["references"])
        return self.scene_text()

    def scene_text(self) -> LineConditioning:
        """The caller's prompt, its trigger word (if any) removed."""
        key = (Line.SEMANTIC, None)
        if key not in self._texts:
            request, pipe = self.request, self.pipe
            self._texts[key] = encode_line_text(
                pipe, request, text_only_prompt(pipe, self.parts, request.prompt),
                prompt_2=text_only_prompt(pipe, self.parts, request.prompt_2),
                negative_prompt=request.negative_prompt,
                negative_prompt_2=request.negative_prompt_2, prompt_embeds=request.prompt_embeds,
                negative_prompt_embeds=request.negative_prompt_embeds,
                pooled_prompt_embeds=request.pooled_prompt_embeds,
                negative_pooled_prompt_embeds=request.negative_pooled_prompt_embeds)
        return self._texts[key]

    def baseline_text(self, references: ReferenceInputs) -> LineConditioning:
        """The official algorithm's conditioning after the merge step; the text-only
        conditioning of the steps before it is kept in ``self._text_only``."""
        request = self.request
        if request.prompt is None:
            raise ConfigError("PhotoMaker's own algorithm fuses the identity into the prompt "
                              "text: pass prompt='... a man img ...' rather than prompt_embeds")
        self._text_only = self.scene_text()
        prompts = as_prompt_list(request.prompt, request.batch_size)
        embeds, pooled = fused_prompts(self.pipe, self.parts, request, references, prompts,
                                       request.prompt_2)
        return dataclasses.replace(self._text_only, prompt_embeds=embeds, pooled=pooled)

    # -- the UNet -------------------------------------------------------------------------
    @property
    def _semantic_lora_off(self) -> bool:
        return self.config.semantic_adapters == "off"

    @contextmanager
    def line_state(self, line: Line) -> Iterator[None]:
        """The LoRA for a one-line batch: off for the semantic line (when "off")."""
        if line is Line.SEMANTIC and self._semantic_lora_off:
            with lora_adapter_off(self.pipe.unet, self.parts.adapter_name, self.adapter_switch):
                yield
        else:
            yield

    @contextmanager
    def rows_state(self, batch: RowBatch) -> Iterator[None]:
        """A merged batch: the PhotoMaker LoRA on for the ID rows, off for the semantic rows
        (when "off"). Only the PhotoMaker adapter's up-projections are row-masked, also in
        layers it shares with another LoRA: a style LoRA adds its output to every row, as
        ``line_state`` leaves it on for the semantic line too."""
        if not self._semantic_lora_off:
            yield  # every row runs the same model
            return
        with self.adapter_switch.rows(row_mask(batch, (Line.ID,))):
            yield

    def photomaker_lora_layers(self) -> list[torch.nn.Module]:
        """The UNet's PEFT layers where the PhotoMaker adapter is active."""
        return self.adapter_switch.named_layers()

    def _lora_switchable_per_row(self) -> bool:
        """Whether a row mask on the PhotoMaker LoRA's up-projections switches it exactly."""
        if self._lora_rows_switchable is None:
            layers = self.photomaker_lora_layers()
            self._lora_rows_switchable = (
                any(not layer._disable_adapters for layer in layers)
                and all(lora_layer_row_maskable(layer) for layer in layers))
        return self._lora_rows_switchable

    def preview_face_analyzer(self):
        """The reference-face analyser (V2's): what ``region="auto"`` searches the preview with."""
        return self.encoder.reference_face_analyzer()

    def supports_row_batching(self, batch: RowBatch) -> bool:
        """Both lines in one call when the PhotoMaker LoRA can be switched per row exactly.

        The LoRA is the only per-line UNet state. With ``semantic_adapters="on"`` every
        row runs the same model. With "off" it must be an active, unfused, non-DoRA PEFT
        LoRA: a fused LoRA (or a layer it shares with a fused one) cannot be taken out of
        some rows only, and a LoRA that is not a PEFT adapter (an official pipeline that
        baked it into the weights) is left to the separate calls, which behave as before.
        """
        if Line.BASELINE in batch.lines:
            return False  # the baseline swaps its text per step in predict: one line only
        return not self._semantic_lora_off or self._lora_switchable_per_row()

    def negative_shareable(self) -> bool:
        # Both lines' negatives are plain text; they run the same model only with the LoRA
        # on for the semantic line too.
        return self.config.semantic_adapters == "on"

    def _with_text_only_rows(self, batch: RowBatch) -> RowBatch:
        """The batch with its positive rows replaced by the text-only conditioning."""
        block = batch.rows_per_branch
        text_only = self._text_only
        embeds, pooled = [], []
        for index, branch in enumerate(batch.branches):
            rows = slice(index * block, (index + 1) * block)
            if branch == "cond":
                embeds.append(text_only.prompt_embeds.to(batch.encoder_hidden_states.device))
                pooled.append(text_only.pooled.to(batch.text_embeds.device))
            else:
                embeds.append(batch.encoder_hidden_states[rows])
                pooled.append(batch.text_embeds[rows])
        return dataclasses.replace(batch, encoder_hidden_states=torch.cat(embeds),
                                   text_embeds=torch.cat(pooled))

    def predict(self, batch: RowBatch, model: SDXLModel) -> torch.Tensor:
        # The official schedule: text-only for step indices <= start_merge_step. A merged
        # batch never holds baseline rows: supports_row_batching refuses them.
        if batch.line is Line.BASELINE and batch.step_index <= self.start_merge_step:
            batch = self._with_text_only_rows(batch)
        with self.rows_state(batch) if batch.parts else self.line_state(batch.line):
            return model(batch)


class PhotoMakerBackend:
    """PhotoMaker V1/V2 on a diffusers SDXL pipeline or the official pipeline object."""

    name = "photomaker"
    recognizes_description = (
        "a diffusers StableDiffusionXLPipeline prepared with "
        "bf_backends.photomaker.loader.load_photomaker (V1 or V2), or the official "
        "PhotoMakerStableDiffusionXLPipeline; no IP-Adapter loaded")
    # Above the generic SDXL fallback (0): a PhotoMaker pipeline is unambiguous.
    priority = 20
    default_id_prompt = f"a person {DEFAULT_TRIGGER_WORD}"
    hosts = (HOST_NAME,)
    options = OPTIONS
    #: each person's ID-fused prompt embeddings are its own line's text conditioning and the
    #: LoRA rows switch per line kind, so N people share one merged call
    max_people = 4

    def __init__(self):
        self._face_analyzers: dict[tuple, Any] = {}

    def recognizes(self, pipe: Any) -> bool:
        prepared = isinstance(getattr(pipe, "photomaker", None), PhotoMakerState)
        return (is_sdxl_pipeline(pipe) and not has_ip_adapter(pipe)
                and (prepared or is_official_photomaker_pipeline(pipe)))

    def open_session(self, call: SDXLCall, config: BFConfig) -> PhotoMakerSession:
        return PhotoMakerSession(self, call, config)

    def face_analyzer(self, model: Any = "buffalo_l", root: Any = None,
                      providers: Sequence[Any] | None = None):
        """A ``FaceAnalyzer`` with PhotoMaker V2's detection sizes, built once per setting."""
        from bf_core.faces import PHOTOMAKER_RETRY_DET_SIZES, FaceAnalyzer

        key = (str(model), None if root is None else str(root),
               None if providers is None else tuple(map(str, providers)))
        if key not in self._face_analyzers:
            self._face_analyzers[key] = FaceAnalyzer(
                model=model, root=root, providers=providers,
                retry_det_sizes=PHOTOMAKER_RETRY_DET_SIZES)
        return self._face_analyzers[key]


# -- the benchmark's view (BackendExtras) ------------------------------------------------------
def benchmark_prompt(prompt: str) -> str:
    """``prompt`` with the trigger word after its first class word, as PhotoMaker's own
    algorithm (the baseline) needs: "A person is ..." -> "A person img is ...".

    A prompt that already holds the trigger, or has no class word, is returned as it is.
    The method-on lines remove the trigger again, so they see the plain scene prompt.
    """
    import re

    trigger = DEFAULT_TRIGGER_WORD
    if re.search(rf"\b{re.escape(trigger)}\b", prompt):
        return prompt
    class_word = re.compile(r"\b(person|man|woman|boy|girl)\b", re.IGNORECASE)
    return class_word.sub(rf"\1 {trigger}", prompt, count=1)


def benchmark_call_kwargs(identity: Any, images: list) -> dict[str, Any]:
    """The photos and ``P_id``: the identity's PhotoMaker ``id_prompt`` as written, else
    its shared ``id_prompt`` with the trigger added, else the backend's default."""
    import re

    id_prompt = identity.option(PhotoMakerBackend.name, "id_prompt")
    if not id_prompt and identity.id_prompt:
        id_prompt = benchmark_prompt(identity.id_prompt)
        if not re.search(rf"\b{re.escape(DEFAULT_TRIGGER_WORD)}\b", id_prompt):
            id_prompt = None  # no class word to put the trigger after
    return {"id_images": images, "id_prompt": id_prompt or PhotoMakerBackend.default_id_prompt}


__all__ = ["OPTIONS", "PhotoMakerBackend", "PhotoMakerSession", "lora_adapter_off"]
