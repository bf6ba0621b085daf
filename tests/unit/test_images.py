"""Reference image loading: every accepted kind, and a named error for every bad one."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bf_core.errors import ImageInputError
from bf_core.images import load_image, load_images


@pytest.fixture
def pixels():
    """(6, 8, 3) uint8 with distinct values, so a transposed or swapped image shows."""
    return np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)


def _as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_pil_rgb_round_trips_and_is_a_copy(pixels):
    original = Image.fromarray(pixels)
    loaded = load_image(original)
    assert loaded is not original
    np.testing.assert_array_equal(_as_array(loaded), pixels)


def test_pil_rgba_drops_alpha_without_compositing(pixels):
    alpha = np.zeros((6, 8, 1), dtype=np.uint8)  # fully transparent
    rgba = Image.fromarray(np.concatenate([pixels, alpha], axis=2), mode="RGBA")
    # The official flow is a plain convert("RGB"): colours kept, not blended with white.
    np.testing.assert_array_equal(_as_array(load_image(rgba)), pixels)


def test_exif_orientation_is_applied(tmp_path, pixels):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    assert load_image(path).size == (6, 8)  # width and height swapped


@pytest.mark.parametrize("as_str", [True, False])
def test_path_png(tmp_path, pixels, as_str):
    path = tmp_path / "face.png"
    Image.fromarray(pixels).save(path)
    loaded = load_image(str(path) if as_str else path)
    np.testing.assert_array_equal(_as_array(loaded), pixels)


def test_numpy_uint8_hwc_and_grey(pixels):
    np.testing.assert_array_equal(_as_array(load_image(pixels)), pixels)
    grey = pixels[:, :, 0]
    np.testing.assert_array_equal(_as_array(load_image(grey)), np.stack([grey] * 3, axis=2))


def test_numpy_float_in_unit_range_is_scaled_and_rounded(pixels):
    loaded = load_image(pixels.astype(np.float64) / 255.0)
    np.testing.assert_array_equal(_as_array(loaded), pixels)


def test_torch_chw_and_hwc_float_and_uint8(pixels):
    hwc = torch.from_numpy(pixels)
    chw = hwc.permute(2, 0, 1)
    for tensor in (chw.float() / 255, hwc.float() / 255, chw, chw.to(torch.bfloat16) / 255):
        loaded = _as_array(load_image(tensor))
        # bfloat16 keeps 8 bits of mantissa: allow one grey level.
        assert np.abs(loaded.astype(int) - pixels).max() <= 1


def test_load_images_single_and_list(pixels):
    photo = np.tile(pixels, (6, 5, 1))  # 40 x 36: above the smallest reference side
    assert len(load_images(photo)) == 1
    images = load_images([photo, Image.fromarray(photo)])
    assert [im.size for im in images] == [(40, 36), (40, 36)]


def test_a_reference_too_small_to_hold_a_face_is_refused(pixels):
    from bf_core.images import MIN_REFERENCE_SIDE

    assert load_image(pixels).size == (8, 6)  # one image may be anything: a mask, a crop
    with pytest.raises(ImageInputError, match=rf"reference image 1 is 1 x 1 pixels.*at least "
                                              rf"{MIN_REFERENCE_SIDE} pixels"):
        load_images([np.tile(pixels, (6, 5, 1)), np.zeros((1, 1, 3), np.uint8)])


def _error(xs) -> str:
    with pytest.raises(ImageInputError) as info:
        load_images(xs)
    return str(info.value)


def test_missing_file_names_index_and_path(tmp_path, pixels):
    missing = tmp_path / "nobody.png"
    message = _error([pixels, missing])
    assert "reference image 1" in message and str(missing) in message
    assert "no such file" in message


def test_text_file_renamed_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    message = _error([path])
    assert str(path) in message and "not an image file" in message


def test_truncated_png(tmp_path, pixels):
    buffer = io.BytesIO()
    Image.fromarray(np.tile(pixels, (20, 20, 1))).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    message = _error([path])
    assert str(path) in message and "truncated or corrupt" in message


def test_folder_and_url_are_refused(tmp_path):
    assert "folder" in _error([tmp_path])
    assert "never downloads" in _error(["https://example.com/face.png"])


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((5, 6, 2), dtype=np.uint8), "1, 3 or 4 channels"),
        (np.zeros((1, 4, 5, 3), dtype=np.uint8), "list of images"),
        (np.zeros((4, 5, 3), dtype=np.int16), "dtype int16"),
        (np.full((4, 5, 3), 255.0), "must lie in [0, 1]"),
        (np.full((4, 5, 3), np.nan), "NaN"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
    ],
)
def test_bad_arrays_name_the_problem(array, expected):
    message = _error([array])
    assert "reference image 0" in message and expected in message


def test_unsupported_objects_and_empty_list():
    assert "int" in _error([3]) and "PIL image" in _error([3])
    assert "at least one" in _error([])
