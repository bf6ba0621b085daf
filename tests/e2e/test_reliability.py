"""Reliability under hostile use: threads, NaN per line, out of memory, typos, raw errors.

Every backend's tiny pipeline (its ``BackendExtras.tiny_pipeline``) is called from several
threads at once; the results must equal the sequential ones and the pipeline must be left
as it was. The NaN, memory and keyword checks run on the DreamBooth pipeline, which is the
cheapest: they live in the backend-agnostic loop and wrapper, so one backend exercises them.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import bf_core
from bf_core.errors import (
    ConcurrentCallError,
    ConfigError,
    DeviceOutOfMemoryError,
    NonFiniteError,
)
from bf_core.plugins import get_registry
from bf_core.testing import add_tiny_lora, pipeline_fingerprint, tiny_sdxl_pipeline
from bf_core.testing.faults import nan_in_lora_after, nan_out_of, out_of_memory_in

BACKENDS = ("dreambooth", "photomaker", "ipadapter", "instantid", "pulid")
STEPS = 5


def call_kwargs(seed: int, **overrides):
    kwargs = dict(prompt="a person is kneeling by a small lake", num_inference_steps=STEPS,
                  height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    kwargs.update(overrides)
    return kwargs


def tiny_setup(name: str):
    return get_registry().extras(name).tiny_pipeline(seed=0)


def fresh_lora_pipe():
    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="identity")
    return pipe


def id_kwargs(**overrides):
    return dict(call_kwargs(0), id_prompt="a photo of sks person", **overrides)


# -- 1. threads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_threads_on_every_wrapper_of_one_pipeline_equal_the_sequential_calls(name, one_thread):
    setup = tiny_setup(name)
    bf = bf_core.wrap(setup.pipe, backend=name)
    # Three wrappers of one pipeline: the wrapper, a with_config copy and a re-wrap. They
    # share one lock, so their calls cannot see each other's adapter and processor switches.
    wrappers = [bf, bf.with_config(), bf_core.wrap(bf, backend=name)]

    def run(job):
        wrapper, seed = job
        return wrapper(**call_kwargs(seed), **setup.identity, **setup.options).images

    jobs = [(wrapper, seed) for seed, wrapper in enumerate(wrappers)]
    sequential = [run(job) for job in jobs]
    before = pipeline_fingerprint(setup.pipe)
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        threaded = list(pool.map(run, jobs))
    for alone, together in zip(sequential, threaded, strict=True):
        np.testing.assert_array_equal(together, alone)
    assert not np.array_equal(sequential[0], sequential[1])  # the seeds differ: a real check
    assert pipeline_fingerprint(setup.pipe) == before


def _holding_call(bf, started: threading.Event, release: threading.Event, events: list, tag: str):
    """A call that stops in its first step callback until ``release`` is set."""

    def callback(pipe, i, t, kwargs):
        events.append((tag, i))
        if i == 0 and tag == "first":
            started.set()
            release.wait(60)
        return kwargs

    return lambda: bf(**id_kwargs(), callback_on_step_end=callback)


def test_waiting_calls_queue_behind_the_running_one(one_thread):
    pipe = fresh_lora_pipe()
    bf = bf_core.wrap(pipe)
    started, release, events = threading.Event(), threading.Event(), []
    first = threading.Thread(target=_holding_call(bf, started, release, events, "first"))
    second = threading.Thread(target=_holding_call(bf.with_config(), started, release, events,
                                                   "second"))
    first.start()
    assert started.wait(60)
    second.start()
    time.sleep(0.5)  # time enough for the second call to reach its first step, were it not queued
    release.set()
    first.join(60)
    second.join(60)
    tags = [tag for tag, _ in events]
    assert tags == ["first"] * STEPS + ["second"] * STEPS


def test_refuse_mode_names_the_concurrent_call_and_keeps_the_running_one(one_thread):
    pipe = fresh_lora_pipe()
    bf = bf_core.wrap(pipe, concurrency="refuse")
    expected = bf(**id_kwargs()).images
    before = pipeline_fingerprint(pipe)
    started, release, events, results = threading.Event(), threading.Event(), [], []
    hold = _holding_call(bf, started, release, events, "first")
    runner = threading.Thread(target=lambda: results.append(hold().images))
    runner.start()
    assert started.wait(60)
    try:
        for other in (bf, bf.with_config(), bf_core.wrap(pipe, concurrency="refuse")):
            with pytest.raises(ConcurrentCallError, match="another call is running"):
                other(**id_kwargs())
    finally:
        release.set()
        runner.join(60)
    np.testing.assert_array_equal(results[0], expected)
    assert pipeline_fingerprint(pipe) == before


def test_a_call_from_inside_a_running_call_is_refused_not_deadlocked(one_thread):
    pipe = fresh_lora_pipe()
    bf = bf_core.wrap(pipe)
    expected = bf(**id_kwargs()).images
    before = pipeline_fingerprint(pipe)

    def reenter(p, i, t, kwargs):
        bf(**id_kwargs())
        return kwargs

    with pytest.raises(ConcurrentCallError, match="from inside a running call"):
        bf(**id_kwargs(), callback_on_step_end=reenter)
    assert pipeline_fingerprint(pipe) == before
    np.testing.assert_array_equal(bf(**id_kwargs()).images, expected)  # the lock was released


def test_concurrency_policy_is_checked():
    with pytest.raises(ConfigError, match="concurrency must be one of"):
        bf_core.wrap(fresh_lora_pipe(), concurrency="sometimes")


# -- 2. NaN per line ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch_lines", [True, False], ids=["merged", "separate"])
def test_nan_in_the_id_line_only_stops_the_call_at_its_step_naming_the_line(batch_lines,
                                                                             one_thread):
    pipe = fresh_lora_pipe()
    bf = bf_core.wrap(pipe, config=bf_core.BFConfig(batch_lines=batch_lines))
    bf(**id_kwargs())
    before = pipeline_fingerprint(pipe)
    fault = 2
    # The planted NaN is undone when the block ends; the rest must be as it was.
    with nan_in_lora_after(pipe, fault) as poison, pytest.raises(NonFiniteError) as info:
        bf(**id_kwargs(), callback_on_step_end=poison)
    message = str(info.value)
    # Named: the ID line (not the semantic one), the step the fault began, found at once on CPU.
    assert f"the ID line's prediction holds NaN or infinity from step {fault + 1} on" in message
    assert f"found by step {fault + 1}" in message
    assert "identity machinery" in message
    assert pipeline_fingerprint(pipe) == before


def test_nan_from_the_vae_is_refused_instead_of_a_black_image(one_thread):
    pipe = fresh_lora_pipe()
    bf = bf_core.wrap(pipe)
    with nan_out_of(pipe.vae.decoder):
        with pytest.raises(NonFiniteError, match="VAE decoded NaN"):
            bf(**id_kwargs())
        with pytest.raises(NonFiniteError, match="VAE decoded NaN"):
            bf(**id_kwargs(), config=bf_core.BFConfig(enabled=False))
    assert np.isfinite(bf(**id_kwargs()).images).all()


def test_fp16_vae_advice_names_the_upcast_and_the_fixed_vae():
    from bf_core.finite import check_decoded

    image = torch.zeros(1, 3, 8, 8)
    check_decoded(image, torch.float16)  # finite: nothing to say
    image[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="force_upcast.*sdxl-vae-fp16-fix"):
        check_decoded(image, torch.float16)


def test_likely_cause_advice_follows_the_dtype():
    from bf_core.finite import likely_cause

    cpu = torch.device("cpu")
    assert "overflow" in likely_cause("semantic line", torch.float16, cpu)
    assert "identity machinery" in likely_cause("ID line", torch.float32, cpu)
    assert "identity machinery" not in likely_cause("semantic line", torch.float32, cpu)


def test_finite_watch_reports_the_first_bad_step_of_each_line():
    from bf_core.finite import FiniteWatch

    watch = FiniteWatch(["semantic line", "ID line"])
    finite, bad = torch.zeros(2, 4), torch.tensor([[0.0, float("nan")]])
    for step in range(3):
        watch.observe(step, 0, finite)
        watch.observe(step, 1, bad if step >= 1 else finite)
    with pytest.raises(NonFiniteError, match="ID line's prediction holds NaN or infinity from "
                                             "step 1 on"):
        watch.check(2)
    quiet = FiniteWatch(["semantic line"])
    quiet.observe(0, 0, finite)
    quiet.check(0)
    with pytest.raises(NonFiniteError, match="final latents"):
        quiet.finish(0, torch.tensor([float("inf")]))


# -- 6. out of memory ---------------------------------------------------------------------------
def test_out_of_memory_inside_a_call_is_named_with_advice_and_state_is_restored(one_thread):
    pipe = fresh_lora_pipe()
    bf = bf_core.wrap(pipe)
    bf(**id_kwargs())
    before = pipeline_fingerprint(pipe)
    # The third UNet call is mid-loop, with the ID line's adapters switched on.
    with out_of_memory_in(pipe.unet, at_call=3), \
            pytest.raises(DeviceOutOfMemoryError) as info:
        bf(**id_kwargs())
    message = str(info.value)
    assert "batch_lines=False" in message and "enable_model_cpu_offload" in message
    assert "smaller height and width" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert pipeline_fingerprint(pipe) == before
    with out_of_memory_in(pipe.unet, at_call=3), \
            pytest.raises(DeviceOutOfMemoryError) as separate:
        bf(**id_kwargs(), config=bf_core.BFConfig(batch_lines=False))
    assert "batch_lines=False" not in str(separate.value)  # already separate: not advised


# -- 4. keywords --------------------------------------------------------------------------------
@pytest.mark.parametrize("typo, meant", [("num_inference_step", "num_inference_steps"),
                                         ("id_promt", "id_prompt"),
                                         ("guidance", "guidance_scale"),
                                         ("id_negative_promt", "id_negative_prompt")])
def test_a_misspelt_keyword_is_refused_naming_the_closest_valid_one(typo, meant, lora_pipe):
    bf = bf_core.wrap(lora_pipe)
    with pytest.raises(ConfigError, match=rf"unknown keyword\(s\).*'{typo}' \(did you mean "
                                          rf"'{meant}'\?\)"):
        bf(**id_kwargs(), **{typo: 3})


def test_backend_options_and_pipeline_keywords_are_accepted(lora_pipe):
    bf = bf_core.wrap(lora_pipe)
    # A keyword of the pipeline's __call__, one of the method and one of the backend.
    images = bf(**id_kwargs(guidance_rescale=0.1), return_fusion_maps=True,
                id_negative_prompt="blurry").images
    assert np.isfinite(images).all()


def test_id_negative_prompt_list_must_match_the_batch(lora_pipe):
    bf = bf_core.wrap(lora_pipe)
    with pytest.raises(ConfigError, match="id_negative_prompt has 2 entries but the batch has 1"):
        bf(**id_kwargs(id_negative_prompt=["blurry", "dark"]))
    with pytest.raises(ConfigError, match="negative_prompt has 3 entries but the batch has 2"):
        bf(**id_kwargs(prompt=["a", "b"], negative_prompt=["x", "y", "z"]))


# -- 5. raw errors ------------------------------------------------------------------------------
def test_wrapping_a_wrapper_wraps_its_pipeline(lora_pipe):
    inner = bf_core.wrap(lora_pipe, config=bf_core.BFConfig(enabled=False))
    outer = bf_core.wrap(inner)
    assert outer.pipe is lora_pipe and outer.unwrap() is lora_pipe
    assert outer.config == bf_core.BFConfig()  # this call's settings, not the inner wrapper's
    np.testing.assert_array_equal(outer(**id_kwargs()).images,
                                  bf_core.wrap(lora_pipe)(**id_kwargs()).images)


def test_a_wrong_config_object_is_named(lora_pipe):
    with pytest.raises(ConfigError, match="config must be a BFConfig, got str"):
        bf_core.wrap(lora_pipe)(**id_kwargs(), config="fast")
