"""InfuseNet's spatial input: which control image a line gets, and how it is encoded.

The official pipeline gives InfuseNet an all-black image unless the caller passes a
``control_image`` (a pose photo: it is resized and padded to the output size, its largest
face detected, and that face's five keypoints drawn on a black canvas). The ``kps`` option
chooses for the ID lines (``bf_backends.instantid``'s drawing and placement code):

* ``"none"`` (default): the official black canvas;
* ``"reference"``: the reference face's keypoints, placed as the official pipeline would
  place them had the reference photo been the pose photo (the same resize and pad, applied
  to the keypoints found on the reference);
* ``"auto"`` (our extension): at step M1 the reference keypoints are moved into the
  person's face of the semantic line's preview (``SemanticPreview.person_faces``); an
  image whose preview shows no face keeps the black canvas;
* (5, 2) keypoints in output pixels, or a keypoint image.

The chosen image is encoded like the official pipeline encodes it: preprocessed to
[-1, 1] at the output size, one copy per output image, a sample of the VAE posterior,
shifted and scaled like the latents, 2x2-packed to (R, N, 64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bf_core.errors import FaceNotFoundError


def black_canvas(size: tuple[int, int]):
    """The official control image without a pose photo: black, ``size`` (width, height)."""
    from PIL import Image

    width, height = size
    return Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))


def resize_and_pad_geometry(source_size: tuple[int, int], size: tuple[int, int]
                            ) -> tuple[tuple[int, int], tuple[int, int]]:
    """The official resize-and-pad of a ``source_size`` picture onto a ``size`` canvas:
    ((new width, new height), (left, top) offset). The shorter side of the canvas is
    filled; the other side is centred (and cropped when the picture is the longer one)."""
    (source_w, source_h), (width, height) = source_size, size
    if width <= height:
        new = (width, int(width * (source_h / source_w)))
    else:
        new = (int(height * (source_w / source_h)), height)
    return new, ((width - new[0]) // 2, (height - new[1]) // 2)


def resize_and_pad(image, size: tuple[int, int]):
    """The picture resized and pasted centred on a white ``size`` canvas (official)."""
    from PIL import Image

    new, offset = resize_and_pad_geometry(image.size, size)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image.convert("RGB").resize(new, Image.LANCZOS), offset)
    return canvas


def padded_keypoints(kps, source_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(5, 2) keypoints of a ``source_size`` picture -> where they land after the official
    resize-and-pad onto ``size``. Returns (5, 2) float64."""
    (new_w, new_h), (left, top) = resize_and_pad_geometry(source_size, size)
    scale = np.array([new_w / source_size[0], new_h / source_size[1]])
    return np.asarray(kps, dtype=np.float64) * scale + np.array([left, top])


def reference_keypoint_image(reference, size: tuple[int, int]):
    """``kps="reference"``: the reference face's keypoints drawn where the official
    resize-and-pad of the reference photo puts them, on a ``size`` canvas."""
    from bf_backends.instantid.keypoints import draw_kps

    return draw_kps(size, padded_keypoints(reference.kps, reference.image_size, size))


def pose_keypoint_image(control_image, size: tuple[int, int], analyzer, policy: str = "largest"):
    """The official ``control_image`` path: the pose photo resized and padded to ``size``,
    its largest face's keypoints drawn on a black ``size`` canvas."""
    from bf_backends.instantid.keypoints import draw_kps
    from bf_core.faces import select_face
    from bf_core.images import load_image

    padded = resize_and_pad(load_image(control_image), size)
    faces = analyzer.detect(padded)
    if not faces:
        raise FaceNotFoundError("no face was found in control_image (after resizing and padding "
                                f"it to {size[0]}x{size[1]}); pass a photo with a visible face, "
                                "or leave control_image out for the black canvas.")
    return draw_kps(size, select_face(faces, policy, image_label="control_image").kps)


def encode_control_images(pipe: Any, images: Sequence[Any], size: tuple[int, int], rows: int,
                          generator: Any, device: torch.device) -> torch.Tensor:
    """Control images -> packed control latents (rows, N, 64), as the official pipeline
    encodes them: ``image_processor.preprocess`` to ``size`` (width, height) in [-1, 1],
    one image repeated to ``rows`` (or one per row), a VAE posterior sample drawn with
    ``generator``, then (z - shift) * scale and the 2x2 packing of the latents.

    images: one image for every row, or ``rows`` images.
    """
    width, height = size
    vae = pipe.vae
    pixels = torch.cat([pipe.image_processor.preprocess(image, height=height, width=width)
                        for image in images])
    if pixels.shape[0] == 1:
        pixels = pixels.repeat_interleave(rows, dim=0)
    pixels = pixels.to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    channels, latent_h, latent_w = latents.shape[1:]
    return pipe._pack_latents(latents, rows, channels, latent_h, latent_w)
