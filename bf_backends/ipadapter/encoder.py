"""IP-Adapter's identity step: a person's photos (or diffusers' own identity arguments) ->
the image embeds every line passes to the UNet, and T_id, their projected image tokens.

``IPAdapterIdentityEncoder`` is that step. The helpers below build the embeds exactly as
diffusers' pipeline does: reference images go through the pipeline's own
``prepare_ip_adapter_image_embeds`` / ``encode_image`` (so the result equals what
``pipe(prompt, ip_adapter_image=...)`` computes); precomputed ``ip_adapter_image_embeds``
are shape-checked with errors that name the adapter and the expected layout. FaceID
adapters read insightface face embeddings, which ``faceid_image_embeds`` lays out;
FaceID-Plus V2 also reads CLIP hidden states of the aligned face crops, set as module state
by ``set_faceid_plus_clip_embeds``. ``projected_id_tokens`` gives the image tokens the
UNet's IP branch attends to.

Shapes (B = batch of one UNet call, m = images per adapter, n = images per prompt):

=====================================  ==================  ==============================
adapter                                per-adapter embeds  with CFG
=====================================  ==================  ==============================
plain (``ImageProjection``)            (n, m, D)           (2n, m, D), negative half first
plus, full-face (hidden states)        (n, m, seq, D)      (2n, m, seq, D)
FaceID, FaceID-Plus (face embedding)   (n, m, 1, 512)      (2n, m, 1, 512)
=====================================  ==================  ==============================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bf_core.errors import ConfigError, ImageInputError, NonFiniteError
from bf_core.records import GenerationRequest, Identity, Person

from .state import image_projection_layers

DEFAULT_FACE_MODEL = "buffalo_l"  # the pack the FaceID model cards use
DEFAULT_FACE_POLICY = "highest_score"  # the model cards take insightface's faces[0]
FACE_EMBED_DIM = 512
# insightface's normed_embedding has unit L2 norm; raw ArcFace embeddings are ~20-30 long.
_UNIT_NORM_TOLERANCE = 1e-2


@dataclass(frozen=True)
class EmbedLayout:
    """What one adapter's projection reads: tensor rank, feature width, tokens per image."""

    ndim: int
    width: int
    tokens_per_image: int | None  # None: any count (CLIP hidden states)
    description: str

    def example(self, batch: str) -> str:
        if self.ndim == 3:
            return f"({batch}, num_images, {self.width})"
        tokens = "seq" if self.tokens_per_image is None else str(self.tokens_per_image)
        return f"({batch}, num_images, {tokens}, {self.width})"


def embed_layout(layer) -> EmbedLayout:
    """The input layout of one diffusers IP-Adapter projection module."""
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterFaceIDImageProjection,
        IPAdapterFaceIDPlusImageProjection,
        IPAdapterFullImageProjection,
        IPAdapterPlusImageProjection,
    )

    if isinstance(layer, ImageProjection):
        return EmbedLayout(3, layer.image_embeds.in_features, None, "CLIP image_embeds")
    if isinstance(layer, IPAdapterPlusImageProjection):
        return EmbedLayout(4, layer.proj_in.in_features, None, "CLIP hidden_states[-2]")
    if isinstance(layer, IPAdapterFaceIDPlusImageProjection):
        return EmbedLayout(4, layer.proj.net[0].proj.in_features, 1, "face embeddings")
    if isinstance(layer, IPAdapterFaceIDImageProjection):
        return EmbedLayout(4, layer.ff.net[0].proj.in_features, 1, "face embeddings")
    if isinstance(layer, IPAdapterFullImageProjection):
        return EmbedLayout(4, layer.ff.net[0].proj.in_features, None, "CLIP hidden_states[-2]")
    raise ConfigError(f"unknown IP-Adapter projection {type(layer).__name__}; load an adapter "
                      "with diffusers' load_ip_adapter.")


def _unet_of(pipe):
    return getattr(pipe, "unet", pipe)


def _loaded_layers(pipe) -> list:
    layers = image_projection_layers(pipe)
    if not layers:
        raise ConfigError("the pipeline has no IP-Adapter loaded; call pipe.load_ip_adapter(...) "
                          "first.")
    return layers


def _check_layout(tensor, layout: EmbedLayout, index: int) -> None:
    """Raise a named error unless ``tensor`` fits ``layout`` (batch not checked)."""
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"ip_adapter_image_embeds[{index}] is a {type(tensor).__name__}; pass a "
                          f"torch.Tensor shaped {layout.example('batch')} ({layout.description}).")
    shape = tuple(tensor.shape)
    fits = (tensor.ndim == layout.ndim and shape[-1] == layout.width and shape[1] >= 1
            and (layout.tokens_per_image is None or shape[2] == layout.tokens_per_image))
    if not fits:
        raise ConfigError(f"ip_adapter_image_embeds[{index}] has shape {shape} but adapter {index} "
                          f"reads {layout.description} shaped {layout.example('batch')}.")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"ip_adapter_image_embeds[{index}] contains NaN or infinity; "
                             "recompute the embeddings (check the reference images and dtype).")


def check_image_embeds(pipe, image_embeds, do_classifier_free_guidance: bool = True) -> list:
    """Validate precomputed ``ip_adapter_image_embeds`` as a user passes them to the pipeline.

    One tensor per loaded adapter, for a single prompt: batch 2 (``[negative; positive]``)
    with CFG, 1 without; diffusers tiles them for ``num_images_per_prompt`` itself and would
    tile larger batches again, wrongly. Returns the list unchanged.
    """
    layers = _loaded_layers(pipe)
    if not isinstance(image_embeds, (list, tuple)):
        raise ConfigError("ip_adapter_image_embeds must be a list with one tensor per loaded "
                          f"IP-Adapter ({len(layers)}), not a {type(image_embeds).__name__}.")
    if len(image_embeds) != len(layers):
        raise ConfigError(f"got {len(image_embeds)} ip_adapter_image_embeds tensor(s) for "
                          f"{len(layers)} loaded IP-Adapter(s); pass one per adapter.")
    batch = 2 if do_classifier_free_guidance else 1
    for index, (tensor, layer) in enumerate(zip(image_embeds, layers, strict=True)):
        layout = embed_layout(layer)
        _check_layout(tensor, layout, index)
        if tensor.shape[0] != batch:
            what = "[negative; positive] stacked" if batch == 2 else "the positive only"
            raise ConfigError(
                f"ip_adapter_image_embeds[{index}] has batch {tensor.shape[0]} but must be {batch} "
                f"({what}, shaped {layout.example(str(batch))}); use num_images_per_prompt "
                "for more images instead of a larger batch.")
    return list(image_embeds)


def _is_image(item) -> bool:
    """What diffusers' CLIP feature extractor accepts: PIL images, arrays, tensors."""
    import numpy as np
    from PIL import Image

    return isinstance(item, (Image.Image, np.ndarray, torch.Tensor))


def _check_images(images, layers) -> list:
    """One entry per adapter: an image, or a list of images for that adapter."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) != len(layers):
        raise ConfigError(
            f"got {len(images)} ip_adapter_image entries for {len(layers)} loaded IP-Adapter(s). "
            "Give one entry per adapter; several images for one adapter go in a nested list, "
            "e.g. [[image_1, image_2]].")
    for index, entry in enumerate(images):
        items = entry if isinstance(entry, (list, tuple)) else [entry]
        if not items or not all(_is_image(item) for item in items):
            raise ImageInputError(f"ip_adapter_image[{index}] must be a PIL image, array or tensor "
                                  "(or a non-empty list of them); open files with PIL first.")
    return list(images)


def _execution_device(pipe, device):
    return torch.device(device) if device is not None else pipe._execution_device


def prepare_image_embeds(pipe, images=None, image_embeds=None, *, num_images_per_prompt: int = 1,
                         do_classifier_free_guidance: bool = True, device=None) -> list:
    """The per-adapter image embeds ``pipe(..., ip_adapter_image=images)`` would compute.

    Exactly one of ``images`` (one entry per adapter; a list for several images of one
    adapter) and ``image_embeds`` (precomputed, see ``check_image_embeds``) is given.
    ``num_images_per_prompt`` is the pipeline's total, ``batch_size * num_images_per_prompt``.
    Returns one tensor per adapter with batch ``2 * num_images_per_prompt`` under CFG
    (negative half first), as the UNet receives it in ``added_cond_kwargs["image_embeds"]``.
    """
    from diffusers.models.embeddings import (
        IPAdapterFaceIDImageProjection,
        IPAdapterFaceIDPlusImageProjection,
    )

    if (images is None) == (image_embeds is None):
        raise ConfigError("give exactly one of images and image_embeds.")
    if num_images_per_prompt < 1:
        raise ConfigError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")
    layers = _loaded_layers(pipe)
    if image_embeds is not None:
        check_image_embeds(pipe, image_embeds, do_classifier_free_guidance)
    else:
        images = _check_images(images, layers)
        face_ids = (IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection)
        if any(isinstance(layer, face_ids) for layer in layers):
            raise ConfigError("FaceID adapters read face embeddings, not images: build them with "
                              "faceid_image_embeds(...) and pass image_embeds instead.")
        if getattr(pipe, "image_encoder", None) is None:
            raise ConfigError("the pipeline has no image_encoder, so images cannot be encoded; "
                              "load the adapter with image_encoder_folder pointing at its CLIP "
                              "encoder, or pass precomputed image_embeds.")
    return pipe.prepare_ip_adapter_image_embeds(images, image_embeds,
                                                _execution_device(pipe, device),
                                                num_images_per_prompt, do_classifier_free_guidance)


def faceid_image_embeds(normed_embeddings: torch.Tensor, *, do_classifier_free_guidance: bool = True,
                        require_unit_norm: bool = True, dtype: torch.dtype | None = None,
                        device=None) -> torch.Tensor:
    """FaceID ``ip_adapter_image_embeds`` entry from insightface face embeddings.

    ``normed_embeddings``: (N, 512), one L2-normalised ArcFace embedding per reference
    face (insightface's ``face.normed_embedding``). Returns (2, N, 1, 512) with the zero
    negative first under CFG, else (1, N, 1, 512): the layout of the FaceID model card.
    Raw (unnormalised) embeddings raise unless ``require_unit_norm=False``.
    """
    if not isinstance(normed_embeddings, torch.Tensor):
        normed_embeddings = torch.as_tensor(normed_embeddings)
    if normed_embeddings.ndim != 2 or normed_embeddings.shape[1] != FACE_EMBED_DIM \
            or normed_embeddings.shape[0] < 1:
        raise ConfigError(f"face embeddings must be shaped (num_faces, {FACE_EMBED_DIM}), got "
                          f"{tuple(normed_embeddings.shape)}; stack one embedding per face.")
    if dtype is None:
        dtype = normed_embeddings.dtype if normed_embeddings.is_floating_point() else torch.float32
    embeddings = normed_embeddings.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(embeddings).all()):
        raise NonFiniteError("face embeddings contain NaN or infinity; check the face analysis.")
    norms = embeddings.float().norm(dim=1)
    if require_unit_norm and bool(((norms - 1).abs() > _UNIT_NORM_TOLERANCE).any()):
        raise ConfigError(f"face embeddings must be L2-normalised (norms are {norms.tolist()}); "
                          "pass insightface's face.normed_embedding, not face.embedding.")
    positive = embeddings[None, :, None, :]  # (1, N, 1, 512)
    if not do_classifier_free_guidance:
        return positive
    return torch.cat([torch.zeros_like(positive), positive], dim=0)


def _faceid_plus_layer(pipe, adapter_index: int | None):
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    layers = _loaded_layers(pipe)
    candidates = [i for i, layer in enumerate(layers)
                  if isinstance(layer, IPAdapterFaceIDPlusImageProjection)]
    if adapter_index is None:
        if len(candidates) != 1:
            raise ConfigError(f"{len(candidates)} FaceID-Plus adapters are loaded; pass "
                              "adapter_index to say which one gets the CLIP embeddings.")
        adapter_index = candidates[0]
    if adapter_index not in candidates:
        raise ConfigError(f"IP-Adapter {adapter_index} is not a FaceID-Plus adapter (FaceID-Plus "
                          f"adapters: {candidates}); only those read face-crop CLIP embeddings.")
    return layers[adapter_index]


def face_crop_clip_embeds(pipe, face_crops, *, num_images_per_prompt: int = 1,
                          do_classifier_free_guidance: bool = True, device=None) -> torch.Tensor:
    """CLIP ``hidden_states[-2]`` of aligned face crops, laid out as FaceID-Plus reads them.

    ``face_crops``: PIL images (insightface ``norm_crop`` at 224 px), one per reference
    face, in the order of the face embeddings. Returns (2n, m, seq, D) with the encoder's
    output on an all-zero image as the negative half (first), as the FaceID model card's
    ``prepare_ip_adapter_image_embeds([crops], None, device, n, True)[0]`` gives with one
    adapter loaded; this also works with several adapters.
    """
    if getattr(pipe, "image_encoder", None) is None:
        raise ConfigError("FaceID-Plus needs the ViT-H CLIP image encoder on the pipeline; load "
                          "the adapter with image_encoder_folder pointing at it.")
    crops = list(face_crops) if isinstance(face_crops, (list, tuple)) else [face_crops]
    if not crops or not all(_is_image(crop) for crop in crops):
        raise ImageInputError("face_crops must be a non-empty list of PIL images (aligned face "
                              "crops); open files with PIL first.")
    target = _execution_device(pipe, device)
    positive, negative = pipe.encode_image(crops, target, 1, output_hidden_states=True)
    stacked = torch.cat([negative[None], positive[None]]) if do_classifier_free_guidance \
        else positive[None]
    # diffusers' own tiling of precomputed embeds (negatives first under CFG).
    return pipe.prepare_ip_adapter_image_embeds(None, [stacked], target, num_images_per_prompt,
                                                do_classifier_free_guidance)[0]


def set_faceid_plus_clip_embeds(pipe, face_crops, *, shortcut: bool = True,
                                shortcut_scale: float = 1.0, adapter_index: int | None = None,
                                num_images_per_prompt: int = 1,
                                do_classifier_free_guidance: bool = True,
                                device=None) -> torch.Tensor:
    """Set a FaceID-Plus projection's ``clip_embeds``, ``shortcut`` and ``shortcut_scale``.

    V2 is ``shortcut=True`` (the face-embedding tokens are added back) with
    ``shortcut_scale`` the reference ``s_scale`` (default 1.0). ``clip_embeds`` is module
    state, not an input: its batch must equal the batch of the face embeds in every UNet
    call (``2 * num_images_per_prompt`` under CFG). Wrap changes in an
    ``IPAdapterStateSnapshot`` to restore the previous state. Returns the clip embeds.
    """
    layer = _faceid_plus_layer(pipe, adapter_index)
    clip_embeds = face_crop_clip_embeds(pipe, face_crops, num_images_per_prompt=num_images_per_prompt,
                                        do_classifier_free_guidance=do_classifier_free_guidance,
                                        device=device)
    layer.clip_embeds = clip_embeds.to(dtype=layer.proj_in.weight.dtype)
    layer.shortcut = bool(shortcut)
    layer.shortcut_scale = float(shortcut_scale)
    return layer.clip_embeds


def _check_faceid_plus_batch(layer, tensor: torch.Tensor, index: int) -> None:
    clip_embeds = layer.clip_embeds
    if clip_embeds is None:
        raise ConfigError(f"IP-Adapter {index} is FaceID-Plus and has no clip_embeds; call "
                          "set_faceid_plus_clip_embeds(pipe, face_crops) first.")
    wanted = tensor.shape[0] * tensor.shape[1]
    have = clip_embeds.shape[0] * clip_embeds.shape[1]
    if wanted != have:
        raise ConfigError(f"IP-Adapter {index}: clip_embeds cover {have} (batch x images) but the "
                          f"face embeds {tuple(tensor.shape)} need {wanted}; set them again with "
                          "the same num_images_per_prompt, CFG setting and number of faces.")


def projected_id_tokens(pipe, image_embeds, adapter_index: int | None = None) -> torch.Tensor:
    """Image tokens the UNet's IP branch attends to, (B, tokens, cross_attention_dim).

    ``image_embeds``: one tensor per adapter, as the UNet receives them (the output of
    ``prepare_image_embeds``). Each goes through ``unet.encoder_hid_proj``; an adapter's
    images are laid side by side on the token axis (m images x t tokens), which is how
    the IP attention processor concatenates them into one key sequence. With
    ``adapter_index=None`` all adapters' tokens follow each other in load order.
    """
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    layers = _loaded_layers(pipe)
    if not isinstance(image_embeds, (list, tuple)) or len(image_embeds) != len(layers):
        raise ConfigError(f"image_embeds must be a list with one tensor per loaded IP-Adapter "
                          f"({len(layers)}).")
    for index, (tensor, layer) in enumerate(zip(image_embeds, layers, strict=True)):
        _check_layout(tensor, embed_layout(layer), index)
        if isinstance(layer, IPAdapterFaceIDPlusImageProjection):
            _check_faceid_plus_batch(layer, tensor, index)
    if len({tensor.shape[0] for tensor in image_embeds}) != 1:
        raise ConfigError("all adapters' image embeds must share one batch size, got "
                          f"{[tuple(t.shape) for t in image_embeds]}.")
    if adapter_index is not None and not 0 <= adapter_index < len(layers):
        raise ConfigError(f"adapter_index {adapter_index} is out of range for {len(layers)} "
                          "loaded IP-Adapter(s).")
    projected = _unet_of(pipe).encoder_hid_proj(list(image_embeds))  # [(B, m, t, D)]
    tokens = [states.flatten(1, 2) for states in projected]  # (B, m * t, D)
    if adapter_index is not None:
        return tokens[adapter_index]
    return torch.cat(tokens, dim=1)


# ---------------------------------------------------------------------------------------
# FaceID inputs from reference photos
# ---------------------------------------------------------------------------------------

FACE_CROP_CHANNELS = ("bgr", "rgb")
FACE_CROP_SIZE = 224  # the aligned crop FaceID-Plus gives its CLIP encoder


def _crop_for_clip(crop, channels: str):
    """The aligned crop as the (H, W, 3) uint8 array the CLIP encoder is fed.

    The official FaceID-Plus scripts (and diffusers' model-card recipe) read photos with
    OpenCV, so ``norm_crop`` returns a BGR array that the CLIP processor takes as RGB.
    ``"bgr"`` reproduces that; ``"rgb"`` feeds the crop in its true colours.
    """
    import numpy as np

    if channels not in FACE_CROP_CHANNELS:
        raise ConfigError(f"face_crop_channels must be one of {FACE_CROP_CHANNELS}, got "
                          f"{channels!r}.")
    rgb = np.asarray(crop)
    return np.ascontiguousarray(rgb[:, :, ::-1] if channels == "bgr" else rgb)


def faceid_inputs(analyzer, images, *, policy: str = "highest_score", with_crops: bool = False,
                  crop_channels: str = "bgr") -> tuple[torch.Tensor, list | None]:
    """Face embeddings (and aligned crops) of reference photos, one face per photo.

    ``analyzer``: a ``bf_core.faces.FaceAnalyzer`` (buffalo_l for IP-Adapter FaceID).
    ``policy``: which face of a photo with several (``"highest_score"`` is insightface's
    ``faces[0]``, what the FaceID model cards use; ``"error"`` refuses such a photo).
    Returns ``(normed (N, 512) float32, crops)``; ``crops`` are the 224 px aligned faces
    for FaceID-Plus as (224, 224, 3) uint8 arrays (``None`` unless ``with_crops``). Raises ``FaceNotFoundError`` naming
    the first photo without a face.
    """
    import numpy as np

    from bf_core.faces import align_face
    from bf_core.images import load_images

    photos = load_images(images)
    faces = analyzer.embed(photos, policy=policy)
    normed = torch.from_numpy(np.stack([face.normed_embedding for face in faces])).float()
    if not with_crops:
        return normed, None
    crops = [_crop_for_clip(align_face(photo, face.kps, FACE_CROP_SIZE), crop_channels)
             for photo, face in zip(photos, faces, strict=True)]
    return normed, crops


# ---------------------------------------------------------------------------------------
# The identity step
# ---------------------------------------------------------------------------------------

def _is_face_layer(layer) -> bool:
    from diffusers.models.embeddings import (
        IPAdapterFaceIDImageProjection,
        IPAdapterFaceIDPlusImageProjection,
    )

    return isinstance(layer, (IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection))


def is_faceid_plus_layer(layer) -> bool:
    """True for a FaceID-Plus projection, which reads ``clip_embeds`` module state."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    return isinstance(layer, IPAdapterFaceIDPlusImageProjection)


class EncoderSession(Protocol):
    """What the identity step reads from its session (``backend.IPAdapterSession``)."""

    backend: Any  # default_id_prompt, face_analyzer(model, root, providers)
    pipe: Any
    request: GenerationRequest
    options: dict[str, Any]  # the call's checked backend options
    layers: list  # the loaded adapters' projection modules, in load order
    variants: list[str]


class IPAdapterIdentityEncoder:
    """A person -> the per-adapter image embeds and T_id, their projected image tokens.

    The identity comes from exactly one of the person's ``id_images`` and diffusers' own
    call arguments ``ip_adapter_image`` / ``ip_adapter_image_embeds`` (backend options).
    FaceID-Plus also gets its ``clip_embeds`` module state here; the session captured that
    state when it opened, so it is put back when the call ends.
    """

    def __init__(self, session: EncoderSession):
        self.session = session

    def encode(self, person: Person) -> Identity:
        """Identity tokens (R, m * t, D) and their unconditional counterpart (None without
        CFG); ``state["image_embeds"]``: one tensor per adapter as the UNet receives it,
        (2R, m, ...) under CFG, else (R, m, ...), which every line passes, the baseline's too.
        """
        session = self.session
        embeds = self.image_embeds(person)
        tokens = projected_id_tokens(session.pipe, embeds)  # (E, m * t, D)
        negative = None
        if session.request.do_cfg:
            negative, tokens = tokens.chunk(2)
        # FaceID-Plus keeps its CLIP state on the module; each person's is kept here, so that
        # several people's rows can each get their own.
        clip_embeds = [layer.clip_embeds for layer in session.layers
                       if is_faceid_plus_layer(layer)]
        return Identity(person.id_prompt or session.backend.default_id_prompt, tokens, negative,
                        state={"image_embeds": embeds, "variants": session.variants,
                               "clip_embeds": clip_embeds})

    def identity_source(self, person: Person) -> str:
        """The one identity input given: ``id_images``, ``ip_adapter_image`` or
        ``ip_adapter_image_embeds``."""
        options = self.session.options
        given = [name for name, value in (("id_images", person.id_images),
                                          ("ip_adapter_image", options.get("ip_adapter_image")),
                                          ("ip_adapter_image_embeds",
                                           options.get("ip_adapter_image_embeds")))
                 if value is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ConfigError(f"an IP-Adapter pipeline needs exactly one identity input: id_images "
                              f"(reference photos), ip_adapter_image or ip_adapter_image_embeds; "
                              f"got {what}.")
        return given[0]

    def image_embeds(self, person: Person) -> list[torch.Tensor]:
        """Per-adapter embeds as the UNet receives them: (2R, m, ...) under CFG, else (R, m, ...)."""
        session = self.session
        request, options, layers = session.request, session.options, session.layers
        source = self.identity_source(person)
        common = dict(num_images_per_prompt=request.num_rows,
                      do_classifier_free_guidance=request.do_cfg, device=request.device)
        if source == "ip_adapter_image_embeds":
            return prepare_image_embeds(session.pipe, image_embeds=options[source], **common)
        if source == "ip_adapter_image":
            return prepare_image_embeds(session.pipe, images=options[source], **common)
        if not any(_is_face_layer(layer) for layer in layers):
            from bf_core.images import load_images

            photos = load_images(person.id_images)
            # One adapter: every photo is a reference of it (diffusers' nested list).
            per_adapter = [photos] if len(layers) == 1 else photos
            return prepare_image_embeds(session.pipe, images=per_adapter, **common)
        if len(layers) != 1:
            raise ConfigError("several IP-Adapters with a FaceID one among them cannot be fed from "
                              "id_images; pass ip_adapter_image_embeds (one tensor per adapter), "
                              "and set FaceID-Plus clip_embeds as diffusers' recipe does.")
        return [self.faceid_embeds(layers[0], person.id_images, common)]

    def faceid_embeds(self, layer, id_images: Any, common: dict) -> torch.Tensor:
        """FaceID embeds from the reference photos; FaceID-Plus also gets its CLIP state."""
        session = self.session
        options, request = session.options, session.request
        plus = is_faceid_plus_layer(layer)
        normed, crops = faceid_inputs(
            self.face_analyzer(), id_images,
            policy=options.get("face_policy", DEFAULT_FACE_POLICY), with_crops=plus,
            crop_channels=options.get("face_crop_channels", "bgr"))
        dtype = next(layer.parameters()).dtype
        stacked = faceid_image_embeds(normed, do_classifier_free_guidance=request.do_cfg,
                                      dtype=dtype, device=request.device)
        if plus:
            set_faceid_plus_clip_embeds(session.pipe, crops,
                                        shortcut=bool(options.get("shortcut", True)),
                                        shortcut_scale=float(options.get("s_scale", 1.0)),
                                        **common)
        return prepare_image_embeds(session.pipe, image_embeds=[stacked], **common)[0]

    def face_analyzer(self):
        """The caller's ``face_analyzer``, else the backend's, built once per setting."""
        options = self.session.options
        analyzer = options.get("face_analyzer")
        if analyzer is not None:
            return analyzer
        return self.session.backend.face_analyzer(options.get("face_model", DEFAULT_FACE_MODEL),
                                                  options.get("face_model_root"),
                                                  options.get("face_providers"))
