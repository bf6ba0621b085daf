"""Regions on the latent grid, and ``region="auto"``'s pure steps: face boxes to regions,
left-to-right assignment, the ``"bands"`` and ``"error"`` fallbacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bf_core.errors import FaceNotFoundError, RegionNotFoundError
from bf_core.regions import (
    AUTO,
    Band,
    PerImage,
    auto_regions,
    box_mask,
    equal_bands,
    face_region,
    faces_left_to_right,
    free_intervals,
    latent_regions,
    person_face_boxes,
    region_bounds,
    region_contains,
)

SIZE = (200, 100)  # preview (width, height) in pixels


def test_a_face_region_is_the_face_box_scaled_about_its_centre_and_clipped():
    x0, y0, x1, y1 = face_region((90, 40, 110, 60), SIZE, 2.5)  # a 20 px face at the centre
    assert (x0, x1) == pytest.approx((0.375, 0.625)) and (y0, y1) == pytest.approx((0.25, 0.75))
    corner = face_region((0, 0, 40, 40), SIZE, 3.0)  # scaled past the frame: clipped
    assert corner[:2] == (0.0, 0.0)  # -40 px clipped to the frame's edge
    assert corner[2:] == pytest.approx((80 / 200, 80 / 100))


def test_the_largest_faces_are_kept_and_ordered_left_to_right():
    small_left, big_right, big_middle = (0, 0, 10, 10), (150, 0, 190, 40), (80, 0, 110, 30)
    assert faces_left_to_right([big_right, small_left, big_middle], 2) == [big_middle, big_right]
    assert faces_left_to_right([big_right, small_left, big_middle], 5) == [
        small_left, big_middle, big_right]


def test_auto_regions_go_to_the_auto_people_in_the_order_they_were_given():
    left, right = (20, 30, 40, 50), (150, 30, 170, 50)
    given = [AUTO, (0.0, 0.0, 0.1, 0.1), AUTO]
    # two images whose faces are listed right first, and swapped between the images
    resolved, used = auto_regions(given, [[right, left], [left, right]], SIZE, 2.5, "bands", 3)
    assert resolved[1] == given[1]  # a given box stays as it is
    first, second = resolved[0], resolved[2]
    assert isinstance(first, PerImage) and isinstance(second, PerImage)
    for image in range(2):
        assert first.regions[image] == face_region(left, SIZE, 2.5)
        assert second.regions[image] == face_region(right, SIZE, 2.5)
        assert used[image] == [left, None, right]


def test_too_few_faces_give_equal_bands_of_the_free_width_with_a_warning(caplog):
    given = [(0.0, 0.0, 0.4, 1.0), AUTO, AUTO]
    with caplog.at_level(logging.WARNING, logger="bf_core.regions"):
        resolved, used = auto_regions(given, [[(150, 30, 170, 50)]], SIZE, 2.5, "bands", 4)
    assert "1 face(s) found in the step-4 preview of image 0, 2 needed" in caplog.text
    assert resolved[1].regions[0] == Band(((0.4, pytest.approx(0.7)),))
    assert resolved[2].regions[0] == Band(((pytest.approx(0.7), 1.0),))
    assert used == [[None, None, None]]


def test_the_error_fallback_names_how_many_faces_were_found():
    with pytest.raises(RegionNotFoundError, match="0 face.*image 1, 1 needed") as caught:
        auto_regions([AUTO], [[(0, 0, 9, 9)], []], SIZE, 2.5, "error", 2)
    assert isinstance(caught.value, FaceNotFoundError)
    with pytest.raises(RegionNotFoundError, match="no preview of step 2"):
        auto_regions([AUTO], None, SIZE, 2.5, "error", 2)


def test_bands_split_the_free_width_across_gaps():
    free = free_intervals([(0.2, 0.4), (0.6, 0.8)])
    assert free == [(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)]
    bands = equal_bands(free, 2)  # 0.6 of free width: 0.3 each, the first spans a gap
    assert bands[0].intervals == ((0.0, 0.2), (0.4, pytest.approx(0.5)))
    assert bands[1].intervals == ((pytest.approx(0.5), 0.6), (0.8, 1.0))
    assert free_intervals([(0.0, 1.0)]) == [(0.0, 1.0)]  # nothing free: share the frame


def test_per_image_regions_give_one_grid_per_image():
    per_image = PerImage(((0.0, 0.0, 0.5, 1.0), Band(((0.5, 1.0),))))
    masks = latent_regions([per_image, (0.0, 0.0, 1.0, 0.5)], 4, 8)
    assert masks[0].shape == (2, 1, 4, 8) and masks[1].shape == (1, 1, 4, 8)
    assert torch.equal(masks[0][0, 0], box_mask((0.0, 0.0, 0.5, 1.0), 4, 8))
    assert torch.equal(masks[0][1, 0], ~masks[0][0, 0])


def test_each_person_is_drawn_at_its_auto_face_else_the_largest_face_in_its_region():
    small_left, big_left, right = (10, 10, 20, 20), (30, 10, 60, 40), (150, 10, 170, 30)
    regions = [(0.0, 0.0, 0.5, 1.0), PerImage(((0.5, 0.0, 1.0, 1.0),)), None]
    used = [[None, right, None]]
    boxes = person_face_boxes(regions, [[small_left, right, big_left]], used, SIZE)
    assert boxes == [[big_left, right, big_left]]
    assert person_face_boxes([(0.9, 0.9, 1.0, 1.0)], [[small_left]], [], SIZE) == [[None]]


def test_region_tests_and_bounds_for_boxes_bands_and_masks():
    mask = np.zeros((10, 10))
    mask[2:5, 6:9] = 1
    assert region_contains(mask, 0.75, 0.35, 0) and not region_contains(mask, 0.2, 0.35, 0)
    assert region_bounds(mask, 0) == pytest.approx((0.6, 0.2, 0.9, 0.5), abs=0.01)
    band = Band(((0.1, 0.2), (0.5, 0.6)))
    assert region_contains(band, 0.55, 0.9, 0) and not region_contains(band, 0.3, 0.5, 0)
    assert region_bounds(band, 0) == (0.1, 0.0, 0.6, 1.0)
    per_image = PerImage(((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)))
    assert region_contains(per_image, 0.7, 0.7, 1) and not region_contains(per_image, 0.7, 0.7, 0)
