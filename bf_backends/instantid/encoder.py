"""The InstantID identity encoder and the pipeline parts it reads.

Two ways a pipeline can carry InstantID (docs/backends/instantid.md), told apart by attributes
only, never by importing InstantID's code:

* ``"native"``: diffusers' ``load_ip_adapter`` put the Resampler on the UNet
  (``unet.encoder_hid_proj.image_projection_layers[0]``, 512 in, 16 queries) and installed
  ``IPAdapterAttnProcessor2_0`` (``scale`` a list); IdentityNet is ``pipe.controlnet``.
  This is what ``load_instantid_pipeline`` and ``tiny_pipeline`` build.
* ``"official"``: the official ``StableDiffusionXLInstantIDPipeline`` after
  ``load_ip_adapter_instantid``: the Resampler is ``pipe.image_proj_model``, the UNet has
  processors with one ``nn.Linear`` ``to_k_ip``, an int ``num_tokens`` of 16 and a float
  ``scale``, and they read the last 16 context tokens as ID tokens.

The encoder turns reference photos into the raw 512-d antelopev2 embedding of the largest
face (not L2-normalised) plus its keypoints, and projects ``[0; embedding]`` through the
Resampler in one call, as the official pipeline does: the negative ID tokens are the
projection of a zero embedding, not zero tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bf_backends.instantid.loader import (
    FACE_EMBEDDING_DIM,
    ID_TOKEN_COUNT,
    find_instantid_projection,
)
from bf_core.errors import ConfigError, FaceNotFoundError
from bf_core.protocols import GenerationRequest, Identity

logger = logging.getLogger(__name__)

DEFAULT_FACE_MODEL = "antelopev2"


# --------------------------------------------------------------------------- pipeline parts


def _official_projection(pipe: Any, cross_attention_dim: int):
    """``pipe.image_proj_model`` if it is InstantID's Resampler (512 in, 16 x 1280, D out)."""
    model = getattr(pipe, "image_proj_model", None)
    proj_in = getattr(model, "proj_in", None)
    latents = getattr(model, "latents", None)
    proj_out = getattr(model, "proj_out", None)
    if not all(isinstance(m, torch.nn.Module) for m in (model, proj_in, proj_out)) \
            or not isinstance(latents, torch.Tensor):
        return None
    if getattr(proj_in, "in_features", None) != FACE_EMBEDDING_DIM or latents.ndim != 3 \
            or latents.shape[1] != ID_TOKEN_COUNT \
            or getattr(proj_out, "out_features", None) != cross_attention_dim:
        return None
    return model


def _official_ip_processors(unet) -> list:
    """Official-style IP processors: a single Linear ``to_k_ip`` and ``num_tokens == 16``."""
    return [proc for proc in unet.attn_processors.values()
            if isinstance(getattr(proc, "to_k_ip", None), torch.nn.Linear)
            and getattr(proc, "num_tokens", None) == ID_TOKEN_COUNT
            and isinstance(getattr(proc, "scale", None), (int, float))]


def _native_ip_processors(unet) -> list:
    return [proc for proc in unet.attn_processors.values()
            if hasattr(proc, "to_k_ip") and isinstance(getattr(proc, "scale", None), list)]


def _controlnet_of(pipe: Any):
    """IdentityNet: ``pipe.controlnet`` or, for a MultiControlNet, its only net."""
    controlnet = getattr(pipe, "controlnet", None)
    nets = getattr(controlnet, "nets", None)
    if nets is not None:
        if len(nets) != 1:
            raise ConfigError(
                f"the pipeline's MultiControlNet holds {len(nets)} ControlNets; the InstantID "
                "backend drives IdentityNet only. Build the pipeline with IdentityNet alone "
                "(extra pose/canny/depth ControlNets are not supported yet).")
        controlnet = nets[0]
    if controlnet is None or not hasattr(controlnet, "controlnet_cond_embedding"):
        return None
    return controlnet


@dataclass
class InstantIDParts:
    """What the backend uses from a recognised pipeline.

    form: ``"native"`` or ``"official"`` (module docstring). projection: the Resampler,
    (B, N, 512) -> (B, 16, D). controlnet: IdentityNet. ip_processors: the cross-attention
    processors whose ``scale`` switches the ID attention.
    """

    form: str
    projection: torch.nn.Module
    controlnet: torch.nn.Module
    ip_processors: list


def find_instantid_parts(pipe: Any) -> InstantIDParts | None:
    """The InstantID parts of ``pipe``, or None when it is not set up for InstantID."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return None
    controlnet = _controlnet_of(pipe)
    if controlnet is None:
        return None
    native = find_instantid_projection(unet)
    if native is not None:
        processors = _native_ip_processors(unet)
        return InstantIDParts("native", native, controlnet, processors) if processors else None
    official = _official_projection(pipe, unet.config.cross_attention_dim)
    if official is not None:
        processors = _official_ip_processors(unet)
        return InstantIDParts("official", official, controlnet, processors) if processors else None
    return None


def project_faces(projection: torch.nn.Module, face_embeds: torch.Tensor, do_cfg: bool,
                  dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ID tokens of one identity: (positive (1, 16, D), negative (1, 16, D) or None).

    ``face_embeds`` (N, 512) are read as N input tokens of one face set (the official
    reshape to (1, N, 512)). Under CFG the Resampler runs once on ``[0; emb]`` (2, N, 512),
    exactly the official batch, so both halves round as they do there.
    """
    param = next(projection.parameters())
    faces = face_embeds.reshape(1, -1, FACE_EMBEDDING_DIM).to(param.device, param.dtype)
    if do_cfg:
        faces = torch.cat([torch.zeros_like(faces), faces])
    tokens = projection(faces).to(device=device, dtype=dtype)
    if do_cfg:
        negative, positive = tokens.chunk(2)
        return positive, negative
    return tokens, None


# --------------------------------------------------------------------------- faces


@dataclass
class ReferenceFace:
    """The face the identity comes from, in pixels of its reference image.

    embeds: (N, 512) float32 raw embeddings, one per reference image. kps: (5, 2) and
    bbox: (4,) of the first reference image's chosen face; image_size: its (width, height).
    kps/bbox/image_size are None when only embeddings were given.
    """

    embeds: np.ndarray
    kps: np.ndarray | None = None
    bbox: np.ndarray | None = None
    image_size: tuple[int, int] | None = None


def build_face_analyzer(options: dict[str, Any]):
    """The analyser for reference photos: ``face_analyzer`` if given, else antelopev2.

    Options: ``face_model`` (pack name or folder, default ``"antelopev2"``),
    ``face_model_root`` and ``face_providers`` (insightface root and onnxruntime providers).
    The detector runs at 640 x 640, the size every official script prepares.
    """
    if options.get("face_analyzer") is not None:
        return options["face_analyzer"]
    from bf_core.faces import FaceAnalyzer

    return FaceAnalyzer(options.get("face_model", DEFAULT_FACE_MODEL),
                        root=options.get("face_model_root"),
                        providers=options.get("face_providers"), det_size=(640, 640))


def analyse_references(id_images: Sequence[Any] | None, options: dict[str, Any],
                       analyzer: Callable[[], Any]) -> ReferenceFace:
    """Reference photos (or ``face_embeds``) -> ``ReferenceFace``.

    Each photo gives the face chosen by ``face_policy`` (default ``"largest"``, InstantID's
    rule); a photo without a face raises ``FaceNotFoundError`` naming it. ``face_embeds``
    (N, 512) replaces the embeddings (the keypoints still come from the first photo, if any).
    ``analyzer`` returns the face analyser and is only called when there are photos.
    """
    given = options.get("face_embeds")
    faces = []
    if id_images:
        faces = analyzer().embed(list(id_images), policy=options.get("face_policy", "largest"))
    if given is not None:
        embeds = np.asarray(given.detach().cpu() if isinstance(given, torch.Tensor) else given,
                            dtype=np.float32).reshape(-1, FACE_EMBEDDING_DIM)
    elif faces:
        embeds = np.stack([face.embedding for face in faces]).astype(np.float32)
    else:
        raise FaceNotFoundError(
            "InstantID needs a face: pass id_images=[photo, ...] (a clear photo of the person) "
            "or face_embeds=<(N, 512) raw antelopev2 embeddings>.")
    if not faces:
        return ReferenceFace(embeds)
    from bf_core.images import load_image

    first = load_image(id_images[0], index=0)
    return ReferenceFace(embeds, faces[0].kps.copy(), faces[0].bbox.copy(), first.size)


class InstantIDEncoder:
    """Reference photos -> T_id = the 16 projected ID tokens (1, 16, D).

    ``Identity.negative_tokens`` is the projection of a zero embedding (the official
    negative); ``Identity.state`` holds ``reference`` (a ``ReferenceFace``). The result is
    computed once per session and cached, because the baseline line needs it too.
    """

    def __init__(self, session: Any):
        self.session = session
        self._identity: Identity | None = None

    def encode(self, id_images: Sequence[Any] | None, id_prompt: str,
               request: GenerationRequest) -> Identity:
        if self._identity is None:
            session = self.session
            images = id_images if id_images is None or isinstance(id_images, (list, tuple)) \
                else [id_images]
            reference = analyse_references(images, session.options, session.reference_analyzer)
            unet = session.pipe.unet
            tokens, negative = project_faces(
                session.parts.projection, torch.from_numpy(reference.embeds), request.do_cfg,
                unet.dtype, request.device or unet.device)
            self._identity = Identity(tokens=tokens, negative_tokens=negative,
                                      state={"reference": reference})
        return self._identity
