"""The web app's pure parts: the form as generate's command line, the config it gives, the
settings record, the notes, the progress counter, the pipeline cache, the animation."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bf_core import cli
from bf_core.app.form import (
    FRACTION,
    STEP_INDEX,
    AppForm,
    command_line,
    config_from_form,
    generate_argv,
    parse_generate,
    parse_seeds,
)
from bf_core.app.run import PipelineCache, StepCounter, new_run_folder, threshold_notes
from bf_core.config import BFConfig, IdAFConfig, IdAPConfig, RefineConfig
from bf_core.errors import ConfigError

EVERY_KNOB = dict(
    method_on=False, threshold_unit=STEP_INDEX, idaf_start=3, idap_start=5, use_idaf=False,
    use_idap=False, lambda_id=7.5, lambda_sem=2.0, lambda_mode="weight", smoothing="downup",
    smooth_kernel=8, saliency="cfg_delta", idap_tokens=16, idap_seed=3, idap_temperature="2.5",
    idap_negative="zeros", idap_query_file="query.safetensors", semantic_adapters="on",
    share_negative=True, batch_lines=False, idap_people="none", auto_region_scale=3.0,
    auto_region_fallback="error", refine_strength=0.6)


def test_the_default_form_is_the_papers_config():
    assert config_from_form(AppForm(prompt="a person img by a lake")) == BFConfig()


def test_every_knob_of_the_form_reaches_the_config():
    config = config_from_form(AppForm(prompt="x", **EVERY_KNOB))
    assert config == BFConfig(
        enabled=False, idaf_start=3, idap_start=5, use_idaf=False, use_idap=False,
        idaf=IdAFConfig(lambda_id=7.5, lambda_sem=2.0, lambda_mode="weight", smoothing="downup",
                        smooth_kernel=8, saliency="cfg_delta"),
        idap=IdAPConfig(num_tokens=16, seed=3, temperature=2.5, negative="zeros",
                        query_file="query.safetensors"),
        semantic_adapters="on", share_negative=True, batch_lines=False, idap_people="none",
        auto_region_scale=3.0, auto_region_fallback="error", refine=RefineConfig(strength=0.6))


def test_the_refine_checkbox_adds_the_pass_to_the_command():
    from bf_core.app.form import config_argv

    assert "--refine-faces" in config_argv(AppForm(prompt="x", refine_faces=True))
    assert "--refine-faces" not in config_argv(AppForm(prompt="x"))


def test_m1_and_m2_are_step_indices_or_fractions():
    as_steps = config_from_form(AppForm(prompt="x", threshold_unit=STEP_INDEX, idaf_start=2.0,
                                        idap_start=0))
    assert (as_steps.idaf_start, as_steps.idap_start) == (2, 0)
    assert all(type(v) is int for v in (as_steps.idaf_start, as_steps.idap_start))
    as_fractions = config_from_form(AppForm(prompt="x", threshold_unit=FRACTION, idaf_start=0.25,
                                            idap_start=0))
    assert (as_fractions.idaf_start, as_fractions.idap_start) == (0.25, 0.0)
    assert all(type(v) is float for v in (as_fractions.idaf_start, as_fractions.idap_start))
    with pytest.raises(ConfigError, match="M1 as a step index must be a whole number"):
        config_from_form(AppForm(prompt="x", threshold_unit=STEP_INDEX, idaf_start=2.5))
    with pytest.raises(ConfigError, match=r"idaf_start as a fraction .* \[0, 1\)"):
        config_from_form(AppForm(prompt="x", idaf_start=1.5))


def test_switching_the_unit_moves_m1_and_m2_into_it():
    from bf_core.app.form import convert_thresholds

    assert convert_thresholds(STEP_INDEX, 0.2, 0.3, 50) == (10, 15)  # the paper's M1, M2
    assert convert_thresholds(FRACTION, 10, 15, 50) == (0.2, 0.3)
    assert convert_thresholds(STEP_INDEX, None, 0.5, 4) == (None, 2)
    assert convert_thresholds(STEP_INDEX, 0.2, 0.3, None) == (0.2, 0.3)


def test_the_command_line_is_generates_own_and_round_trips():
    form = AppForm(prompt="a person's \"best\" day; rm -rf /", id_prompt="a person img",
                   seeds="0, 7", steps=4, guidance_scale="7.5", height=64, width=64,
                   **EVERY_KNOB)
    argv = generate_argv(form, ["/photos/me and you.jpg"], "/runs/run-0001/cli")
    command = command_line(argv)
    words = shlex.split(command)
    assert words[:2] == ["beyondfacial", "generate"] and words[2:] == argv
    args = parse_generate(words[2:])
    assert (args.prompt, args.id_image, args.seed) == (form.prompt, ["/photos/me and you.jpg"],
                                                       [0, 7])
    assert (args.steps, args.guidance_scale, args.height, args.width, args.tiny) == (
        4, 7.5, 64, 64, True)
    assert cli.config_from_args(args) == config_from_form(form)


def test_defaults_are_left_out_of_the_command():
    argv = generate_argv(AppForm(prompt="x", height=0, width=0), [], "out")
    assert not any(flag in argv for flag in ("--idaf-start", "--lambda-id", "--disable",
                                             "--guidance-scale", "--height", "--width"))
    changed = generate_argv(AppForm(prompt="x", lambda_id=6.0), [], "out")
    assert changed[changed.index("--lambda-id") + 1] == "6.0"


def test_model_paths_replace_the_tiny_pipeline():
    argv = generate_argv(AppForm(prompt="x", base_model="/models/sdxl", checkpoint="pm.bin",
                                 device="cuda", dtype="float16"), [], "out")
    args = parse_generate(argv)
    assert (args.tiny, args.base_model, args.checkpoint, args.device, args.dtype) == (
        False, "/models/sdxl", "pm.bin", "cuda", "float16")
    with pytest.raises(ConfigError, match="a checkpoint needs its base model"):
        generate_argv(AppForm(prompt="x", checkpoint="pm.bin"), [], "out")


def test_seeds_are_integers_separated_by_commas():
    assert parse_seeds("0, 1 2,3") == [0, 1, 2, 3]
    for bad in ("", "a", "1.5", "-1"):
        with pytest.raises(ConfigError, match="seeds must be integers"):
            parse_seeds(bad)


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"--smooth-kernel: invalid int value: '2\.5'"):
        config_from_form(AppForm(prompt="x", smooth_kernel=2.5))
    with pytest.raises(ConfigError, match="lambda_id is empty"):
        config_from_form(AppForm(prompt="x", lambda_id=None))
    with pytest.raises(ConfigError, match="steps is empty"):
        config_from_form(AppForm(prompt="x", steps=None))
    with pytest.raises(ConfigError, match="temperature is empty"):
        config_from_form(AppForm(prompt="x", idap_temperature="hot"))
    with pytest.raises(ConfigError, match="IdAFConfig.lambda_id must be a finite number > 0"):
        config_from_form(AppForm(prompt="x", lambda_id=0.0))
    with pytest.raises(ConfigError, match="the guidance scale is a number"):
        config_from_form(AppForm(prompt="x", guidance_scale="strong"))
    with pytest.raises(ConfigError, match="5 reference photos"):
        generate_argv(AppForm(prompt="x"), [f"{i}.jpg" for i in range(5)], "out")


def test_the_settings_record_is_generates():
    config = BFConfig(idaf_start=3)
    bf = SimpleNamespace(backend=SimpleNamespace(name="photomaker"),
                         host=SimpleNamespace(name="sdxl"))
    call = {"prompt": "p", "id_prompt": "a person img", "id_images": [Path("/p/me.jpg")],
            "num_inference_steps": 4}
    record = cli.settings_record(bf, config, call, [0, 1], [Path("/out/image_seed0_0.png")])
    assert record["backend"] == "photomaker" and record["seeds"] == [0, 1]
    assert BFConfig(**{**record["config"], "idaf": IdAFConfig(**record["config"]["idaf"]),
                       "idap": IdAPConfig(**record["config"]["idap"]),
                       "refine": RefineConfig(**record["config"]["refine"])}) == config
    assert record["host"] == "sdxl"
    assert record["call"] == {k: v for k, v in call.items() if k != "id_images"}
    assert record["id_images"] == ["/p/me.jpg"] and record["files"] == ["image_seed0_0.png"]
    assert json.loads(json.dumps(record, default=str))["versions"]["beyondfacial"]


def test_the_notes_say_what_m1_and_m2_come_to():
    notes = threshold_notes(BFConfig(idaf_start=2, idap_start=1), 4)
    assert "M1 = step 2" in notes[0] and "M2 = step 1" in notes[0]
    assert any("M2 (1) is before M1 (2)" in note for note in notes)
    assert not any("before M1" in note for note in threshold_notes(BFConfig(), 50))
    assert "method is off" in threshold_notes(BFConfig(enabled=False), 4)[0]
    with pytest.raises(ConfigError, match="idaf_start=3 is a step index at or beyond"):
        threshold_notes(BFConfig(idaf_start=3), 4)


def test_the_librarys_warnings_become_notes_and_others_do_not():
    import warnings

    from bf_core.app.run import _own_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threshold_notes(BFConfig(idaf_start=0.9), 4)  # M1 = round(3.6): the ID line never runs
        warnings.warn("a dependency's notice", UserWarning, stacklevel=1)
    notes = _own_warnings(caught, tiny=True)
    assert len(notes) == 1 and "this component will not run" in notes[0]


def test_the_step_counter_feeds_one_progress_over_every_call():
    reports = []
    counter = StepCounter(lambda fraction, text: reports.append((fraction, text)), total=4)
    tensors = {"latents": object()}
    for label in ("seed 0, BeyondFacial", "seed 0, baseline"):
        callback = counter.callback(label, steps=2)
        assert [callback(None, i, None, tensors) for i in range(2)] == [tensors, tensors]
    assert [f for f, _ in reports] == [0.25, 0.5, 0.75, 1.0]
    assert reports[-1][1] == "seed 0, baseline: step 2 of 2"


def test_pipelines_load_once_per_source_and_the_oldest_goes():
    loaded = []
    cache = PipelineCache(size=2, load=lambda args: loaded.append(args.checkpoint) or object())

    def args(checkpoint, tiny=False):
        return SimpleNamespace(backend="photomaker", tiny=tiny, base_model="/m",
                               checkpoint=checkpoint, device="cpu", dtype="float32")

    first = cache.get(args("a.bin"))
    assert cache.get(args("a.bin")) is first and loaded == ["a.bin"]
    cache.get(args("b.bin"))
    cache.get(args("c.bin"))  # a.bin goes: two are kept
    cache.get(args("a.bin"))
    assert loaded == ["a.bin", "b.bin", "c.bin", "a.bin"]
    assert cache.get(args(None, tiny=True)) is cache.get(args("ignored", tiny=True))


def test_run_folders_are_numbered(tmp_path):
    assert new_run_folder(tmp_path).name == "run-0001"
    (tmp_path / "run-0007").mkdir()
    assert new_run_folder(tmp_path).name == "run-0008"


def test_a_refused_run_leaves_no_folder_and_loads_nothing(tmp_path):
    from bf_core.app.run import run

    cache = PipelineCache(load=lambda args: pytest.fail("a refused form must load nothing"))
    with pytest.raises(ConfigError, match="--smooth-kernel"):
        run(AppForm(prompt="x", smooth_kernel=2.5), [], tmp_path, cache)
    assert list(tmp_path.iterdir()) == []


def test_the_decision_animation_has_a_frame_per_fused_step(tmp_path):
    import torch
    from PIL import Image

    from bf_core.app.run import decision_animation

    lines = torch.zeros(3, 1, 1, 8, 8, dtype=torch.int8)
    lines[1, 0, 0, :4] = 1
    result = SimpleNamespace(fusion_lines=lines, fusion_steps=[2, 3, 4])
    with Image.open(decision_animation(result, 0, tmp_path / "steps.gif")) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3
        frames = []
        for index in range(3):
            gif.seek(index)
            frame = gif.convert("RGB")
            # the map is square: the bottom width x width pixels, below the step's label
            frames.append(frame.crop((0, frame.height - frame.width, *frame.size)).tobytes())
    assert frames[0] == frames[2] != frames[1]  # step 3's map differs, steps 2 and 4 agree


def test_app_without_gradio_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["app", "--port", "0"])
    message = str(exit_info.value)
    assert 'pip install "beyondfacial[app]"' in message and "\n" not in message


def test_the_page_has_a_field_for_every_form_value(monkeypatch):
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    import gradio as gr

    from bf_core.app import ui

    monkeypatch.setattr(ui, "backend_names", lambda: ["photomaker"])  # no plugins loaded
    with gr.Blocks():
        fields = ui._inputs(AppForm(prompt="x"))
    assert sorted(fields) == sorted(AppForm.names())
    assert [f.name for f in dataclasses.fields(AppForm)] == AppForm.names()
