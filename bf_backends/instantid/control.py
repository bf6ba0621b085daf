"""IdentityNet's spatial input: where the keypoint image comes from, and how it is prepared.

``kps`` (a call option) chooses the keypoints:

* ``"reference"``: the official choice, the reference face's own keypoints drawn on the
  reference photo's canvas, then resized to the output size. It fixes a large, centred
  face, which is what pulls InstantID towards close-ups.
* ``"auto"`` (default with BeyondFacial on; our extension, not in the paper): at step M1,
  the last step before the ID line starts, faces are detected in the host's preview of
  the semantic line's x0 estimate (``SemanticPreview.person_faces``: the largest face in
  the person's region, or the face its ``region="auto"`` was found around), and the
  reference keypoints are moved into that face box by a similarity transform (uniform
  scale + shift, the face keeps its shape).
  Marker sizes scale with the move, so the drawing is the reference drawing, moved. An
  image whose preview shows no face gets no IdentityNet residuals (logged). With
  BeyondFacial off, ``"auto"`` means ``"reference"``: the baseline is the official method.
* ``"none"``: IdentityNet is not run; the ID line keeps the ID attention only.
* with several people, each ID line gets its own person's keypoints: ``"auto"`` as above
  per person; ``"reference"`` places a person with a region in the face that region
  implies (``region_face_box``), and one without a region as the official drawing.
* a (5, 2) array of keypoints in output pixels (drawn at the output size), or a keypoint
  image (PIL, resized to the output size like the official control image).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bf_backends.instantid.keypoints import (
    JOINT_RADIUS,
    LIMB_HALF_WIDTH,
    box_to_box_similarity,
    draw_kps,
    keypoints_into_box,
)
from bf_core.errors import ConfigError

logger = logging.getLogger(__name__)

KPS_MODES = ("auto", "reference", "none")


def check_kps_option(kps: Any) -> Any:
    """Validate the ``kps`` option; returns it (an array is converted to (5, 2) float64)."""
    if isinstance(kps, str):
        if kps not in KPS_MODES:
            raise ConfigError(f"kps must be one of {', '.join(KPS_MODES)}, a (5, 2) keypoint "
                              f"array in output pixels or a keypoint image; got {kps!r}.")
        return kps
    if hasattr(kps, "size") and hasattr(kps, "convert"):  # a PIL image
        return kps
    array = np.asarray(kps.detach().cpu() if isinstance(kps, torch.Tensor) else kps,
                       dtype=np.float64)
    if array.shape != (5, 2):
        raise ConfigError(f"kps as keypoints must have shape (5, 2) (x, y in output pixels: "
                          f"eyes, nose, mouth corners), got {array.shape}.")
    return array


def control_image_tensor(pipe: Any, image, height: int, width: int) -> torch.Tensor:
    """Keypoint image -> (1, 3, H, W) float32 in [0, 1], the official ControlNet preprocessing.

    diffusers' ``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``: sides floored
    to multiples of the VAE scale factor, Lanczos resize only when the size differs.
    """
    processor = getattr(pipe, "control_image_processor", None)
    if processor is None:
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True,
                                      do_normalize=False)
    return processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)


def reference_keypoint_image(reference) -> Any:
    """The official keypoint image: the reference face's keypoints on its photo's canvas."""
    if reference.kps is None:
        raise ConfigError("kps='reference' needs the keypoints of a reference photo, but only "
                          "face_embeds were given: pass id_images too, or kps='none', or your "
                          "own (5, 2) keypoints.")
    return draw_kps(reference.image_size, reference.kps)


def placed_keypoint_image(reference, target_box: Sequence[float], size: tuple[int, int]):
    """The reference keypoints moved into ``target_box`` and drawn on a ``size`` canvas.

    ``size`` is (width, height) of the output; ``target_box`` (x0, y0, x1, y1) in output
    pixels. The reference face box fits centred inside the target box; the joint radius
    and limb width are scaled by the same factor, so small faces get small markers.
    """
    scale = float(box_to_box_similarity(reference.bbox, target_box)[0, 0])
    moved = keypoints_into_box(reference.kps, target_box, source_box=reference.bbox)
    return draw_kps(size, moved, joint_radius=max(1, round(JOINT_RADIUS * scale)),
                    limb_half_width=max(1, round(LIMB_HALF_WIDTH * scale)))


def placed_keypoint_images(reference, face_boxes: Sequence[Any], size: tuple[int, int],
                           step: int, person: int | None = None) -> list:
    """Per output image: the reference keypoints placed in that image's face box of the
    step-``step`` preview (``placed_keypoint_image``), or None where no face was found
    (IdentityNet is then off for that image's rows). ``person`` only labels the log."""
    who = "" if person is None else f" (person {person})"
    images = []
    for row, box in enumerate(face_boxes):
        if box is None:
            logger.info("kps='auto': no face in the step-%d preview of image %d%s; IdentityNet "
                        "is off for this image.", step, row, who)
            images.append(None)
        else:
            logger.info("kps='auto': image %d%s, face box %s in the step-%d preview.", row, who,
                        [round(float(v), 1) for v in box], step)
            images.append(placed_keypoint_image(reference, box, size))
    return images


def region_face_box(region_box: Sequence[float], size: tuple[int, int], scale: float
                    ) -> tuple[float, float, float, float]:
    """The face a region implies for ``kps="reference"`` with several people: the region's
    box (fractions) shrunk about its centre by ``scale`` (``auto_region_scale``: a region
    found around a face is that face scaled by it), in output pixels of ``size``."""
    width, height = size
    x0, y0, x1, y1 = region_box
    cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
    half_w, half_h = (x1 - x0) * width / scale / 2, (y1 - y0) * height / scale / 2
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
