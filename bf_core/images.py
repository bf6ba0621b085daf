"""Reading reference images from whatever a caller has at hand.

Every backend and the benchmark receive reference images as PIL images, paths, numpy
arrays or torch tensors. This module turns each of them into one thing, an RGB
``PIL.Image.Image``, the way the official identity pipelines see them: EXIF orientation
applied and a plain ``convert("RGB")`` (alpha dropped, not composited), as diffusers'
``load_image`` does. Anything it cannot read becomes an ``ImageInputError`` that names
the input (its position in the list and its path) and says what is accepted.

torch is never imported here: a tensor can only exist if the caller imported torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bf_core.errors import ImageInputError

ACCEPTED = (
    "a PIL image, a path to an image file (str or pathlib.Path), a numpy array "
    "(H x W x 3/4 or H x W, uint8 or float in [0, 1]) or a torch tensor "
    "(3 x H x W or H x W x 3, float in [0, 1] or uint8)"
)
_CHANNEL_COUNTS = (1, 3, 4)
# Float input a hair outside [0, 1] is rounding noise from a VAE decode or a resize,
# not a caller using another range (those are off by whole units, e.g. 0..255 or -1..1).
_RANGE_TOLERANCE = 1e-3


def load_image(image: Any, *, index: int | None = None) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    ``index`` is the position of the image in the caller's list; it only appears in
    error messages. Raises ``ImageInputError`` for a missing, unreadable or truncated
    file, an unsupported object, or an array of the wrong shape, dtype or range.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image, _describe(index, None))
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise ImageInputError(
            f"{_describe(index, None)} is a URL ({image}); this library never downloads. "
            "Save the image to a local file and pass its path."
        )
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image), index)
    if isinstance(image, np.ndarray):
        return _from_array(image, _describe(index, None), layout="HWC")
    if _is_torch_tensor(image):
        return _from_array(_tensor_to_numpy(image), _describe(index, None), layout="CHW")
    raise ImageInputError(
        f"{_describe(index, None)} is a {type(image).__name__}, which is not an image. "
        f"Pass {ACCEPTED}."
    )


#: The smallest side of a reference photo: below it no face can be seen, and the encoders
#: (224 px CLIP, 112 px ArcFace crops) would only upsample noise.
MIN_REFERENCE_SIDE = 32


def load_images(images: Any) -> list[Image.Image]:
    """Return one reference image or a list/tuple of them as a list of RGB PIL images.

    A single image (any kind ``load_image`` accepts) gives a list of one. An empty list
    is an error: every identity needs at least one reference image; so is an image whose
    shorter side is below ``MIN_REFERENCE_SIDE`` pixels.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageInputError(
                "no reference images were given (an empty list). Pass at least one "
                f"image: {ACCEPTED}."
            )
        items = list(enumerate(images))
    else:
        items = [(0, images)]
    loaded = [load_image(item, index=i) for i, item in items]
    for index, image in enumerate(loaded):
        if min(image.size) < MIN_REFERENCE_SIDE:
            raise ImageInputError(
                f"{_describe(index, None)} is {image.width} x {image.height} pixels; a reference "
                f"photo needs at least {MIN_REFERENCE_SIDE} pixels on its shorter side (a "
                "face of 100 pixels or more works best).")
    return loaded


def _describe(index: int | None, path: Path | None) -> str:
    label = "reference image" if index is None else f"reference image {index}"
    return f"{label} ({path})" if path is not None else label


def _open_path(path: Path, index: int | None) -> Image.Image:
    label = _describe(index, path)
    if not path.exists():
        raise ImageInputError(f"{label}: no such file. Check the path, or pass {ACCEPTED}.")
    if not path.is_file():
        raise ImageInputError(f"{label} is a folder, not an image file. Pass the path of "
                              "one image file per reference image.")
    try:
        with Image.open(path) as opened:
            # load() inside the with-block: PIL reads lazily, and a truncated file only
            # fails when the pixel data is decoded.
            opened.load()
            return _to_rgb(opened, label)
    except UnidentifiedImageError as exc:
        raise ImageInputError(
            f"{label} is not an image file PIL can read (unknown or unsupported format, or "
            "not image data at all). Convert it to PNG or JPEG."
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or damaged data as OSError, some decoders as
        # SyntaxError/ValueError.
        raise ImageInputError(
            f"{label} could not be decoded ({exc}); the file is truncated or corrupt. "
            "Re-export or re-download it."
        ) from exc


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Upright RGB copy; the caller's image is never returned or modified."""
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"{label} is empty ({image.width} x {image.height} pixels).")
    # Phone photos store rotation in EXIF; the official pipelines apply it before
    # anything sees the pixels, so the face detector gets the upright face.
    # Both calls return new images, so the result never aliases the caller's object.
    return ImageOps.exif_transpose(image).convert("RGB")


def _from_array(array: np.ndarray, label: str, layout: str) -> Image.Image:
    """(H, W), (H, W, C) or, for tensors, (C, H, W) -> RGB PIL image."""
    hwc = _as_hwc(array, label, layout)
    pixels = _as_uint8(hwc, label)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    mode = "RGBA" if pixels.shape[2] == 4 else "RGB"
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode).convert("RGB")


def _as_hwc(array: np.ndarray, label: str, layout: str) -> np.ndarray:
    """Return an (H, W, C) view of a 2-D or 3-D array; C in 1, 3, 4."""
    if array.ndim == 2:
        hwc = array[:, :, None]
    elif array.ndim == 3:
        channels_last = array.shape[2] in _CHANNEL_COUNTS
        channels_first = array.shape[0] in _CHANNEL_COUNTS
        # Tensors are channels-first by convention, numpy images channels-last; only
        # when the conventional axis cannot be channels do we try the other one.
        if channels_first and (layout == "CHW" or not channels_last):
            hwc = np.moveaxis(array, 0, 2)
        elif channels_last:
            hwc = array
        else:
            raise ImageInputError(
                f"{label} has shape {tuple(array.shape)}: neither its first nor its last "
                f"axis has 1, 3 or 4 channels. Pass {ACCEPTED}."
            )
    else:
        hint = (" For a batch, pass a list of images instead." if array.ndim == 4 else "")
        raise ImageInputError(
            f"{label} has {array.ndim} dimensions (shape {tuple(array.shape)}); an image "
            f"has 2 (grey) or 3.{hint} Pass {ACCEPTED}."
        )
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise ImageInputError(f"{label} is empty (shape {tuple(array.shape)}).")
    return hwc


def _as_uint8(array: np.ndarray, label: str) -> np.ndarray:
    """uint8 passes through; floats in [0, 1] are scaled and rounded like diffusers."""
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageInputError(
            f"{label} has dtype {array.dtype}; accepted are uint8 (0..255) and float "
            "(0..1). Convert it, e.g. array.astype(numpy.uint8) for 0..255 integers."
        )
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise ImageInputError(f"{label} contains NaN or infinite values; pass a finite "
                              "image in [0, 1].")
    low, high = float(values.min()), float(values.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ImageInputError(
            f"{label} is a float image with values in [{low:.3g}, {high:.3g}]; float "
            "images must lie in [0, 1]. Map [-1, 1] images with (x + 1) / 2, or pass "
            "0..255 values as uint8."
        )
    return (np.clip(values, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    data = tensor.detach().to("cpu")
    # bfloat16/float16 have no (or no exact) numpy counterpart for the range check.
    if data.is_floating_point():
        data = data.to(torch.float32)
    return data.numpy()


__all__ = ["load_image", "load_images"]


def as_image_list(given: Any) -> list | None:
    """A person's ``id_images`` as a list: None stays None, one image becomes a list of one."""
    if given is None or isinstance(given, list):
        return given
    return list(given) if isinstance(given, tuple) else [given]
