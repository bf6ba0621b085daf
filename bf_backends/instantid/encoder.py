"""InstantID's identity step: reference photos -> the 16 ID tokens and the reference face.

The encoder turns reference photos into the raw 512-d antelopev2 embedding of the largest
face (not L2-normalised) plus its keypoints, and projects ``[0; embedding]`` through the
Resampler in one call, as the official pipeline does: the negative ID tokens are the
projection of a zero embedding, not zero tokens. Which Resampler, and which face analyser,
the pipeline carries is the loader's business (``loader.find_instantid_parts``,
``loader.build_face_analyzer``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bf_backends.instantid.loader import FACE_EMBEDDING_DIM
from bf_core.errors import FaceNotFoundError
from bf_core.images import as_image_list
from bf_core.records import Identity, Person


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
        from bf_core.images import load_images

        load_images(list(id_images))  # named errors for unreadable or too small photos
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
    """A person's reference photos (or the ``face_embeds`` option) -> T_id, the 16 projected
    ID tokens (1, 16, D).

    ``Identity.negative_tokens`` is the projection of a zero embedding (the official
    negative); ``Identity.state["reference"]`` is the ``ReferenceFace``, whose keypoints the
    baseline and ``kps="reference"`` / ``"auto"`` draw.
    """

    def __init__(self, session: Any):
        # The call's InstantID session: its options, parts, analyser, request and backend.
        self.session = session

    def encode(self, person: Person) -> Identity:
        session = self.session
        reference = analyse_references(as_image_list(person.id_images), session.options,
                                       session.reference_analyzer)
        unet = session.pipe.unet
        request = session.request
        tokens, negative = project_faces(
            session.parts.projection, torch.from_numpy(reference.embeds), request.do_cfg,
            unet.dtype, request.device or unet.device)
        return Identity(person.id_prompt or session.backend.default_id_prompt, tokens,
                        negative_tokens=negative, state={"reference": reference})
