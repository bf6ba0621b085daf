"""Reference-image preprocessing for the PhotoMaker CLIP tower.

The reference pixels are those of transformers' PIL-based ``CLIPImageProcessor`` with
default settings (``CLIPImageProcessorPil`` on transformers 5). The torchvision backend
that transformers 5 prefers when torchvision is installed is up to 0.015 off, so the
recipe is written out here instead: no torchvision, same numbers on every version.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bf_core.errors import ImageInputError

#: OpenAI CLIP normalisation constants (RGB).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to ``short_side``, aspect kept.

    The long side is truncated, not rounded (300 x 451 -> 224 x 336), as the reference
    processor does; rounding shifts the crop by a pixel.
    """
    if width <= height:
        return short_side, short_side * height // width
    return short_side * width // height, short_side


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``size`` square, offsets floored."""
    left = (width - size) // 2
    top = (height - size) // 2
    return left, top, left + size, top + size


def _to_rgb_image(image, index: int):
    """A PIL RGB image from a PIL image or an (H, W, 3) uint8 array."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageInputError(
                f"reference image {index} is an array of shape {image.shape} and dtype "
                f"{image.dtype}; pass (H, W, 3) uint8 RGB arrays or PIL images.")
        image = Image.fromarray(image[..., :3])
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"reference image {index} is a {type(image).__name__}; pass PIL "
                              "images or (H, W, 3) uint8 RGB arrays.")
    # A plain convert drops alpha without compositing, as diffusers' load_image does.
    return image.convert("RGB")


def preprocess_id_images(images: Sequence, size: int = 224) -> torch.Tensor:
    """CLIP pixel values of the whole reference images, in the caller's order.

    images: N PIL images (or (H, W, 3) uint8 RGB arrays) -> (N, 3, size, size) float32.
    Resize (bicubic, short side ``size``), centre crop, scale to [0, 1], normalise with
    the CLIP mean and std. Apply EXIF orientation before calling if the files need it.
    """
    from PIL import Image

    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ImageInputError("no reference images were given; pass at least one image of "
                              "the person.")
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    batch = []
    for index, image in enumerate(images):
        rgb = _to_rgb_image(image, index)
        new_size = resized_size(*rgb.size, size)
        resized = rgb.resize(new_size, resample=Image.Resampling.BICUBIC)
        cropped = resized.crop(center_crop_box(*new_size, size))
        pixels = np.asarray(cropped, dtype=np.float32) / 255.0
        batch.append(((pixels - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(batch))
