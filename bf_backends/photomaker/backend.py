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
PhotoMaker LoRA is then switched per row (a ``bf_core.rowbatch`` row mask on its adapter
only, so a style LoRA stays on for every row). Where that switch is not exact (a fused
LoRA, DoRA, or a LoRA that is not a PEFT adapter) the lines run in separate calls.

``T_id`` is the fused ``P_id`` embedding (1, 77, D): the identity lives in its N x T
class-token rows, the rest is the text encoder's own output of ``P_id``.

Two kinds of pipeline are served: a diffusers ``StableDiffusionXLPipeline`` prepared with
``load_photomaker`` (``pipe.photomaker`` holds our encoder), and the official
``PhotoMakerStableDiffusionXLPipeline``, recognised by its attributes and reused as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bf_backends.photomaker.images import preprocess_id_images
from bf_backends.photomaker.loader import ADAPTER_NAME, PhotoMakerState
from bf_backends.photomaker.prompt import (
    DEFAULT_TRIGGER_WORD,
    TriggerPromptEmbeds,
    encode_prompt_with_trigger,
    fuse_identity,
    remove_trigger_word,
    trigger_token_id,
)
from bf_core.errors import ConfigError, ImageInputError
from bf_core.protocols import GenerationRequest, Identity, Line, LineConditioning, RowBatch
from bf_core.rowbatch import lora_layer_row_maskable, row_mask
from bf_core.sdxl import SDXLSession, encode_line_text, has_ip_adapter, is_sdxl_pipeline
from bf_core.switching import AdapterSwitch

#: The official pipelines' default: step indices 0..10 use the text-only prompt.
DEFAULT_START_MERGE_STEP = 10
#: PhotoMaker V2 uses the most confident face of each reference image (insightface order).
DEFAULT_FACE_POLICY = "highest_score"
FACE_EMBEDDING_DIM = 512

#: Per-call keywords this backend understands (besides the core's).
BACKEND_OPTIONS = {
    "start_merge_step": "baseline: last step index that uses the text-only prompt (default 10)",
    "id_embeds": "V2: precomputed raw insightface embeddings (N, 512), one per reference image",
    "face_analyzer": "V2: a bf_core.faces.FaceAnalyzer to use instead of the default",
    "face_model": "V2: insightface pack name or folder (default 'buffalo_l')",
    "face_root": "V2: folder holding the pack, or an insightface root with models/<pack>/",
    "face_providers": "V2: onnxruntime execution providers (default CUDA if available, CPU)",
    "face_policy": "V2: 'highest_score' (default, as upstream), 'largest' or 'error'",
    "id_negative_prompt": "the ID line's negative prompt (default: the caller's)",
    "id_negative_prompt_2": "the ID line's second negative prompt",
}


# --------------------------------------------------------------------------------------
# Recognising the two kinds of PhotoMaker pipeline
# --------------------------------------------------------------------------------------


def is_official_photomaker_pipeline(pipe: Any) -> bool:
    """Duck-typed: the official ``PhotoMakerStableDiffusionXLPipeline`` (or a variant)."""
    return (isinstance(getattr(pipe, "id_encoder", None), torch.nn.Module)
            and isinstance(getattr(pipe, "trigger_word", None), str)
            and hasattr(pipe, "id_image_processor")
            and callable(getattr(pipe, "encode_prompt_with_trigger_word", None)))


def official_tokens_per_image(id_encoder: torch.nn.Module) -> int:
    """T from the official encoder itself: 2 when it has V2's perceiver, else 1.

    The pipeline's ``num_tokens`` is always 2 in current code, also for V1, which is why
    the official code crashes on V1; it is deliberately not read.
    """
    return 2 if hasattr(id_encoder, "qformer_perceiver") else 1


@dataclass
class PhotoMakerHost:
    """What the session needs from a PhotoMaker pipeline, whichever kind it is.

    encoder: the ID encoder module; tokens_per_image: T (1 V1, 2 V2); official: whether it
    is the official pipeline's own encoder (then called with its own signature).
    """

    encoder: torch.nn.Module
    version: str
    tokens_per_image: int
    trigger_word: str
    adapter_name: str
    official: bool
    face_analyzer: Any = None
    image_processor: Any = None

    @classmethod
    def of(cls, pipe: Any) -> PhotoMakerHost:
        state = getattr(pipe, "photomaker", None)
        if isinstance(state, PhotoMakerState):
            return cls(state.encoder, state.version, state.tokens_per_image, state.trigger_word,
                       state.adapter_name, official=False, face_analyzer=state.face_analyzer)
        if is_official_photomaker_pipeline(pipe):
            tokens = official_tokens_per_image(pipe.id_encoder)
            return cls(pipe.id_encoder, "v2" if tokens == 2 else "v1", tokens, pipe.trigger_word,
                       ADAPTER_NAME, official=True, image_processor=pipe.id_image_processor)
        raise ConfigError("this pipeline has no PhotoMaker loaded: call "
                          "bf_backends.photomaker.loader.load_photomaker(pipe, checkpoint) first, or "
                          "wrap the official PhotoMakerStableDiffusionXLPipeline.")

    def pixel_values(self, images: list) -> torch.Tensor:
        """(N, 3, 224, 224) CLIP pixels of the whole reference images, in order."""
        if self.image_processor is not None:  # the official pipeline's own preprocessing
            return self.image_processor(images, return_tensors="pt").pixel_values
        return preprocess_id_images(images, size=self.encoder.image_size)

    def fuse(self, encoded: TriggerPromptEmbeds, pixel_values: torch.Tensor,
             face_embeds: torch.Tensor | None) -> torch.Tensor:
        """The ID-fused prompt embedding P' (1, 77, D) in the prompt's dtype."""
        if not self.official:
            return fuse_identity(self.encoder, encoded, pixel_values, face_embeds)
        weight = next(self.encoder.parameters())
        args = [pixel_values.unsqueeze(0).to(weight.device, weight.dtype),
                # the official fuse writes into its input: give it a copy
                encoded.prompt_embeds.clone().to(weight.device),
                encoded.class_tokens_mask.to(weight.device)]
        if face_embeds is not None:
            args.append(face_embeds.unsqueeze(0).to(weight.device, weight.dtype))
        fused = self.encoder(*args)
        return fused.to(encoded.prompt_embeds.device, encoded.prompt_embeds.dtype)


@contextmanager
def encoder_on_execution_device(encoder: torch.nn.Module, pipe: Any) -> Iterator[None]:
    """Run the ID encoder where the pipeline runs, then park it with the UNet's weights.

    The encoder is not a registered pipeline component, so neither ``pipe.to`` nor CPU
    offload moves it; following the UNet here gives the same effect: after ``pipe.to
    ("cuda")`` it stays on the GPU, under model CPU offload it goes back to the CPU. Its
    dtype follows the UNet's.
    """
    device, dtype = pipe._execution_device, pipe.unet.dtype
    encoder.to(device=device, dtype=dtype)
    try:
        yield
    finally:
        home = pipe.unet.device
        if home != device:
            encoder.to(home)


# --------------------------------------------------------------------------------------
# Switching PhotoMaker's LoRA off exactly
# --------------------------------------------------------------------------------------


def _active_adapter_names(layer: torch.nn.Module) -> set[str]:
    names = getattr(layer, "active_adapters", None) or getattr(layer, "active_adapter", ())
    return {names} if isinstance(names, str) else set(names)


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
        active = _active_adapter_names(layer)
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


# --------------------------------------------------------------------------------------
# Identity encoder and session
# --------------------------------------------------------------------------------------


@dataclass
class ReferenceInputs:
    """The encoder inputs of one call: pixels (N, 3, 224, 224), V2 face embeds (N, 512)."""

    pixel_values: torch.Tensor
    face_embeds: torch.Tensor | None

    @property
    def count(self) -> int:
        return int(self.pixel_values.shape[0])


class PhotoMakerIdentityEncoder:
    """Reference images + ``P_id`` -> T_id, the ID-fused ``P_id`` embedding (R, 77, D)."""

    def __init__(self, session: PhotoMakerSession):
        self.session = session

    def encode(self, id_images: Sequence[Any] | None, id_prompt: str,
               request: GenerationRequest) -> Identity:
        conditioning = self.session.conditioning(Line.ID, None)
        references = self.session.references()
        return Identity(tokens=conditioning.prompt_embeds,
                        negative_tokens=conditioning.negative_prompt_embeds,
                        state={"pixel_values": references.pixel_values,
                               "face_embeds": references.face_embeds})


def _as_prompt_list(prompt: str | list[str], batch_size: int) -> list[str]:
    return [prompt] * batch_size if isinstance(prompt, str) else list(prompt)


def _repeat_rows(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """(B, ...) -> (B * times, ...), each row repeated in place, as diffusers repeats."""
    return tensor.repeat_interleave(times, dim=0)


class PhotoMakerSession(SDXLSession):
    """One call's state: the reference inputs, each line's conditioning, the LoRA switch."""

    def __init__(self, backend: Any, pipe: Any, request: GenerationRequest, config: Any):
        super().__init__(backend, pipe, request, config)
        unknown = sorted(set(request.backend_options) - set(BACKEND_OPTIONS))
        if unknown:
            listed = "; ".join(f"{k}: {v}" for k, v in BACKEND_OPTIONS.items())
            raise ConfigError(f"unknown PhotoMaker option(s) {unknown}. Known: {listed}")
        self.host = PhotoMakerHost.of(pipe)
        self.encoder = PhotoMakerIdentityEncoder(self)
        self.start_merge_step = self._start_merge_step()
        self._references: ReferenceInputs | None = None
        self._text_only: LineConditioning | None = None
        self._lora_layers: list[torch.nn.Module] | None = None
        self._adapter_switch: AdapterSwitch | None = None
        self._lora_rows_switchable: bool | None = None

    def _start_merge_step(self) -> int:
        value = self.request.backend_options.get("start_merge_step", DEFAULT_START_MERGE_STEP)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"start_merge_step must be an int step index >= 0, got {value!r}; "
                              "the official default is 10 (of 50 steps)")
        return value

    @property
    def id_prompt(self) -> str:
        return self.request.id_prompt or f"a person {self.host.trigger_word}"

    # -- reference inputs -----------------------------------------------------------------
    def references(self) -> ReferenceInputs:
        """Pixels and (V2) face embeddings of the reference images, computed once per call."""
        if self._references is None:
            from bf_core.images import load_images

            if not self.request.id_images:
                raise ImageInputError("PhotoMaker needs reference photos of the person: pass "
                                      "id_images=[...] (PIL images, paths or arrays).")
            given = self.request.id_images
            items = list(given) if isinstance(given, (list, tuple)) else [given]
            images = load_images(items)
            faces = self._face_embeddings(items) if self.host.tokens_per_image == 2 else None
            self._references = ReferenceInputs(self.host.pixel_values(images), faces)
        return self._references

    def _face_embeddings(self, images: list) -> torch.Tensor:
        """(N, 512) raw ArcFace embeddings, the chosen face of each image, in order.

        ``images`` are the caller's own items, so that a photo without a face is named
        by its path.
        """
        options = self.request.backend_options
        given = options.get("id_embeds")
        if given is not None:
            embeds = torch.as_tensor(np.asarray(given, dtype=np.float32)).reshape(-1,
                                                                                  FACE_EMBEDDING_DIM)
            if embeds.shape[0] != len(images):
                raise ConfigError(f"id_embeds holds {embeds.shape[0]} embedding(s) for "
                                  f"{len(images)} reference image(s); give one per image, in order")
            return embeds
        analyzer = options.get("face_analyzer") or self.host.face_analyzer \
            or self.backend.face_analyzer(options.get("face_model", "buffalo_l"),
                                          options.get("face_root"), options.get("face_providers"))
        faces = analyzer.embed(images, policy=options.get("face_policy", DEFAULT_FACE_POLICY))
        return torch.from_numpy(np.stack([face.embedding for face in faces]))

    # -- text -----------------------------------------------------------------------------
    def _text_only_prompt(self, prompt: str | list[str] | None):
        """The prompt with its trigger word removed, as PhotoMaker's text-only prompt.

        A prompt without the trigger is returned unchanged (not re-decoded), so the
        semantic line of a plain scene prompt is exactly the stock SDXL encoding.
        """
        if prompt is None:
            return None
        if isinstance(prompt, list):
            return [self._text_only_prompt(p) for p in prompt]
        tokenizer = self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2
        trigger = trigger_token_id(tokenizer, self.host.trigger_word)
        if trigger not in tokenizer.encode(prompt, add_special_tokens=False):
            return prompt
        return remove_trigger_word(tokenizer, prompt, self.host.trigger_word)

    def _fused_prompts(self, prompts: list[str], prompt_2: str | list[str] | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """ID-fused embeddings (R, 77, D) and pooled (R, P) of trigger-word prompts."""
        references = self.references()
        second = _as_prompt_list(prompt_2, len(prompts)) if prompt_2 is not None else None
        embeds, pooled = [], []
        with encoder_on_execution_device(self.host.encoder, self.pipe), torch.no_grad():
            for index, prompt in enumerate(prompts):
                encoded = encode_prompt_with_trigger(
                    self.pipe, prompt, self.host.trigger_word, references.count,
                    self.host.tokens_per_image, prompt_2=second[index] if second else None,
                    clip_skip=self.request.clip_skip, device=self.request.device)
                embeds.append(self.host.fuse(encoded, references.pixel_values,
                                             references.face_embeds))
                pooled.append(encoded.pooled_prompt_embeds)
        repeats = self.request.num_images_per_prompt
        return _repeat_rows(torch.cat(embeds), repeats), _repeat_rows(torch.cat(pooled), repeats)

    def id_line_text(self) -> LineConditioning:
        """Fused ``P_id`` with its pooled vector; the negative encoded as plain text."""
        options = self.request.backend_options
        negative = options.get("id_negative_prompt", self.request.negative_prompt)
        if isinstance(negative, list) and self.request.batch_size != len(negative):
            negative = negative[0]
        text = encode_line_text(self.pipe, self.request, self._text_only_prompt(self.id_prompt),
                                negative_prompt=negative,
                                negative_prompt_2=options.get("id_negative_prompt_2"))
        # One identity for every prompt of the batch: fuse P_id once, repeat it per prompt.
        embeds, pooled = self._fused_prompts([self.id_prompt], None)
        rows = self.request.batch_size
        return dataclasses.replace(text, prompt_embeds=embeds.repeat(rows, 1, 1),
                                   pooled=pooled.repeat(rows, 1))

    def semantic_line_text(self) -> LineConditioning:
        """The caller's prompt, its trigger word (if any) removed."""
        request = self.request
        return encode_line_text(
            self.pipe, request, self._text_only_prompt(request.prompt),
            prompt_2=self._text_only_prompt(request.prompt_2),
            negative_prompt=request.negative_prompt, negative_prompt_2=request.negative_prompt_2,
            prompt_embeds=request.prompt_embeds,
            negative_prompt_embeds=request.negative_prompt_embeds,
            pooled_prompt_embeds=request.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=request.negative_pooled_prompt_embeds)

    def baseline_text(self) -> LineConditioning:
        """The official algorithm's conditioning after the merge step; the text-only
        conditioning of the steps before it is kept in ``self._text_only``."""
        request = self.request
        if request.prompt is None:
            raise ConfigError("PhotoMaker's own algorithm fuses the identity into the prompt "
                              "text: pass prompt='... a man img ...' rather than prompt_embeds")
        self._text_only = self.semantic_line_text()
        prompts = _as_prompt_list(request.prompt, request.batch_size)
        embeds, pooled = self._fused_prompts(prompts, request.prompt_2)
        return dataclasses.replace(self._text_only, prompt_embeds=embeds, pooled=pooled)

    def conditioning(self, line: Line, identity: Identity | None) -> LineConditioning:
        if line is Line.BASELINE and line not in self._conditioning_cache:
            self._conditioning_cache[line] = self.baseline_text()
        return super().conditioning(line, identity)

    # -- the UNet -------------------------------------------------------------------------
    @property
    def _semantic_lora_off(self) -> bool:
        return self.config.semantic_adapters == "off"

    @contextmanager
    def line_state(self, line: Line) -> Iterator[None]:
        if line is Line.SEMANTIC and self._semantic_lora_off:
            with lora_adapter_off(self.pipe.unet, self.host.adapter_name, self.adapter_switch()):
                yield
        else:
            yield

    def adapter_switch(self) -> AdapterSwitch:
        """The PhotoMaker adapter's switch, off for a whole line or per row, built once per
        call (walking the whole UNet at every step would cost milliseconds); its per-row
        hooks come off when the call ends."""
        if self._adapter_switch is None:
            self._adapter_switch = AdapterSwitch([self.pipe.unet], [self.host.adapter_name])
            self.restore_stack.callback(self._adapter_switch.close)
        return self._adapter_switch

    def photomaker_lora_layers(self) -> list[torch.nn.Module]:
        """The UNet's PEFT layers where the PhotoMaker adapter is active."""
        if self._lora_layers is None:
            name = self.host.adapter_name
            self._lora_layers = [layer for _, layer in self.adapter_switch().all_layers
                                 if name in _active_adapter_names(layer)]
        return self._lora_layers

    def _lora_switchable_per_row(self) -> bool:
        """Whether a row mask on the PhotoMaker LoRA's up-projections switches it exactly."""
        if self._lora_rows_switchable is None:
            layers = self.photomaker_lora_layers()
            self._lora_rows_switchable = (
                any(not layer._disable_adapters for layer in layers)
                and all(lora_layer_row_maskable(layer) for layer in layers))
        return self._lora_rows_switchable

    def supports_row_batching(self, batches: Sequence[RowBatch]) -> bool:
        """Both lines in one call when the PhotoMaker LoRA can be switched per row exactly.

        The LoRA is the only per-line UNet state. With ``semantic_adapters="on"`` every
        row runs the same model. With "off" it must be an active, unfused, non-DoRA PEFT
        LoRA: a fused LoRA (or a layer it shares with a fused one) cannot be taken out of
        some rows only, and a LoRA that is not a PEFT adapter (an official pipeline that
        baked it into the weights) is left to the separate calls, which behave as before.
        """
        if any(batch.line is Line.BASELINE for batch in batches):
            return False  # the baseline swaps its text per step in unet_forward: one line only
        return not self._semantic_lora_off or self._lora_switchable_per_row()

    @contextmanager
    def row_state(self, batch: RowBatch) -> Iterator[None]:
        """The PhotoMaker LoRA on for the ID rows, off for the semantic rows (when "off").

        Only the PhotoMaker adapter's up-projections are row-masked, also in layers it
        shares with another LoRA: a style LoRA adds its output to every row, as
        ``line_state`` leaves it on for the semantic line too.
        """
        if not self._semantic_lora_off:
            yield  # every row runs the same model
            return
        with self.adapter_switch().rows(row_mask(batch, (Line.ID,))):
            yield

    def negative_shareable(self) -> bool:
        # Both lines' negatives are plain text; they run the same model only with the LoRA
        # on for the semantic line too.
        return self.config.semantic_adapters == "on"

    def _with_text_only_rows(self, batch: RowBatch) -> RowBatch:
        """The batch with its positive rows replaced by the text-only conditioning."""
        block = batch.rows // len(batch.branches)
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

    def unet_forward(self, batch: RowBatch) -> torch.Tensor:
        # The official schedule: text-only for step indices <= start_merge_step. A merged
        # batch (line None) never holds baseline rows: supports_row_batching refuses them.
        if batch.line is Line.BASELINE and batch.step_index <= self.start_merge_step:
            batch = self._with_text_only_rows(batch)
        return super().unet_forward(batch)


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

    def __init__(self):
        self._face_analyzers: dict[tuple, Any] = {}

    def recognizes(self, pipe: Any) -> bool:
        prepared = isinstance(getattr(pipe, "photomaker", None), PhotoMakerState)
        return (is_sdxl_pipeline(pipe) and not has_ip_adapter(pipe)
                and (prepared or is_official_photomaker_pipeline(pipe)))

    def open_session(self, pipe: Any, request: GenerationRequest, config: Any
                     ) -> PhotoMakerSession:
        return PhotoMakerSession(self, pipe, request, config)

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

    def demo_setup(self, seed: int = 0) -> tuple[Any, dict[str, Any]]:
        """A tiny offline PhotoMaker pipeline and call keywords for ``beyondfacial demo``."""
        from bf_backends.photomaker.testing import demo_setup

        return demo_setup(seed)

    def from_pretrained(self, base_model: str, checkpoint: str | None = None, **kwargs: Any):
        """A pipeline from a base SDXL model and a PhotoMaker checkpoint (path or hub id)."""
        from bf_backends.photomaker.loader import load_photomaker_pipeline

        if not checkpoint:
            raise ConfigError("PhotoMaker needs its checkpoint: pass the path of "
                              "photomaker-v2.bin (or photomaker-v1.bin) or "
                              "'TencentARC/PhotoMaker-V2'")
        return load_photomaker_pipeline(base_model, checkpoint, **kwargs)

    # -- the benchmark protocol (docs/benchmark.md, "Backend protocol") ------------------------
    def benchmark_tiny_pipeline(self, seed: int = 0):
        """The demo's tiny offline pipeline: V2 with a random face pack on it (V1 without
        insightface), so the benchmark's call keywords need no face options."""
        from bf_backends.photomaker.testing import demo_setup

        return demo_setup(seed)[0]

    def benchmark_prompt(self, prompt: str) -> str:
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

    def benchmark_call_kwargs(self, identity: Any, images: list) -> dict[str, Any]:
        """The photos and ``P_id``: the identity's PhotoMaker ``id_prompt`` as written, else
        its shared ``id_prompt`` with the trigger added, else ``default_id_prompt``."""
        import re

        id_prompt = identity.option(self.name, "id_prompt")
        if not id_prompt and identity.id_prompt:
            id_prompt = self.benchmark_prompt(identity.id_prompt)
            if not re.search(rf"\b{re.escape(DEFAULT_TRIGGER_WORD)}\b", id_prompt):
                id_prompt = None  # no class word to put the trigger after
        return {"id_images": images, "id_prompt": id_prompt or self.default_id_prompt}


__all__ = ["BACKEND_OPTIONS", "PhotoMakerBackend", "PhotoMakerHost", "PhotoMakerSession",
           "is_official_photomaker_pipeline", "lora_adapter_off", "official_tokens_per_image"]
