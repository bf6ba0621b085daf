"""The dual-line loop on the tiny pipeline: parity, schedule, counts, callbacks, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bf_core
from bf_core.errors import ConfigError, NonFiniteError
from bf_core.testing import add_tiny_lora, tiny_sdxl_pipeline

PROMPT = "a person is kneeling by a small lake"
ID_PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def pipe(lora_pipe):
    return lora_pipe


@pytest.fixture(scope="module")
def euler_pipe():
    pipe = tiny_sdxl_pipeline(seed=0, scheduler="euler")
    add_tiny_lora(pipe, adapter_name="identity")
    return pipe


def kwargs(seed=0, **extra):
    base = dict(num_inference_steps=6, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed))
    base.update(extra)
    return base


class UNetRecorder:
    """Counts UNet calls independently of the loop: rows and context length per call."""

    def __init__(self, unet):
        self.calls: list[tuple[int, int]] = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], kwargs["encoder_hidden_states"].shape[1]))

    def close(self):
        self.handle.remove()

    @property
    def rows(self) -> int:
        return sum(rows for rows, _ in self.calls)


@pytest.mark.parametrize("extra", [
    {},
    {"negative_prompt": "blurry"},
    {"guidance_rescale": 0.7},
    {"guidance_scale": 1.0},
    {"num_images_per_prompt": 2, "prompt": [PROMPT, "a person riding a bike"]},
    {"eta": 0.5},
    {"denoising_end": 0.6},
    {"output_type": "latent"},
], ids=["plain", "negative", "rescale", "no-cfg", "batch", "eta", "denoising-end", "latent"])
def test_method_off_equals_stock_pipeline(pipe, extra):
    call = {"prompt": PROMPT, **extra}
    stock = pipe(**kwargs(**call)).images
    wrapped = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(**kwargs(**call)).images
    np.testing.assert_array_equal(np.asarray(wrapped), np.asarray(stock))


def test_method_off_equals_stock_with_euler(euler_pipe):
    stock = euler_pipe(prompt=PROMPT, **kwargs()).images
    off = bf_core.wrap(euler_pipe, config=bf_core.BFConfig(enabled=False))(prompt=PROMPT, **kwargs())
    np.testing.assert_array_equal(off.images, stock)


def test_method_on_runs_with_euler_and_differs(euler_pipe):
    off = bf_core.wrap(euler_pipe, config=bf_core.BFConfig(enabled=False))(prompt=PROMPT, **kwargs())
    on = bf_core.wrap(euler_pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs())
    assert np.isfinite(on.images).all() and np.abs(on.images - off.images).max() > 1e-4


def test_fifty_steps_cost_178_unet_sample_evaluations(pipe):
    recorder = UNetRecorder(pipe.unet)
    try:
        pipe(prompt=PROMPT, **kwargs(num_inference_steps=50, output_type="latent"))
        stock_rows = recorder.rows
        recorder.calls.clear()
        out = bf_core.wrap(pipe, config=bf_core.BFConfig(idaf_start=10))(
            prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs(num_inference_steps=50, output_type="latent"))
    finally:
        recorder.close()
    assert stock_rows == 100
    assert recorder.rows == 178  # semantic 50 x 2 + ID line at steps 11..49, 39 x 2
    assert out.diagnostics["model_rows"] == 178


def test_id_line_and_idap_start_after_their_thresholds(pipe):
    recorder = UNetRecorder(pipe.unet)
    steps_seen = []

    def remember(pipeline, step, timestep, tensors):
        steps_seen.append((step, len(recorder.calls)))
        return tensors

    config = bf_core.BFConfig(idaf_start=3, idap_start=5, idap=bf_core.IdAPConfig(num_tokens=8),
                              batch_lines=False)  # one UNet call per line, to see each line
    try:
        bf_core.wrap(pipe, config=config)(prompt=PROMPT, id_prompt=ID_PROMPT,
                                          callback_on_step_end=remember,
                                          **kwargs(num_inference_steps=10, output_type="latent"))
    finally:
        recorder.close()
    calls_per_step = np.diff([0] + [count for _, count in steps_seen])
    assert [s for s, _ in steps_seen] == list(range(10))  # the callback runs once per step
    assert list(calls_per_step) == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]  # ID line only at i > 3
    semantic_lengths = [recorder.calls[count - n][1] for (_, count), n in zip(steps_seen, calls_per_step, strict=True)]
    assert semantic_lengths == [77] * 6 + [85] * 4  # IdAP tokens only at i > 5


def test_callback_sees_and_changes_the_fused_latents(pipe):
    def run(change_at=None):
        seen = []

        def callback(pipeline, step, timestep, tensors):
            seen.append(tensors["latents"].clone())
            if step == change_at:
                return {"latents": tensors["latents"] * 0.5}
            return tensors

        final = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, callback_on_step_end=callback,
                                   **kwargs(output_type="latent")).images
        return seen, final

    plain_seen, plain = run()
    changed_seen, changed = run(change_at=2)
    assert len(plain_seen) == 6  # once per step
    assert torch.equal(plain_seen[-1], plain)  # it sees the latents the step produced
    assert all(torch.equal(a, b) for a, b in zip(plain_seen[:3], changed_seen[:3], strict=True))
    assert not torch.equal(plain_seen[3], changed_seen[3])  # later steps ran on its latents
    assert not torch.equal(plain, changed)


def test_interrupt_stops_the_loop(pipe):
    recorder = UNetRecorder(pipe.unet)

    def stop(pipeline, step, timestep, tensors):
        if step == 1:
            pipeline._interrupt = True
        return tensors

    try:
        out = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, callback_on_step_end=stop,
                                 **kwargs(output_type="latent"))
    finally:
        recorder.close()
    assert len(recorder.calls) == 2 and out.images.shape == (1, 4, 8, 8)


def test_shared_negative_matches_separate_negative(pipe):
    config = bf_core.BFConfig(semantic_adapters="on", idaf_start=1, idap_start=4)
    separate = bf_core.wrap(pipe, config=config)(prompt=PROMPT, id_prompt=ID_PROMPT,
                                                 **kwargs(output_type="latent"))
    shared = bf_core.wrap(pipe, config=bf_core.BFConfig(semantic_adapters="on", idaf_start=1,
                                                        idap_start=4, share_negative=True))(
        prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs(output_type="latent"))
    # Shared only while both negatives are identical: steps 2..4 (after M1, up to M2).
    assert separate.diagnostics["model_rows"] - shared.diagnostics["model_rows"] == 3
    torch.testing.assert_close(shared.images, separate.images, rtol=0, atol=1e-5)


def test_negative_never_shared_when_the_lines_run_different_models(pipe):
    shared = bf_core.wrap(pipe, config=bf_core.BFConfig(share_negative=True))(
        prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs(output_type="latent"))
    plain = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs(output_type="latent"))
    assert torch.equal(shared.images, plain.images)
    assert shared.diagnostics["model_rows"] == plain.diagnostics["model_rows"]


def test_idap_negative_policies_differ_only_with_a_real_negative(pipe):
    def run(policy, **extra):
        config = bf_core.BFConfig(idap=bf_core.IdAPConfig(negative=policy), idap_start=1)
        return bf_core.wrap(pipe, config=config)(prompt=PROMPT, id_prompt=ID_PROMPT,
                                                 **kwargs(output_type="latent", **extra)).images

    # SDXL's default negative is all zeros, whose aggregation is exactly zero.
    assert torch.equal(run("aggregate"), run("zeros"))
    assert not torch.equal(run("aggregate", negative_prompt="blurry"),
                           run("zeros", negative_prompt="blurry"))


def test_ablations_change_the_result(pipe):
    def run(**fields):
        return bf_core.wrap(pipe, config=bf_core.BFConfig(**fields))(
            prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs(output_type="latent"))

    full, no_idaf, no_idap = run(), run(use_idaf=False), run(use_idap=False)
    assert no_idaf.diagnostics["model_rows"] == 12  # the ID line never runs
    assert not torch.equal(full.images, no_idaf.images)
    assert not torch.equal(full.images, no_idap.images)
    cfg_delta = run(idaf=bf_core.IdAFConfig(saliency="cfg_delta"))
    assert not torch.equal(full.images, cfg_delta.images)


def test_fusion_maps_and_strip(pipe):
    out = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, return_fusion_maps=True,
                             **kwargs(num_images_per_prompt=2))
    m1 = out.diagnostics["idaf_start"]
    assert out.fusion_steps == list(range(m1 + 1, 6))
    assert out.fusion_maps.shape == (len(out.fusion_steps), 2, 1, 8, 8)
    strip = bf_core.render_fusion_strip(out.fusion_maps, out.fusion_steps, sample=1)
    assert strip.width == 96 * len(out.fusion_steps)
    pixels = np.asarray(strip)[20:, :, :]
    assert {tuple(p) for p in pixels.reshape(-1, 3)} <= {(255, 140, 0), (30, 60, 120)}


def test_return_dict_false_gives_a_tuple(pipe):
    out = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, return_dict=False, **kwargs())
    assert isinstance(out, tuple) and out[0].shape == (1, 64, 64, 3)


def test_int_threshold_beyond_the_schedule_is_refused(pipe):
    with pytest.raises(ConfigError, match="idaf_start"):
        bf_core.wrap(pipe, config=bf_core.BFConfig(idaf_start=5))(prompt=PROMPT, **kwargs())


def test_nan_in_the_noise_is_reported(pipe):
    handle = pipe.unet.register_forward_hook(lambda module, args, output: (output[0] * float("nan"),))
    try:
        with pytest.raises(NonFiniteError, match="NaN"):
            bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs())
    finally:
        handle.remove()


def test_wrapper_keeps_the_original_pipeline(pipe):
    bf = bf_core.wrap(pipe)
    assert bf.pipe is pipe and bf.unwrap() is pipe
    assert bf.vae_scale_factor == pipe.vae_scale_factor  # the pipeline's attributes pass through
    assert bf.with_config(enabled=False).config.enabled is False and bf.config.enabled is True


def test_model_cpu_offload_keeps_results_and_parity():
    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="identity")
    plain = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs()).images
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate hooks on every component
    offloaded = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, **kwargs()).images
    np.testing.assert_array_equal(offloaded, plain)
    stock = pipe(prompt=PROMPT, **kwargs()).images
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(prompt=PROMPT, **kwargs())
    np.testing.assert_array_equal(off.images, stock)
