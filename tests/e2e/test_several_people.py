"""Several people in one image: one ID line per person, each competing only in its region.

On the DreamBooth backend, whose people are told apart by their ``id_prompt`` and whose
LoRA rows switch per line kind, so any number of ID lines shares one merged call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bf_core
from bf_core import Person
from bf_core.errors import ConfigError
from bf_core.plugins import get_registry
from bf_core.testing import batch_invariant_kernels

STEPS = 6
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
ANA, BEN = "a photo of sks woman", "a photo of sks man"


def run(pipe, config=None, **kwargs):
    call = dict(prompt="two friends shaking hands at a market", num_inference_steps=STEPS,
                height=64, width=64, output_type="np", return_fusion_maps=True,
                generator=torch.Generator().manual_seed(0))
    call.update(kwargs)
    return bf_core.wrap(pipe, config=config)(**call)


def two(config=None, **kwargs):
    return dict(people=[Person(id_prompt=ANA, region=LEFT), Person(id_prompt=BEN, region=RIGHT)],
                config=config, **kwargs)


def test_one_person_on_the_whole_frame_is_bit_equal_to_the_single_person_call(lora_pipe):
    single = run(lora_pipe, id_prompt=ANA)
    for region in (None, (0.0, 0.0, 1.0, 1.0), np.ones((10, 10))):
        as_people = run(lora_pipe, people=[Person(id_prompt=ANA, region=region)])
        np.testing.assert_array_equal(as_people.images, single.images)
        assert torch.equal(as_people.fusion_maps, single.fusion_maps)


def test_each_id_line_wins_only_inside_its_region(lora_pipe, one_thread):
    result = run(lora_pipe, **two())
    lines = result.fusion_lines  # (S, N, 1, h, w): 0 semantic, j person j
    left, right = result.regions  # (N, h, w): one region per image
    assert left.shape == (lines.shape[1], *lines.shape[-2:]) and torch.equal(left, ~right)
    per_image = lines[:, :, 0]  # (S, N, h, w)
    assert not (per_image[:, ~left] == 1).any() and not (per_image[:, ~right] == 2).any()
    assert (lines == 1).any() and (lines == 2).any()  # both people do win somewhere
    assert torch.equal(result.fusion_maps, lines > 0)


def test_outside_every_region_the_semantic_line_is_kept(lora_pipe):
    top = [Person(id_prompt=ANA, region=(0.0, 0.0, 0.5, 0.5)),
           Person(id_prompt=BEN, region=(0.5, 0.0, 1.0, 0.5))]
    result = run(lora_pipe, people=top)
    bottom = result.fusion_lines.shape[-2] // 2
    assert not result.fusion_lines[..., bottom:, :].any()


def test_swapping_the_people_swaps_the_winning_lines(lora_pipe):
    config = bf_core.BFConfig(use_idap=False, batch_lines=False)  # row order cannot matter
    ab = run(lora_pipe, **two(config))
    ba = run(lora_pipe, people=[Person(id_prompt=BEN, region=RIGHT),
                                Person(id_prompt=ANA, region=LEFT)], config=config)
    np.testing.assert_array_equal(ab.images, ba.images)
    swapped = torch.where(ab.fusion_lines == 1, 2, torch.where(ab.fusion_lines == 2, 1, 0))
    assert torch.equal(ba.fusion_lines, swapped.to(torch.int8))


@pytest.mark.parametrize("people", [1, 2, 3])
def test_unet_sample_evaluations_follow_the_formula(people, lora_pipe):
    regions = [(j / people, 0.0, (j + 1) / people, 1.0) for j in range(people)]
    result = run(lora_pipe, people=[Person(id_prompt=f"a photo of sks person {j}", region=r)
                                    for j, r in enumerate(regions)])
    m1 = result.diagnostics["idaf_start"]
    assert result.diagnostics["model_rows"] == 2 * STEPS + 2 * people * (STEPS - m1 - 1)
    assert result.diagnostics["model_calls"] == STEPS  # every line in one merged call


def test_merged_equals_separate_under_batch_invariant_kernels(lora_pipe):
    with batch_invariant_kernels():
        merged = run(lora_pipe, **two())
        separate = run(lora_pipe, **two(bf_core.BFConfig(batch_lines=False)))
    assert merged.diagnostics["model_calls"] < separate.diagnostics["model_calls"]
    np.testing.assert_array_equal(merged.images, separate.images)


@pytest.mark.parametrize("people", [1, 2])
def test_idap_prepends_every_persons_k_tokens(people, lora_pipe):
    lengths = []
    handle = lora_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True)
    try:
        persons = [Person(id_prompt=ANA, region=LEFT), Person(id_prompt=BEN, region=RIGHT)]
        result = run(lora_pipe, people=persons[:people],
                     config=bf_core.BFConfig(batch_lines=False))
    finally:
        handle.remove()
    k, prompt_tokens = bf_core.IdAPConfig().num_tokens, 77
    assert people * k + prompt_tokens in lengths
    assert result.diagnostics["idap_selection"].shape[1] == people * k
    none = run(lora_pipe, **two(bf_core.BFConfig(idap_people="none")))
    assert "idap_selection" not in none.diagnostics


def test_mask_regions_are_resized_to_the_latent_grid(lora_pipe):
    from PIL import Image

    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    as_mask = run(lora_pipe, people=[Person(id_prompt=ANA, region=Image.fromarray(mask)),
                                     Person(id_prompt=BEN, region=RIGHT)])
    as_box = run(lora_pipe, **two())
    assert torch.equal(as_mask.regions[0], as_box.regions[0])
    np.testing.assert_array_equal(as_mask.images, as_box.images)


@pytest.mark.parametrize("people, message", [
    ([Person(region=(0.5, 0.0, 0.2, 1.0))], "0 <= x0 < x1 <= 1"),
    ([Person(region=(0, 0, 1))], "a region is a box"),
    ([Person(region="somewhere")], "unknown"),
    ([Person(region=np.zeros((8, 8)))], "covers no cell"),
    ([Person()] * 5, "at most 4 people"),
    ([], "non-empty list"),
    (["a photo of sks person"], r"people\[0\] must be a bf_core.Person"),
])
def test_bad_people_are_named(people, message, lora_pipe):
    with pytest.raises(ConfigError, match=message):
        run(lora_pipe, people=people, num_inference_steps=2)


def test_people_and_the_single_person_keywords_exclude_each_other(lora_pipe):
    with pytest.raises(ConfigError, match="not both"):
        run(lora_pipe, people=[Person(id_prompt=ANA)], id_prompt=BEN)


@pytest.mark.parametrize("declared", [{}, {"max_people": 1}])
def test_a_backend_for_one_person_refuses_two_by_name(declared):
    """A backend that declares nothing (a third-party one written for one person) or 1."""
    from types import SimpleNamespace

    from bf_core.wrap import call_people

    backend = SimpleNamespace(name="toy", **declared)
    assert len(call_people([Person()], None, None, backend)) == 1
    with pytest.raises(ConfigError, match="toy backend serves at most 1 person"):
        call_people([Person(), Person()], None, None, backend)


def _two_identities(name: str):
    """The backend's tiny pipeline and two different people for it."""
    from PIL import Image, ImageOps

    setup = get_registry().extras(name).tiny_pipeline(seed=0)
    images = setup.identity.get("id_images")
    if not images:
        return setup, dict(id_prompt=ANA), dict(id_prompt=BEN)
    photo = (images[0] if isinstance(images[0], Image.Image) else Image.open(images[0])).convert("RGB")
    other = ImageOps.mirror(photo).rotate(20)
    prompt = setup.identity.get("id_prompt")
    return setup, dict(id_images=[photo], id_prompt=prompt), dict(id_images=[other],
                                                                   id_prompt=prompt)


@pytest.mark.parametrize("name", ["dreambooth", "photomaker", "ipadapter", "instantid", "pulid"])
def test_each_id_line_carries_its_own_persons_identity(name, one_thread):
    setup, ana, ben = _two_identities(name)
    bf = bf_core.wrap(setup.pipe, backend=name)

    def images(first, second, **config):
        people = [Person(**first, region=LEFT), Person(**second, region=RIGHT)]
        return bf.with_config(**config)(
            prompt="two friends at a market", num_inference_steps=STEPS, height=64, width=64,
            output_type="np", generator=torch.Generator().manual_seed(0), people=people,
            **setup.options).images

    # IdAP off, so that only the ID lines see the people: a backend that gave every ID line
    # the first (or the last) person's identity would make these equal.
    mixed = images(ana, ben, use_idap=False)
    assert not np.array_equal(mixed, images(ana, ana, use_idap=False))
    assert not np.array_equal(mixed, images(ben, ben, use_idap=False))
    with batch_invariant_kernels():
        merged, separate = images(ana, ben), images(ana, ben, batch_lines=False)
    np.testing.assert_array_equal(merged, separate)


@pytest.mark.parametrize("name", ["dreambooth", "photomaker", "ipadapter", "instantid", "pulid"])
def test_every_backend_swaps_counts_and_prepends_as_the_spec_says(name, one_thread):
    """On each backend's tiny pipeline with two different people: swapping the people
    swaps the winning lines (and nothing else), a call costs 2T + 2N(T - M1 - 1) UNet
    sample-evaluations, and after M2 the semantic line's context is N*K + L tokens."""
    setup, ana, ben = _two_identities(name)
    bf = bf_core.wrap(setup.pipe, backend=name)

    def call(people, **config):
        return bf.with_config(**config)(
            prompt="two friends at a market", num_inference_steps=STEPS, height=64, width=64,
            output_type="np", generator=torch.Generator().manual_seed(0), people=people,
            return_fusion_maps=True, **setup.options)

    order = dict(use_idap=False, batch_lines=False)  # so that row order cannot matter
    ab = call([Person(**ana, region=LEFT), Person(**ben, region=RIGHT)], **order)
    ba = call([Person(**ben, region=RIGHT), Person(**ana, region=LEFT)], **order)
    np.testing.assert_array_equal(ab.images, ba.images)
    swapped = torch.where(ab.fusion_lines == 1, 2, torch.where(ab.fusion_lines == 2, 1, 0))
    assert torch.equal(ba.fusion_lines, swapped.to(torch.int8))

    lengths = []
    handle = setup.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True)
    try:
        full = call([Person(**ana, region=LEFT), Person(**ben, region=RIGHT)], batch_lines=False)
    finally:
        handle.remove()
    m1, m2 = full.diagnostics["idaf_start"], full.diagnostics["idap_start"]
    assert full.diagnostics["model_rows"] == 2 * STEPS + 2 * 2 * (STEPS - m1 - 1)
    k = bf_core.IdAPConfig().num_tokens
    scene_tokens = lengths[0]  # step 0: the semantic line alone, before M2
    assert m2 < STEPS - 1 and scene_tokens + 2 * k in lengths
    assert full.diagnostics["idap_selection"].shape[1] == 2 * k


def test_the_fusion_strip_gives_each_person_a_colour_and_outlines_the_regions(lora_pipe):
    from bf_core.visualize import line_colour

    result = run(lora_pipe, **two())
    strip = bf_core.render_fusion_strip(result.fusion_lines, result.fusion_steps,
                                        regions=result.regions)
    colours = {colour for _, colour in strip.getcolors(maxcolors=1 << 16)}
    assert {line_colour(0), line_colour(1), line_colour(2)} <= colours
    plain = bf_core.render_fusion_strip(result.fusion_maps, result.fusion_steps)
    assert line_colour(2) not in {colour for _, colour in plain.getcolors(maxcolors=1 << 16)}


# -- region="auto": the faces of the step-M1 preview -----------------------------------------------
SIZE = 64
FACES = [(0.6, 0.2, 0.8, 0.4), (0.1, 0.3, 0.25, 0.45)]  # fractions; listed right face first


def pixels(box):
    return tuple(v * SIZE for v in box)


def auto_people():
    return [Person(id_prompt=ANA, region="auto"), Person(id_prompt=BEN, region="auto")]


def test_auto_regions_sit_on_the_detected_faces_in_left_to_right_order(lora_pipe):
    from bf_core.regions import box_mask, face_region
    from bf_core.testing.faces import ScriptedFaceDetector

    detector = ScriptedFaceDetector(FACES)
    result = run(lora_pipe, people=auto_people(), preview_face_analyzer=detector)
    assert detector.seen == [(SIZE, SIZE)]  # one preview image, searched once
    left, right = pixels(FACES[1]), pixels(FACES[0])
    found = np.array(result.diagnostics["auto_faces"][0], dtype=np.float64)
    np.testing.assert_allclose(found, [left, right], rtol=1e-6)
    boxes = [face_region(face, (SIZE, SIZE), 2.5) for face in found]
    for region, box in zip(result.regions, boxes, strict=True):
        assert torch.equal(region[0], box_mask(box, 8, 8))
    per_image = result.fusion_lines[:, :, 0]
    assert not (per_image[:, ~result.regions[0]] == 1).any()
    assert not (per_image[:, ~result.regions[1]] == 2).any()
    # the regions found are exactly boxes given by hand: the same bits
    by_hand = run(lora_pipe, people=[Person(id_prompt=ANA, region=boxes[0]),
                                     Person(id_prompt=BEN, region=boxes[1])])
    np.testing.assert_array_equal(result.images, by_hand.images)


def test_auto_with_too_few_faces_falls_back_to_bands_or_a_named_error(lora_pipe, caplog):
    import logging

    from bf_core.errors import RegionNotFoundError
    from bf_core.testing import pipeline_fingerprint
    from bf_core.testing.faces import ScriptedFaceDetector

    one_face = ScriptedFaceDetector(FACES[:1])
    with caplog.at_level(logging.WARNING, logger="bf_core.regions"):
        bands = run(lora_pipe, people=auto_people(), preview_face_analyzer=one_face)
    assert "1 face(s) found" in caplog.text and "2 equal vertical bands" in caplog.text
    halves = run(lora_pipe, **two())  # two bands of the whole width are the two halves
    np.testing.assert_array_equal(bands.images, halves.images)
    # next to a given box, the bands share the free width only
    beside = run(lora_pipe, people=[Person(id_prompt=ANA, region=LEFT),
                                    Person(id_prompt=BEN, region="auto")],
                 preview_face_analyzer=ScriptedFaceDetector([]))
    assert torch.equal(beside.regions[1], halves.regions[1])
    before = pipeline_fingerprint(lora_pipe)
    with pytest.raises(RegionNotFoundError, match="1 face.*2 needed"):
        run(lora_pipe, people=auto_people(), preview_face_analyzer=one_face,
            config=bf_core.BFConfig(auto_region_fallback="error"))
    assert pipeline_fingerprint(lora_pipe) == before


def test_auto_regions_differ_per_image_and_follow_the_library_face_analysis(lora_pipe, tmp_path):
    """The library's face analysis (a random insightface pack that finds faces anywhere)
    searches every preview image; each image gets the regions of its own faces."""
    from bf_backends.instantid.testing import face_pack
    from bf_core.faces import FaceAnalyzer
    from bf_core.regions import box_mask, face_region

    analyzer = FaceAnalyzer(str(face_pack(tmp_path / "pack")), det_size=(128, 128))
    result = run(lora_pipe, people=auto_people(), preview_face_analyzer=analyzer,
                 num_images_per_prompt=2)
    faces = result.diagnostics["auto_faces"]
    assert len(faces) == 2 and all(box is not None for row in faces for box in row)
    for image, row in enumerate(faces):
        assert (row[0][0] + row[0][2]) <= (row[1][0] + row[1][2])  # left to right
        for person, face in enumerate(row):
            box = face_region(face, (SIZE, SIZE), 2.5)
            assert torch.equal(result.regions[person][image], box_mask(box, 8, 8))


def test_auto_without_id_lines_finds_nothing_and_reports_no_region(lora_pipe):
    from bf_core.testing.faces import ScriptedFaceDetector

    detector = ScriptedFaceDetector(FACES)
    result = run(lora_pipe, people=auto_people(), preview_face_analyzer=detector,
                 config=bf_core.BFConfig(use_idaf=False))
    assert result.regions == [None, None] and detector.seen == []


@pytest.mark.parametrize("name", ["photomaker", "instantid", "pulid"])
def test_auto_regions_search_the_preview_with_the_backends_own_face_analyser(name, one_thread):
    """Without preview_face_analyzer=, a backend with face analysis (the tiny pipelines' random
    packs find faces anywhere) finds the "auto" regions with its own analyser."""
    setup, ana, ben = _two_identities(name)
    result = bf_core.wrap(setup.pipe, backend=name)(
        prompt="two friends at a market", num_inference_steps=STEPS, height=64, width=64,
        output_type="np", generator=torch.Generator().manual_seed(0), **setup.options,
        people=[Person(**ana, region="auto"), Person(**ben, region="auto")])
    assert all(face is not None for face in result.diagnostics["auto_faces"][0])
    assert all(region is not None and region.any() for region in result.regions)


def test_auto_without_any_face_models_is_a_named_error_not_no_faces(lora_pipe):
    """DreamBooth has no face analysis: the library's default pack is looked for, and its
    absence is said, with where to put it (this machine has no insightface packs)."""
    from bf_core.faces import FaceAnalyzer, FaceModelsNotFoundError

    try:
        installed = FaceAnalyzer().model_dir
        pytest.skip(f"a buffalo_l pack is installed here ({installed})")
    except FaceModelsNotFoundError:
        pass
    with pytest.raises(FaceModelsNotFoundError, match="buffalo_l.*Nothing is downloaded"):
        run(lora_pipe, people=auto_people())
