"""InfiniteYou's identity step: reference photos -> an ArcFace embedding -> T_id.

The official pipeline detects faces with insightface's antelopev2 (at 640, 320, then 160
pixels), takes the largest, aligns it with ``norm_crop`` and embeds the 112 x 112 crop with
facexlib's ArcFace (IR-SE50), whose output is L2-normalised. By default the embedding here
is antelopev2's own recogniser's, L2-normalised (``Face.normed_embedding``): the same
detection, alignment and normalisation, another ArcFace network. ``face_recognizer``
restores the official network: any callable taking the aligned crop as the official code
feeds facexlib, a (1, 3, 112, 112) BGR tensor in [-1, 1], and returning (1, 512) (e.g.
``facexlib.recognition.init_recognition_model("arcface")``). ``face_embeds`` skips the
analysis. The embeddings (N, 512) go through the Resampler as one (1, N, 512) input (the
official reshape), giving T_id (1, 8, D).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bf_backends.infiniteyou.loader import FACE_EMBEDDING_DIM
from bf_backends.instantid.encoder import ReferenceFace
from bf_core.errors import ConfigError, FaceNotFoundError
from bf_core.images import as_image_list
from bf_core.records import Identity, Person


def aligned_face_tensor(image: Any, kps: np.ndarray) -> torch.Tensor:
    """The official recogniser input: the face aligned to the ArcFace template at 112 px,
    BGR, (1, 3, 112, 112) float32 in [-1, 1]."""
    from bf_core.faces import align_face

    rgb = np.asarray(align_face(image, kps, size=112), dtype=np.float32)
    bgr = torch.from_numpy(rgb[..., ::-1].copy()).permute(2, 0, 1)[None] / 255.0
    return 2 * bgr - 1


def recognise(recognizer: Callable[[torch.Tensor], Any], image: Any, kps: np.ndarray
              ) -> np.ndarray:
    """One (512,) float32 embedding from a ``face_recognizer`` callable."""
    crop = aligned_face_tensor(image, kps)
    parameter = next(iter(getattr(recognizer, "parameters", lambda: iter(()))()), None)
    if parameter is not None:
        crop = crop.to(parameter.device, parameter.dtype)
    with torch.no_grad():
        output = recognizer(crop)
    embedding = np.asarray(output.detach().float().cpu() if isinstance(output, torch.Tensor)
                           else output, dtype=np.float32).reshape(-1)
    if embedding.shape != (FACE_EMBEDDING_DIM,):
        raise ConfigError(f"face_recognizer must return one {FACE_EMBEDDING_DIM}-d embedding per "
                          f"face, got {embedding.size} values.")
    return embedding


def _given_embeddings(given: Any) -> np.ndarray:
    array = np.asarray(given.detach().float().cpu() if isinstance(given, torch.Tensor) else given,
                       dtype=np.float32)
    if array.size == 0 or array.size % FACE_EMBEDDING_DIM:
        raise ConfigError(f"face_embeds must be (N, {FACE_EMBEDDING_DIM}) ArcFace embeddings, got "
                          f"shape {array.shape}.")
    return array.reshape(-1, FACE_EMBEDDING_DIM)


def analyse_references(id_images: Sequence[Any] | None, options: dict[str, Any],
                       analyzer: Callable[[], Any]) -> ReferenceFace:
    """Reference photos (or ``face_embeds``) -> ``ReferenceFace`` with (N, 512) embeddings.

    Each photo gives its largest face (``face_policy``); its embedding is the
    ``face_recognizer``'s on the aligned crop, else the analyser's normalised one. The
    keypoints and box are the first photo's (for ``kps="reference"``/``"auto"``).
    ``analyzer`` returns the face analyser; it is only called when there are photos.
    """
    faces = []
    images = []
    if id_images:
        from bf_core.images import load_images

        images = load_images(list(id_images))  # named errors for unreadable or tiny photos
        faces = analyzer().embed(list(id_images), policy=options.get("face_policy", "largest"))
    given, recognizer = options.get("face_embeds"), options.get("face_recognizer")
    if given is not None:
        embeds = _given_embeddings(given)
    elif recognizer is not None and faces:
        embeds = np.stack([recognise(recognizer, image, face.kps)
                           for image, face in zip(images, faces, strict=True)])
    elif faces:
        embeds = np.stack([face.normed_embedding for face in faces]).astype(np.float32)
    else:
        raise FaceNotFoundError(
            "InfiniteYou needs a face: pass id_images=[photo, ...] (a clear photo of the "
            "person) or face_embeds=<(N, 512) ArcFace embeddings>.")
    if not faces:
        return ReferenceFace(embeds)
    return ReferenceFace(embeds, faces[0].kps.copy(), faces[0].bbox.copy(), images[0].size)


def id_tokens(resampler: torch.nn.Module, embeds: np.ndarray, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """(N, 512) embeddings -> T_id (1, 8, D) in ``dtype`` on ``device``."""
    parameter = next(resampler.parameters())
    faces = torch.from_numpy(embeds).reshape(1, -1, FACE_EMBEDDING_DIM)
    with torch.no_grad():
        tokens = resampler(faces.to(parameter.device, parameter.dtype))
    return tokens.to(device=device, dtype=dtype)


class InfiniteYouEncoder:
    """A person's reference photos (or ``face_embeds``) -> T_id, the Resampler's 8 tokens.

    ``Identity.negative_tokens`` are zeros: the official negative pass carries no identity
    at all (no InfuseNet), and zeros are what IdAP's negative branch then prepends.
    ``Identity.state["reference"]`` is the ``ReferenceFace`` whose keypoints ``kps``
    draws.
    """

    def __init__(self, session: Any):
        # The call's InfiniteYou session: its options, parts, analyser, request and backend.
        self.session = session

    def encode(self, person: Person) -> Identity:
        session = self.session
        reference = analyse_references(as_image_list(person.id_images), session.options,
                                       session.reference_analyzer)
        infusenet = session.parts.infusenet
        tokens = id_tokens(session.parts.resampler, reference.embeds, infusenet.dtype,
                           session.request.device or infusenet.device)
        return Identity(person.id_prompt or session.backend.default_id_prompt, tokens,
                        negative_tokens=torch.zeros_like(tokens), state={"reference": reference})
