"""PuLID-FLUX end to end on the tiny FluxPipeline: conformance kit (distilled guidance and true
CFG), the baseline against the spec's algorithm, exact zero rows, the row count, IdAP not
applicable, several people, state restored after an error.

There is no stock diffusers PuLID-FLUX pipeline. The reference for the baseline is written
here from the spec (flux.md 3.2-3.4, the official flux/model.py and sampling.py): hooks on the
stock transformer's blocks that add ``id_weight * CA(id, img)`` after double blocks i % 2 == 0
and single blocks i % 4 == 0, with the cross-attention written out as the official
``PerceiverAttentionCA.forward``, T_id on the conditional call and the IDFormer of all-zero
inputs on the unconditional one, from step ``start_step`` on; then the stock FluxPipeline call.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bf_core
from bf_backends.pulid.testing import tiny_face_image
from bf_backends.pulid_flux.backend import attach_pulid_flux, detach_pulid_flux
from bf_backends.pulid_flux.testing import reference_photo_path, tiny_pipeline
from bf_core import Person
from bf_core.errors import ConfigError, UnsupportedPipelineError
from bf_core.images import load_image
from bf_core.testing import (
    BackendConformance,
    batch_invariant_kernels,
    forward_hooks_registered,
    tiny_sdxl_pipeline,
)
from bf_core.testing.fingerprint import pipeline_fingerprint

# Tiny models gain nothing from threads (the conformance kit's tests included).
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

STEPS = 6
PROMPT = "a person is kneeling by a small lake"
# T5 padded to 64 tokens, not 512: the same code paths, a faster suite
SHORT_TEXT = {"max_sequence_length": 64}
TRUE_CFG = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}


# ------------------------------------------------------------------ the spec's reference

def spec_embeddings(pipe, photo) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_id, uncond ID), each (1, 32, kv): the IDFormer on the photo's features, and on
    all-zero inputs of the same shapes (pulid/pipeline_flux.py get_id_embedding)."""
    adapter = pipe.pulid_flux
    features = adapter.features(load_image(photo), 0)
    id_cond, hidden = features.id_cond, features.vit_hidden
    with torch.no_grad():
        positive = adapter.encoder(id_cond, hidden)
        negative = adapter.encoder(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in hidden])
    return positive, negative


def spec_cross_attention(ca, heads: int, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """``PerceiverAttentionCA.forward(x=id, latents=img)`` as the official code writes it."""
    x = F.layer_norm(x, ca.norm1.normalized_shape, ca.norm1.weight, ca.norm1.bias, ca.norm1.eps)
    latents = F.layer_norm(latents, ca.norm2.normalized_shape, ca.norm2.weight, ca.norm2.bias,
                           ca.norm2.eps)
    b, seq_len, _ = latents.shape
    q = F.linear(latents, ca.to_q.weight)
    k, v = F.linear(x, ca.to_kv.weight).chunk(2, dim=-1)

    def reshape_tensor(t):
        bs, length, width = t.shape
        return t.view(bs, length, heads, -1).transpose(1, 2).reshape(bs, heads, length, -1)

    q, k, v = reshape_tensor(q), reshape_tensor(k), reshape_tensor(v)
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    weight = (q * scale) @ (k * scale).transpose(-2, -1)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = (weight @ v).permute(0, 2, 1, 3).reshape(b, seq_len, -1)
    return F.linear(out, ca.to_out.weight)


@contextmanager
def spec_hooks(pipe, photo, *, id_weight: float = 1.0, start_step: int = 0,
               calls_per_step: int = 1):
    """The official injection on the stock transformer. Transformer calls are counted: with
    true CFG the stock pipeline makes the conditional call of a step, then the unconditional
    one."""
    positive, negative = spec_embeddings(pipe, photo)
    transformer, adapter = pipe.transformer, pipe.pulid_flux
    blocks = ([b for i, b in enumerate(transformer.transformer_blocks) if i % 2 == 0]
              + [b for i, b in enumerate(transformer.single_transformer_blocks) if i % 4 == 0])
    calls = [-1]

    def count(module, args):
        calls[0] += 1

    handles = [transformer.register_forward_pre_hook(count)]
    for ca, block in zip(adapter.cross_attention, blocks, strict=True):
        def inject(module, args, output, ca=ca):
            step, branch = divmod(calls[0], calls_per_step)
            if step < start_step:
                return None
            txt, img = output
            id_tokens = positive if branch == 0 else negative
            return txt, img + id_weight * spec_cross_attention(ca, adapter.config.ca_heads,
                                                               id_tokens, img)
        handles.append(block.register_forward_hook(inject))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def call_kwargs(seed: int = 0, **overrides):
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64,
                  output_type="np", generator=torch.Generator().manual_seed(seed), **SHORT_TEXT)
    kwargs.update(overrides)
    return kwargs


def photo():
    return str(reference_photo_path())


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def baseline(pipe, **kwargs):
    return bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(**kwargs)


# ------------------------------------------------------------------ conformance kit

class TestPuLIDFluxConformance(BackendConformance):
    backend_name = "pulid_flux"
    merges_lines = True
    calls_per_step = 1

    def make_pipeline(self):
        return tiny_pipeline()

    def identity_kwargs(self):
        return {"id_images": [photo()], **SHORT_TEXT}

    def stock_kwargs(self):
        return dict(SHORT_TEXT)

    def stock_call(self, pipe, **kwargs):
        with spec_hooks(pipe, photo(), calls_per_step=self.calls_per_step):
            return pipe(**kwargs)


class TestPuLIDFluxTrueCFGConformance(TestPuLIDFluxConformance):
    """With ``true_cfg_scale > 1`` and a negative prompt every line runs its negative pass,
    the ID lines (and the baseline) with the uncond ID."""

    calls_per_step = 2

    def identity_kwargs(self):
        return {**super().identity_kwargs(), **TRUE_CFG}

    def stock_kwargs(self):
        return {**super().stock_kwargs(), **TRUE_CFG}


# ------------------------------------------------------------------ the baseline

@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled", "true CFG"])
@pytest.mark.parametrize("option", [{"id_weight": 0.0}, {"start_step": STEPS}],
                         ids=["id_weight 0", "start_step past the end"])
def test_baseline_without_injection_is_the_stock_pipeline_bit_for_bit(pipe, cfg, option):
    stock = pipe(**call_kwargs(**cfg)).images
    off = baseline(pipe, **call_kwargs(**cfg), id_images=[photo()], **option).images
    np.testing.assert_array_equal(off, stock)
    with_id = baseline(pipe, **call_kwargs(**cfg), id_images=[photo()]).images
    assert np.abs(with_id - stock).max() > 1e-3  # the ID really acts when it is on


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled", "true CFG"])
def test_baseline_honours_start_step_and_id_weight_as_the_official_denoise(pipe, cfg):
    calls_per_step = 2 if cfg else 1
    with spec_hooks(pipe, photo(), id_weight=0.7, start_step=2, calls_per_step=calls_per_step):
        reference = pipe(**call_kwargs(**cfg)).images
    ours = baseline(pipe, **call_kwargs(**cfg), id_images=[photo()], id_weight=0.7,
                    start_step=2).images
    np.testing.assert_array_equal(ours, reference)
    from_zero = baseline(pipe, **call_kwargs(**cfg), id_images=[photo()], id_weight=0.7).images
    assert np.abs(from_zero - ours).max() > 1e-4


def test_attached_defaults_are_the_calls_defaults():
    late = tiny_pipeline(id_weight=0.5, start_step=3)
    with spec_hooks(late, photo(), id_weight=0.5, start_step=3):
        reference = late(**call_kwargs()).images
    np.testing.assert_array_equal(baseline(late, **call_kwargs(), id_images=[photo()]).images,
                                  reference)


def test_baseline_without_photos_is_plain_flux_and_the_method_needs_them(pipe):
    np.testing.assert_array_equal(baseline(pipe, **call_kwargs()).images,
                                  pipe(**call_kwargs()).images)
    with pytest.raises(ConfigError, match="reference photo"):
        bf_core.wrap(pipe)(**call_kwargs())


# ------------------------------------------------------------------ rows of one call

def record_transformer_calls(pipe):
    """(inputs, output) of every transformer call while the returned handle is on."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((dict(kwargs), output[0].clone()))

    return calls, pipe.transformer.register_forward_hook(record, with_kwargs=True)


@pytest.mark.parametrize("cfg", [{}, TRUE_CFG], ids=["distilled", "true CFG"])
def test_semantic_rows_of_a_merged_call_are_exactly_the_plain_transformer(pipe, cfg):
    """ID weight 0 on the semantic rows: in the very same merged call (same rows, same
    kernels) they equal the transformer without any hook, bit for bit, while the ID rows
    differ from it."""
    calls, handle = record_transformer_calls(pipe)
    try:
        result = bf_core.wrap(pipe)(**call_kwargs(**cfg), id_images=[photo()])
    finally:
        handle.remove()
    assert result.diagnostics["model_calls"] == STEPS  # one merged call per step
    semantic_rows = 2 if cfg else 1
    merged = [(inputs, output) for inputs, output in calls
              if inputs["hidden_states"].shape[0] == 2 * semantic_rows]
    assert len(merged) == STEPS - result.diagnostics["idaf_start"] - 1
    for inputs, output in merged:
        with torch.no_grad():
            plain = pipe.transformer(**inputs)[0]
        assert torch.equal(output[:semantic_rows], plain[:semantic_rows])
        assert not torch.allclose(output[semantic_rows:], plain[semantic_rows:])


@pytest.mark.parametrize("cfg, branches", [({}, 1), (TRUE_CFG, 2)], ids=["distilled", "true CFG"])
def test_transformer_rows_follow_the_formula(pipe, cfg, branches):
    result = bf_core.wrap(pipe)(**call_kwargs(**cfg), id_images=[photo()])
    m1 = result.diagnostics["idaf_start"]
    assert result.diagnostics["model_rows"] == branches * (STEPS + (STEPS - m1 - 1))
    off = baseline(pipe, **call_kwargs(**cfg), id_images=[photo()])
    assert off.diagnostics["model_rows"] == branches * STEPS


def test_idap_does_not_apply_it_warns_and_says_so(pipe, monkeypatch):
    from bf_core import loop

    monkeypatch.setattr(loop, "_IDAP_WARNED", set())
    lengths = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="IdAP does not apply to the pulid_flux backend"):
            result = bf_core.wrap(pipe)(**call_kwargs(), id_images=[photo()])
    finally:
        handle.remove()
    assert result.diagnostics["idap"] == "not applicable"
    assert "idap_selection" not in result.diagnostics
    assert set(lengths) == {SHORT_TEXT["max_sequence_length"]}  # no token was prepended


def test_the_blocks_are_hooked_once_per_call(pipe):
    transformer = pipe.transformer
    hooked = {id(getattr(transformer, p.blocks)[p.index]) for p in pipe.pulid_flux.positions}
    with forward_hooks_registered() as registered:
        bf_core.wrap(pipe)(**call_kwargs(), id_images=[photo()])
    blocks = [module for module in registered if id(module) in hooked]
    assert len(blocks) == len(hooked) == len(pipe.pulid_flux.cross_attention)
    assert sum(len(m._forward_hooks) for m in transformer.modules()) == 0


def test_with_the_id_kept_on_in_the_semantic_line_the_negative_rows_can_be_shared(pipe):
    """``semantic_adapters="on"``: every line's negative rows carry the uncond ID (a constant
    of the checkpoint), so sharing them changes nothing."""
    def run(**config):
        return bf_core.wrap(pipe, config=bf_core.BFConfig(**config))(
            **call_kwargs(output_type="latent", **TRUE_CFG), id_images=[photo()])

    with batch_invariant_kernels():
        shared = run(semantic_adapters="on", share_negative=True)
        unshared = run(semantic_adapters="on")
    assert shared.diagnostics["model_rows"] < unshared.diagnostics["model_rows"]
    assert torch.equal(shared.images, unshared.images)
    assert not torch.equal(run().images, unshared.images)


# ------------------------------------------------------------------ several people

def first_id_step_rows(pipe, people):
    """The transformer output of the first step where every ID line runs (one merged call:
    the semantic row, then each person's row)."""
    calls, handle = record_transformer_calls(pipe)
    try:
        with batch_invariant_kernels():
            bf_core.wrap(pipe)(**call_kwargs(output_type="latent"), people=people)
    finally:
        handle.remove()
    return next(output for inputs, output in calls
                if inputs["hidden_states"].shape[0] == 1 + len(people))


def test_each_person_gets_their_own_identity(pipe):
    a = Person([photo()], region=(0.0, 0.0, 0.5, 1.0))
    b = Person([tiny_face_image(5)], region=(0.5, 0.0, 1.0, 1.0))
    b_left, a_right = (Person(b.id_images, region=a.region), Person(a.id_images, region=b.region))
    ab = first_id_step_rows(pipe, [a, b])
    ba = first_id_step_rows(pipe, [b_left, a_right])
    # Up to the first ID step the latents do not depend on the people, and both ID lines
    # share P_id: line j's rows depend on person j's T_id alone.
    assert torch.equal(ab[1], ba[2]) and torch.equal(ab[2], ba[1])
    assert not torch.allclose(ab[1], ab[2])
    same = bf_core.wrap(pipe)(**call_kwargs(), people=[a, Person(a.id_images, region=b.region)])
    different = bf_core.wrap(pipe)(**call_kwargs(), people=[a, b])
    assert np.abs(same.images - different.images).max() > 1e-4


def test_two_people_merged_equal_separate(pipe):
    people = [Person([photo()], region=(0.0, 0.0, 0.5, 1.0)),
              Person([tiny_face_image(5)], region=(0.5, 0.0, 1.0, 1.0))]
    with batch_invariant_kernels():
        merged = bf_core.wrap(pipe)(**call_kwargs(output_type="latent", **TRUE_CFG),
                                    people=people)
        separate = bf_core.wrap(pipe, config=bf_core.BFConfig(batch_lines=False))(
            **call_kwargs(output_type="latent", **TRUE_CFG), people=people)
    assert merged.diagnostics["model_calls"] == STEPS < separate.diagnostics["model_calls"]
    assert torch.equal(merged.images, separate.images)


# ------------------------------------------------------------------ set-up and failures

def test_state_and_hooks_restored_after_an_error_inside_a_hooked_block(pipe):
    before_images = pipe(**call_kwargs()).images
    before = pipeline_fingerprint(pipe)
    ca = pipe.pulid_flux.cross_attention[-1]
    calls = []

    def fail_late(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("forced failure inside the ID cross-attention")

    handle = ca.register_forward_pre_hook(fail_late)
    try:
        with pytest.raises(RuntimeError, match="forced failure"):
            bf_core.wrap(pipe)(**call_kwargs(), id_images=[photo()])
    finally:
        handle.remove()
    assert len(calls) == 3
    assert pipeline_fingerprint(pipe) == before
    np.testing.assert_array_equal(pipe(**call_kwargs()).images, before_images)


def test_bad_options_are_named_before_anything_runs(pipe):
    before = pipeline_fingerprint(pipe)
    with pytest.raises(ConfigError, match="id_weight"):
        bf_core.wrap(pipe)(**call_kwargs(), id_images=[photo()], id_weight=float("nan"))
    with pytest.raises(ConfigError, match="start_step"):
        bf_core.wrap(pipe)(**call_kwargs(), id_images=[photo()], start_step=-1)
    assert pipeline_fingerprint(pipe) == before


def test_attaching_takes_the_pipeline_from_dreambooth_and_detaching_gives_it_back():
    pipe = tiny_pipeline()
    assert bf_core.wrap(pipe).backend.name == "pulid_flux"
    with pytest.raises(UnsupportedPipelineError):
        bf_core.wrap(pipe, backend="dreambooth")
    with pytest.raises(ConfigError, match="already attached"):
        attach_pulid_flux(pipe, {}, pipe.pulid_flux.features)
    detach_pulid_flux(pipe)
    assert bf_core.wrap(pipe).backend.name == "dreambooth"


def test_modules_left_on_another_device_are_a_named_error_and_nothing_stays_hooked():
    moved = tiny_pipeline()
    moved.pulid_flux.cross_attention.to("meta")  # a device the transformer does not run on
    with pytest.raises(ConfigError, match=r"pipe.pulid_flux.to\('cpu'\)"):
        bf_core.wrap(moved, config=bf_core.BFConfig(enabled=False))(
            **call_kwargs(), id_images=[photo()])
    assert sum(len(m._forward_hooks) for m in moved.transformer.modules()) == 0


def test_loading_from_files_names_what_is_missing(tmp_path):
    from bf_backends.pulid_flux.loader import load_pipeline_setup
    from bf_backends.pulid_flux.testing import write_tiny_pulid_flux_checkpoint

    with pytest.raises(ConfigError, match="must be the PuLID-FLUX file"):
        load_pipeline_setup("black-forest-labs/FLUX.1-dev", None)
    path = write_tiny_pulid_flux_checkpoint(tmp_path, tiny_pipeline().transformer)
    with pytest.raises(ConfigError, match="antelopev2.*parsing_bisenet.pth.*EVA02"):
        load_pipeline_setup("black-forest-labs/FLUX.1-dev", str(path))


def test_attach_refuses_a_pipeline_that_is_not_flux():
    with pytest.raises(ConfigError, match="FluxPipeline"):
        attach_pulid_flux(tiny_sdxl_pipeline(), {}, None)
