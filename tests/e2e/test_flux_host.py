"""The FLUX.1 host on the tiny offline FluxPipeline, with the DreamBooth backend (a character
LoRA on the transformer): the stock pipeline's bits with the method off, the transformer
sample-evaluations of the formula, merged lines equal to separate ones, IdAP's text length.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bf_core
from bf_core import Person
from bf_core.errors import ConfigError, UnsupportedPipelineError
from bf_core.testing import batch_invariant_kernels
from bf_core.testing.faces import ScriptedFaceDetector
from bf_core.testing.fingerprint import pipeline_fingerprint
from bf_core.testing.tiny_flux import add_tiny_flux_lora, tiny_flux_pipeline

STEPS = 6
PROMPT = "two friends at a market"
ID_PROMPT = "a photo of sks man"
TRUE_CFG = dict(negative_prompt="blurry", true_cfg_scale=2.0)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_flux_pipeline(seed=0)
    add_tiny_flux_lora(pipe, adapter_name="identity")
    return pipe


def stock_kwargs(**extra):
    return dict(dict(prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64,
                     output_type="np", max_sequence_length=64,
                     generator=torch.Generator().manual_seed(0)), **extra)


def wrapped(pipe, config=None, **extra):
    return bf_core.wrap(pipe, config=config)(**stock_kwargs(id_prompt=ID_PROMPT, **extra))


def text_lengths(pipe):
    """Records the T5 length of every transformer call."""
    lengths = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True)
    return lengths, handle


def test_fractions_of_the_schedule_are_floored_on_flux(pipe, one_thread):
    """0.2 and 0.3 of FLUX's 28 default steps are steps 5 and 8 (SDXL rounds: 6 and 8)."""
    result = wrapped(pipe, num_inference_steps=28, max_sequence_length=16, output_type="latent")
    assert (result.diagnostics["idaf_start"], result.diagnostics["idap_start"]) == (5, 8)
    assert bf_core.BFConfig().thresholds(28) == (6, 8)


def test_wrap_finds_the_flux_host_and_refuses_an_sdxl_only_backend(pipe):
    bf = bf_core.wrap(pipe)
    assert (bf.host.name, bf.backend.name) == ("flux", "dreambooth")
    with pytest.raises(UnsupportedPipelineError, match="photomaker"):
        bf_core.wrap(pipe, backend="photomaker")


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled guidance", "true CFG"])
@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_method_off_reproduces_the_stock_pipeline_bit_for_bit(cfg, output_type, pipe, one_thread):
    steps_seen = []

    def callback(p, i, t, values):
        steps_seen.append((i, float(t), values["latents"].clone()))
        return {}

    extra = dict(cfg, output_type=output_type, callback_on_step_end=callback)
    stock = pipe(**stock_kwargs(**extra)).images
    stock_steps, steps_seen[:] = list(steps_seen), []
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(**stock_kwargs(**extra))
    np.testing.assert_array_equal(np.asarray(off.images), np.asarray(stock))
    assert [(i, t) for i, t, _ in steps_seen] == [(i, t) for i, t, _ in stock_steps]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(steps_seen, stock_steps,
                                                                 strict=True))


@pytest.mark.parametrize("cfg, branches", [({}, 1), (TRUE_CFG, 2)], ids=["distilled", "true CFG"])
def test_transformer_sample_evaluations_follow_the_formula(cfg, branches, pipe, one_thread):
    result = wrapped(pipe, **cfg)
    m1 = result.diagnostics["idaf_start"]
    assert m1 == int(0.2 * STEPS)  # fractions are floored on FLUX
    assert result.diagnostics["model_rows"] == branches * (STEPS + (STEPS - m1 - 1))
    off = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(**stock_kwargs(**cfg))
    assert off.diagnostics["model_rows"] == branches * STEPS


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled", "true CFG"])
def test_merged_lines_equal_separate_lines_under_batch_invariant_kernels(cfg, pipe, one_thread):
    with batch_invariant_kernels():
        merged = wrapped(pipe, **cfg)
        separate = wrapped(pipe, config=bf_core.BFConfig(batch_lines=False), **cfg)
    np.testing.assert_array_equal(merged.images, separate.images)
    assert merged.diagnostics["model_calls"] == STEPS < separate.diagnostics["model_calls"]


def test_the_method_changes_the_image_and_the_id_line_sees_the_lora(pipe, one_thread):
    stock = pipe(**stock_kwargs()).images
    on = wrapped(pipe)
    assert not np.array_equal(on.images, stock)
    pipe.disable_lora()
    try:
        bare = wrapped(pipe)
    finally:
        pipe.enable_lora()
    assert not np.array_equal(on.images, bare.images)


def test_idap_takes_the_place_of_t5_padding_so_the_lines_share_one_call(pipe, one_thread):
    lengths, handle = text_lengths(pipe)
    try:
        result = wrapped(pipe)
    finally:
        handle.remove()
    k = bf_core.IdAPConfig().num_tokens
    assert set(lengths) == {64}  # the prompt leaves more than K padding tokens
    assert result.diagnostics["model_calls"] == STEPS
    assert result.diagnostics["idap_selection"].shape[1] == k


def test_idap_without_room_in_the_padding_runs_the_semantic_line_on_its_own(pipe, one_thread):
    long_prompt = "two friends shaking hands at a street market, full body, wide shot, by a lake"
    lengths, handle = text_lengths(pipe)
    try:
        result = wrapped(pipe, prompt=long_prompt, max_sequence_length=16)
    finally:
        handle.remove()
    k = bf_core.IdAPConfig().num_tokens
    m2 = result.diagnostics["idap_start"]
    assert 16 + k in lengths and 16 in lengths
    # Up to M2 one call per step; after it the semantic line (N*K + L tokens) and the ID
    # line (L tokens) run as two calls.
    assert result.diagnostics["model_calls"] == (m2 + 1) + 2 * (STEPS - m2 - 1)


def test_fusion_runs_on_the_unpacked_latent_grid(pipe, one_thread):
    result = wrapped(pipe, return_fusion_maps=True)
    steps, rows, channels, h, w = result.fusion_maps.shape
    assert (rows, channels, h, w) == (1, 1, 64 // pipe.vae_scale_factor, 64 // pipe.vae_scale_factor)
    assert steps == STEPS - result.diagnostics["idaf_start"] - 1
    assert result.fusion_maps.any() and not result.fusion_maps.all()


def test_two_people_with_auto_regions_on_flux(pipe, one_thread):
    detector = ScriptedFaceDetector([(0.1, 0.2, 0.3, 0.4), (0.6, 0.2, 0.8, 0.4)])
    people = [Person(id_prompt="a photo of sks woman", region="auto"),
              Person(id_prompt=ID_PROMPT, region="auto")]
    result = bf_core.wrap(pipe)(**stock_kwargs(people=people, preview_face_analyzer=detector,
                                               return_fusion_maps=True))
    left, right = result.regions
    assert detector.seen == [(64, 64)] and left.shape == (1, 32, 32)  # the full-size preview
    columns = torch.arange(32)
    assert columns[left[0].any(0)].float().mean() < columns[right[0].any(0)].float().mean()
    lines = result.fusion_lines[:, 0, 0]
    assert not (lines[:, ~left[0]] == 1).any() and not (lines[:, ~right[0]] == 2).any()


def test_bad_settings_are_named_and_the_pipeline_is_left_as_it_was(pipe):
    before = pipeline_fingerprint(pipe)
    with pytest.raises(ConfigError, match="max_sequence_length must be <= 512"):
        wrapped(pipe, max_sequence_length=600)
    with pytest.raises(ConfigError, match="true_cfg_scale"):
        wrapped(pipe, true_cfg_scale=float("nan"))
    with pytest.raises(ConfigError, match="did you mean 'guidance_scale'"):
        wrapped(pipe, guidance_scal=3.0)
    for keyword in ("height", "width"):  # 0 is a wrong size, not the default one
        with pytest.raises(ConfigError, match=keyword):
            wrapped(pipe, **{keyword: 0})
    assert pipeline_fingerprint(pipe) == before


def test_a_backend_whose_id_tokens_are_not_text_tokens_runs_without_idap(pipe, monkeypatch,
                                                                        one_thread):
    """A backend declaring ``idap_applicable = False`` (PuLID-FLUX's 2048-wide T_id): the loop
    skips IdAP with a warning and says so in the diagnostics; the ID line still runs."""
    from bf_core import loop

    bf = bf_core.wrap(pipe)
    monkeypatch.setattr(bf.backend, "idap_applicable", False, raising=False)
    monkeypatch.setattr(loop, "_IDAP_WARNED", set())
    lengths, handle = text_lengths(pipe)
    try:
        with pytest.warns(UserWarning, match="IdAP does not apply to the dreambooth backend"):
            result = bf(**stock_kwargs(id_prompt=ID_PROMPT, max_sequence_length=16))
    finally:
        handle.remove()
    assert result.diagnostics["idap"] == "not applicable"
    assert "idap_selection" not in result.diagnostics and set(lengths) == {16}
    assert result.diagnostics["model_calls"] == STEPS  # both lines share every call


def test_the_x0_saliency_scores_each_lines_clean_latent_estimate(pipe, lora_pipe, one_thread):
    """``IdAFConfig(saliency="x0")``, the ablation of decision 8.2: on FLUX the score is
    |x_t - sigma v| per line (checked by hand at the first fused step); it runs on SDXL too
    (the scheduler's x0), and its maps differ from ``"guided"``'s."""
    from bf_core.config import IdAFConfig
    from bf_core.fusion import winning_lines

    config = bf_core.BFConfig(idaf=IdAFConfig(saliency="x0"))
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs["hidden_states"], out[0])),
        with_kwargs=True)
    try:
        result = bf_core.wrap(pipe, config=config)(**stock_kwargs(id_prompt=ID_PROMPT,
                                                                  return_fusion_maps=True))
    finally:
        handle.remove()
    first = result.diagnostics["idaf_start"] + 1  # one call per step: both lines' rows
    x_t, v = calls[first]  # rows: semantic, ID
    sigma = pipe.scheduler.sigmas[first]
    unpack = lambda t: pipe._unpack_latents(t, 64, 64, pipe.vae_scale_factor)  # noqa: E731
    x0 = unpack(x_t - sigma * v)
    expected = winning_lines(x0[:1], [x0[1:]], config.idaf) > 0
    assert torch.equal(result.fusion_maps[0], expected)

    guided = bf_core.wrap(lora_pipe)(prompt=PROMPT, num_inference_steps=STEPS, height=64,
                                     width=64, output_type="np", id_prompt=ID_PROMPT,
                                     generator=torch.Generator().manual_seed(0),
                                     return_fusion_maps=True)
    sdxl_x0 = bf_core.wrap(lora_pipe, config=config)(
        prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64, output_type="np",
        id_prompt=ID_PROMPT, generator=torch.Generator().manual_seed(0),
        return_fusion_maps=True)
    assert not torch.equal(sdxl_x0.fusion_maps[0], guided.fusion_maps[0])
