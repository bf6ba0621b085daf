"""PhotoMaker's identity step: reference photos + ``P_id`` -> the ID-fused ``P_id`` embedding.

T_id is the fused ``P_id`` embedding (1, 77, D): the identity lives in its N x T
class-token rows (T = 1 for V1, 2 for V2), the rest is the text encoder's own output of
``P_id``. The reference inputs (CLIP pixels, V2's ArcFace embeddings) are read once and
kept in the identity's state, for the baseline's fused prompts too.

Two kinds of pipeline carry PhotoMaker: a diffusers ``StableDiffusionXLPipeline`` prepared
with ``load_photomaker`` (``pipe.photomaker`` holds our encoder), and the official
``PhotoMakerStableDiffusionXLPipeline``, recognised by its attributes and reused as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bf_backends.photomaker.images import preprocess_id_images
from bf_backends.photomaker.loader import ADAPTER_NAME, PhotoMakerState
from bf_backends.photomaker.prompt import (
    TriggerPromptEmbeds,
    encode_prompt_with_trigger,
    fuse_identity,
    remove_trigger_word,
    trigger_token_id,
)
from bf_core.errors import ConfigError, ImageInputError
from bf_core.hosts.sdxl import encode_line_text, id_negative_prompt
from bf_core.records import GenerationRequest, Identity, LineConditioning, Person

#: PhotoMaker V2 uses the most confident face of each reference image (insightface order).
DEFAULT_FACE_POLICY = "highest_score"
FACE_EMBEDDING_DIM = 512


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
class PhotoMakerParts:
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
    def of(cls, pipe: Any) -> PhotoMakerParts:
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
# Reference inputs and fused prompts
# --------------------------------------------------------------------------------------


@dataclass
class ReferenceInputs:
    """The encoder inputs of one person: pixels (N, 3, 224, 224), V2 face embeds (N, 512)."""

    pixel_values: torch.Tensor
    face_embeds: torch.Tensor | None

    @property
    def count(self) -> int:
        return int(self.pixel_values.shape[0])


def as_prompt_list(prompt: str | list[str], batch_size: int) -> list[str]:
    return [prompt] * batch_size if isinstance(prompt, str) else list(prompt)


def _repeat_rows(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """(B, ...) -> (B * times, ...), each row repeated in place, as diffusers repeats."""
    return tensor.repeat_interleave(times, dim=0)


def text_only_prompt(pipe: Any, parts: PhotoMakerParts, prompt: str | list[str] | None):
    """The prompt with its trigger word removed, as PhotoMaker's text-only prompt.

    A prompt without the trigger is returned unchanged (not re-decoded), so the semantic
    line of a plain scene prompt is exactly the stock SDXL encoding.
    """
    if prompt is None:
        return None
    if isinstance(prompt, list):
        return [text_only_prompt(pipe, parts, p) for p in prompt]
    tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
    trigger = trigger_token_id(tokenizer, parts.trigger_word)
    if trigger not in tokenizer.encode(prompt, add_special_tokens=False):
        return prompt
    return remove_trigger_word(tokenizer, prompt, parts.trigger_word)


def fused_prompts(pipe: Any, parts: PhotoMakerParts, request: GenerationRequest,
                  references: ReferenceInputs, prompts: list[str],
                  prompt_2: str | list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ID-fused embeddings (R, 77, D) and pooled (R, P) of trigger-word prompts."""
    second = as_prompt_list(prompt_2, len(prompts)) if prompt_2 is not None else None
    embeds, pooled = [], []
    with encoder_on_execution_device(parts.encoder, pipe), torch.no_grad():
        for index, prompt in enumerate(prompts):
            encoded = encode_prompt_with_trigger(
                pipe, prompt, parts.trigger_word, references.count, parts.tokens_per_image,
                prompt_2=second[index] if second else None, clip_skip=request.clip_skip,
                device=request.device)
            embeds.append(parts.fuse(encoded, references.pixel_values, references.face_embeds))
            pooled.append(encoded.pooled_prompt_embeds)
    repeats = request.num_images_per_prompt
    return _repeat_rows(torch.cat(embeds), repeats), _repeat_rows(torch.cat(pooled), repeats)


class PhotoMakerIdentityEncoder:
    """A person's photos + ``P_id`` -> T_id, the ID-fused ``P_id`` embedding (R, 77, D).

    pipe, request, parts: the call's pipeline, request and PhotoMaker parts;
    face_analyzer(model, root, providers): the backend's (cached) V2 face analyser, used
    when the call gives neither ``id_embeds`` nor ``face_analyzer``.
    """

    def __init__(self, pipe: Any, request: GenerationRequest, parts: PhotoMakerParts,
                 face_analyzer: Any):
        self.pipe, self.request, self.parts = pipe, request, parts
        self.face_analyzer = face_analyzer

    def encode(self, person: Person) -> Identity:
        references = self.references(person)
        id_prompt = person.id_prompt or f"a person {self.parts.trigger_word}"
        conditioning = self.id_line_text(id_prompt, references)
        return Identity(id_prompt, conditioning.prompt_embeds, conditioning.negative_prompt_embeds,
                        state={"references": references, "conditioning": conditioning})

    def references(self, person: Person) -> ReferenceInputs:
        """Pixels and (V2) face embeddings of the person's reference images."""
        from bf_core.images import load_images

        if not person.id_images:
            raise ImageInputError("PhotoMaker needs reference photos of the person: pass "
                                  "id_images=[...] (PIL images, paths or arrays).")
        given = person.id_images
        items = list(given) if isinstance(given, (list, tuple)) else [given]
        images = load_images(items)
        faces = self.face_embeddings(items) if self.parts.tokens_per_image == 2 else None
        return ReferenceInputs(self.parts.pixel_values(images), faces)

    def reference_face_analyzer(self):
        """The call's ``face_analyzer``, else the pipeline's, else the backend's V2 one."""
        options = self.request.backend_options
        return options.get("face_analyzer") or self.parts.face_analyzer \
            or self.face_analyzer(options.get("face_model", "buffalo_l"), options.get("face_root"),
                                  options.get("face_providers"))

    def face_embeddings(self, images: list) -> torch.Tensor:
        """(N, 512) raw ArcFace embeddings, the chosen face of each image, in order.

        ``images`` are the caller's own items, so that a photo without a face is named
        by its path.
        """
        options = self.request.backend_options
        given = options.get("id_embeds")
        if given is not None:
            embeds = torch.as_tensor(np.asarray(given, dtype=np.float32)).reshape(
                -1, FACE_EMBEDDING_DIM)
            if embeds.shape[0] != len(images):
                raise ConfigError(f"id_embeds holds {embeds.shape[0]} embedding(s) for "
                                  f"{len(images)} reference image(s); give one per image, in order")
            return embeds
        faces = self.reference_face_analyzer().embed(
            images, policy=options.get("face_policy", DEFAULT_FACE_POLICY))
        return torch.from_numpy(np.stack([face.embedding for face in faces]))

    def id_line_text(self, id_prompt: str, references: ReferenceInputs) -> LineConditioning:
        """Fused ``P_id`` with its pooled vector; the negative encoded as plain text."""
        pipe, request = self.pipe, self.request
        text = encode_line_text(pipe, request, text_only_prompt(pipe, self.parts, id_prompt),
                                negative_prompt=id_negative_prompt(request),
                                negative_prompt_2=request.backend_options.get("id_negative_prompt_2"))
        # One identity for every prompt of the batch: fuse P_id once, repeat it per prompt.
        embeds, pooled = fused_prompts(pipe, self.parts, request, references, [id_prompt], None)
        rows = request.batch_size
        return dataclasses.replace(text, prompt_embeds=embeds.repeat(rows, 1, 1),
                                   pooled=pooled.repeat(rows, 1))
