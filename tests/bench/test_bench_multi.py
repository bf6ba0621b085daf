"""The multi scenario (several people in one image): prompts, pairs, face matching, and the
tiny run's table and contact sheets.

The matching tests use hand-made similarity matrices, so each failure they guard against
(a greedy match, one face counted for two persons, a swap) is written out in numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.metrics.multi import (
    best_assignment,
    match_people,
    people_values,
)
from benchmarks.multi import (
    HALVES,
    MultiOptions,
    build_multi_grid,
    identity_pairs,
    ip_adapter_masks,
)
from benchmarks.scenarios import BenchIdentity, GenerationParams, PromptSet, load_prompt_set
from bf_core.errors import ConfigError

LEFT, RIGHT = HALVES
TABLE_COLUMNS = ["backend", "setting", "method", "images", "identity_recall", "swap_blend_rate",
                 "face_count_accuracy", "faces_found", "matched_face_sim", "face_area_fraction",
                 "face_box_height", "clip_t", "unet_evals_per_image", "seconds_per_image", "note"]


def test_the_two_person_prompt_set_holds_twenty_distinct_whole_body_scenes():
    prompts = load_prompt_set("two_person").prompts
    assert len(prompts) == 20 and len(set(prompts)) == 20
    for prompt in prompts:
        assert prompt.startswith("Two ") and "full body" in prompt, prompt


def _people(*names: str) -> list[BenchIdentity]:
    return [BenchIdentity(name, ()) for name in names]


def _names(pairs) -> list[tuple[str, str]]:
    return [(a.name, b.name) for a, b in pairs]


def test_consecutive_pairs_put_every_identity_once_on_each_side():
    assert _names(identity_pairs(_people("a", "b", "c"))) == [("a", "b"), ("b", "c"), ("c", "a")]
    assert _names(identity_pairs(_people("a", "b"))) == [("a", "b"), ("b", "a")]
    assert _names(identity_pairs(_people("a", "b", "c"), "all")) == [
        ("a", "b"), ("a", "c"), ("b", "c")]
    assert _names(identity_pairs(_people("a", "b", "c"), max_pairs=1)) == [("a", "b")]
    with pytest.raises(ConfigError, match="at least 2 identities"):
        identity_pairs(_people("a"))


def test_the_grid_leaves_out_what_cannot_run_and_says_why():
    options = MultiOptions(PromptSet("two_person", ("p0", "p1")))
    people = [BenchIdentity("a", (), backend_options={"dreambooth": {"checkpoint": "a.lora"}}),
              BenchIdentity("b", (), backend_options={"dreambooth": {"checkpoint": "b.lora"}})]
    plan = build_multi_grid({"ipadapter": 4, "dreambooth": 4, "toy": 1}, options, people, [0],
                            GenerationParams(steps=3))
    # IP-Adapter: three settings x two ordered pairs x two prompts
    assert {(i.setting, i.people) for i in plan.items} == {
        (s, p) for s in ("n_lines", "native", "person1_only") for p in (("a", "b"), ("b", "a"))}
    assert len(plan.items) == 12 and all(i.backend == "ipadapter" for i in plan.items)
    assert len({i.item_id for i in plan.items}) == 12
    assert all(i.item_id.startswith("multi/ipadapter/") for i in plan.items)
    assert "no native multi-person mode" in plan.left_out[("dreambooth", "native")]
    assert plan.left_out[("toy", "n_lines")] == "serves at most 1 person(s) per call"
    # two different DreamBooth LoRAs cannot share one pipeline: both pairs are noted, not run
    assert len(plan.notes) == 2 and "different checkpoints" in plan.notes[0]


def test_auto_regions_change_the_method_items_only():
    halves = MultiOptions(PromptSet("two_person", ("p0",)), max_pairs=1)
    auto = MultiOptions(PromptSet("two_person", ("p0",)), max_pairs=1, regions="auto")
    people = _people("a", "b")
    prints = [{i.setting: i.fingerprint for i in build_multi_grid(
        {"ipadapter": 4}, options, people, [0], GenerationParams()).items}
        for options in (halves, auto)]
    assert prints[0]["n_lines"] != prints[1]["n_lines"]
    # the masked baseline takes the halves in both modes, and the floor has no regions
    assert prints[0]["native"] == prints[1]["native"]
    assert prints[0]["person1_only"] == prints[1]["person1_only"]


def test_the_best_assignment_is_optimal_where_a_greedy_one_is_not():
    # Greedy gives person 0 face 0 (90) and person 1 face 1 (10): 100 in all; the best is 165.
    assert best_assignment(np.array([[90.0, 80.0], [85.0, 10.0]])) == (1, 0)
    # fewer faces than persons: the face goes where it scores more, the other person has none
    assert best_assignment(np.array([[20.0], [70.0]])) == (None, 0)
    assert best_assignment(np.zeros((2, 0))) == (None, None)


def test_recall_counts_distinct_faces_only_and_one_face_for_two_is_a_blend():
    match = match_people(np.array([[90.0], [85.0]]), threshold=30.0)
    assert match.recalled == (True, False)  # the one face cannot stand for both
    assert match.blend and not match.swap
    values = people_values(match, np.array([[90.0], [85.0]]), [(0, 0, 10, 20)], 1, (100, 100))
    assert values["identity_recall"] == 50.0 and values["swap_blend_rate"] == 100.0
    assert values["face_count_accuracy"] == 0.0  # one face for two persons
    # close-ups per face: 2 % area and 20 % height for person 0, nothing for person 1
    assert values["face_area_fraction"] == pytest.approx(1.0)
    assert values["face_box_height"] == pytest.approx(10.0)


def test_a_person_whose_best_face_goes_to_the_other_person_is_a_swap():
    # Person 0 looks most like face 0 (50), but the best total gives face 0 to person 1
    # (45 + 29 beats 50 + 0): person 0's own face carries person 1. No face passes the
    # threshold for both, so it is no blend.
    sim = np.array([[50.0, 45.0], [29.0, 0.0]])
    match = match_people(sim, threshold=30.0)
    assert match.assignment == (1, 0) and match.swap and not match.blend
    assert match.recalled == (True, False)


def test_two_clean_faces_in_the_wrong_halves_are_a_swap_and_in_the_right_ones_are_not():
    sim = np.array([[90.0, 5.0], [5.0, 90.0]])  # each face clearly one person's
    left, right = (0.25, 0.5), (0.75, 0.5)
    good = match_people(sim, 30.0, [left, right], [LEFT, RIGHT])
    assert good.recalled == (True, True) and not good.swap and not good.blend
    swapped = match_people(sim, 30.0, [right, left], [LEFT, RIGHT])
    assert swapped.recalled == (True, True) and swapped.swap
    # without regions (the one-person floor) the place of a face is not judged
    assert not match_people(sim, 30.0, [right, left], [None, None]).swap
    values = people_values(good, sim, [(0, 0, 10, 10), (50, 0, 60, 10)], 2, (100, 100))
    assert values["identity_recall"] == 100.0 and values["swap_blend_rate"] == 0.0
    assert values["face_count_accuracy"] == 100.0 and values["matched_face_sim"] == 90.0


def test_ip_adapter_masks_have_diffusers_shape_one_image_per_person():
    (masks,) = ip_adapter_masks(HALVES, 32, 48)
    assert masks.shape == (1, 2, 32, 48)  # one IP-Adapter, two images
    assert masks[0, 0, :, :24].min() == 1 and masks[0, 0, :, 24:].max() == 0
    assert masks[0, 1, :, 24:].min() == 1 and masks[0, 1, :, :24].max() == 0


def test_the_masks_decide_where_each_persons_image_acts_on_the_tiny_ip_adapter():
    import torch

    from benchmarks.multi import masked_ip_adapter
    from bf_backends.ipadapter.testing import reference_photo, tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    photos = [[reference_photo(0)], [reference_photo(1)]]

    def image(boxes):
        call = dict(prompt="two friends", num_inference_steps=2, height=64, width=64,
                    output_type="np", generator=torch.Generator().manual_seed(0))
        return masked_ip_adapter(pipe, photos, boxes, call)

    halves = image(HALVES)
    assert halves.shape == (64, 64, 3)
    assert not np.array_equal(halves, image(((0, 0, 1, 1), (0, 0, 1, 1))))
    assert not np.array_equal(halves, image((RIGHT, LEFT)))


def test_the_contact_sheet_cell_outlines_each_region_in_its_persons_colour():
    from benchmarks.report import outline_people
    from bf_core.visualize import line_colour

    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    cell = outline_people(grey, [list(LEFT), list(RIGHT)], [None, None], 128)
    pixels = np.asarray(cell)
    assert cell.size == (128, 128)
    assert (pixels[:, 0] == line_colour(1)).all()  # the left half's left edge
    assert (pixels[:, 63] == line_colour(1)).all()  # ... and its right edge
    assert (pixels[:, 64] == line_colour(2)).all() and (pixels[:, 127] == line_colour(2)).all()
    assert (pixels[2:-2, 30] == (128, 128, 128)).all()  # inside: the image untouched
    face = outline_people(grey, None, [(8, 8, 24, 24), None], 128)
    assert tuple(np.asarray(face)[16, 32]) == line_colour(1)  # person 1's face box, scaled x2
    assert (np.asarray(outline_people(grey, None, None, 128)) == 128).all()


# -- the tiny run ---------------------------------------------------------------------------
BACKENDS = ("dreambooth", "ipadapter")
ARGS = ["--tiny", "--backends", ",".join(BACKENDS), "--scenarios", "multi",
        "--prompts-per-set", "1", "--multi-max-pairs", "1", "--no-progress"]


def _spec(out: Path, *more: str):
    from benchmarks.cli import build_parser, spec_from_args

    return spec_from_args(build_parser().parse_args([*ARGS, *more, "--out", str(out)]))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_scenarios_option_selects_the_grids(tmp_path):
    from benchmarks.cli import build_parser, spec_from_args

    multi = _spec(tmp_path)
    assert not multi.single and multi.multi.prompt_set.name == "two_person"
    assert len(multi.multi.prompt_set.prompts) == 1 and multi.multi.max_pairs == 1
    both = _spec(tmp_path, "--scenarios", "single,multi", "--multi-regions", "auto")
    assert both.single and both.multi.regions == "auto"
    default = spec_from_args(build_parser().parse_args(["--tiny", "--out", str(tmp_path)]))
    assert default.single and default.multi is None
    with pytest.raises(SystemExit):
        _spec(tmp_path, "--scenarios", "several")


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")  # the metrics' random face pack
    pytest.importorskip("insightface")
    from benchmarks.runner import run_benchmark

    out = tmp_path_factory.mktemp("multi")
    result = run_benchmark(_spec(out), rank=0, world_size=1)
    # one pair, one prompt, one seed: DreamBooth n_lines and person1_only, IP-Adapter all three
    assert result.generated == 5 and result.scored == 5
    return out


def test_the_tiny_multi_run_writes_the_table_with_a_row_per_backend_and_setting(multi_run):
    report = multi_run / "report"
    with open(report / "multi.csv", newline="") as handle:
        assert next(csv.reader(handle)) == TABLE_COLUMNS
    rows = {(r["backend"], r["setting"]): r for r in _rows(report / "multi.csv")}
    assert list(rows) == [(b, s) for b in BACKENDS for s in ("n_lines", "native", "person1_only")]
    left_out = rows[("dreambooth", "native")]
    assert left_out["images"] == "0" and "no native multi-person mode" in left_out["note"]
    assert left_out["identity_recall"] == ""  # never stood in for
    assert "masked IP-Adapter" in rows[("ipadapter", "native")]["method"]
    for key, row in rows.items():
        if key != ("dreambooth", "native"):
            assert row["images"] == "1" and row["note"] == "", key
            assert all(row[c] != "" for c in TABLE_COLUMNS[4:-1]), key
    # UNet work: 2T for the stock call, 2T + 2N(T - M1 - 1) with N = 2 lines, N = 1 for the floor
    evals = {k: float(r["unet_evals_per_image"]) for k, r in rows.items() if r["images"] == "1"}
    assert evals[("ipadapter", "native")] < evals[("ipadapter", "person1_only")] \
        < evals[("ipadapter", "n_lines")]
    text = (report / "report.md").read_text()
    assert "## Several people (multi)" in text and "Table 1" not in text  # multi only
    items = _rows(report / "multi_items.csv")
    assert len(items) == 5 and {r["identity"] for r in items} == {"person0+person1"}


def test_the_regions_in_use_are_recorded_and_drawn_on_the_contact_sheet(multi_run):
    from bf_core.visualize import line_colour

    regions = {}
    for line in (multi_run / "manifest-rank00000.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "image":  # item ids: multi/<backend>/<setting>/...
            regions[tuple(record["item"].split("/")[1:3])] = record["regions"]
    halves = [list(LEFT), list(RIGHT)]
    assert regions == {("dreambooth", "n_lines"): halves, ("dreambooth", "person1_only"): None,
                       ("ipadapter", "n_lines"): halves, ("ipadapter", "native"): halves,
                       ("ipadapter", "person1_only"): None}
    sheets = sorted(p.name for p in (multi_run / "report" / "contact_sheets").iterdir())
    assert sheets == [f"multi__{b}__person0+person1__s0.png" for b in BACKENDS]
    sheet = np.asarray(Image.open(multi_run / "report" / "contact_sheets" / sheets[1]))
    cell, label = 128, 14
    assert sheet.shape == (label + cell, 3 * cell, 3)  # one prompt; n_lines, native, floor
    for column in (0, 1):  # n_lines and native: person 1's region left, person 2's right
        body = sheet[label + 2:-2, column * cell:(column + 1) * cell]
        assert (body[:, 0] == line_colour(1)).mean() > 0.9
        assert (body[:, -1] == line_colour(2)).mean() > 0.9
    assert list((multi_run / "report" / "fusion").glob("multi__ipadapter__n_lines__*.png"))


def test_a_rerun_of_the_multi_scenario_redoes_nothing(multi_run):
    from benchmarks.runner import run_benchmark

    before = (multi_run / "report" / "multi.csv").read_text()
    again = run_benchmark(_spec(multi_run), rank=0, world_size=1)
    assert again.generated == 0 and again.scored == 0
    assert (multi_run / "report" / "multi.csv").read_text() == before
