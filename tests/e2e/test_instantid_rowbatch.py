"""InstantID with both lines in one UNet call: the per-row switches are exact, the loop faithful.

The exactness tests take a merged batch from a real run and evaluate the very same merged
inputs three ways: with the backend's row state (ID attention and IdentityNet on for the ID
rows only), with the identity machinery off for every row (ID attention scale 0, no
IdentityNet) and on for every row. Same batch composition, same kernels: the rows must agree
bit for bit. Merged and separate loops agree to round-off only
(``bf_core.hosts.sdxl.merge_row_batches``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import bf_core
from bf_backends.instantid.backend import InstantIDSession
from bf_backends.instantid.testing import face_pack, tiny_official_style_pipeline, tiny_pipeline
from bf_core.hosts.sdxl import RowBatch
from bf_core.records import Line
from bf_core.testing import batch_invariant_kernels

pytestmark = pytest.mark.filterwarnings("ignore::bf_core.faces.MultipleFacesWarning")

REFERENCE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), np.uint8))
SIZE, STEPS = 64, 10
PIPELINES = {"native": tiny_pipeline, "official": tiny_official_style_pipeline}


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    from bf_core.faces import FaceAnalyzer

    root = tmp_path_factory.mktemp("faces")
    return FaceAnalyzer(str(face_pack(root / "finds", finds_faces=True)), det_size=(128, 128))


@pytest.fixture(scope="module")
def pipes():
    return {form: make(seed=0) for form, make in PIPELINES.items()}


def generate(pipe, analyzer, steps=STEPS, **settings):
    """One wrapped call; ``settings`` are BFConfig fields, or call options when not."""
    fields = {f.name for f in dataclasses.fields(bf_core.BFConfig)}
    config = bf_core.BFConfig(**{k: v for k, v in settings.items() if k in fields})
    options = {k: v for k, v in settings.items() if k not in fields}
    return bf_core.wrap(pipe, backend="instantid", config=config)(
        prompt="a person is kneeling by a small lake", num_inference_steps=steps, height=SIZE,
        width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(0),
        id_images=[REFERENCE], face_analyzer=analyzer, **options)


def unet_call(session: InstantIDSession, merged: RowBatch, tokens, residuals) -> torch.Tensor:
    """The merged inputs through the UNet with explicit ID tokens and IdentityNet residuals,
    handed over the way each pipeline form takes them."""
    added = {"text_embeds": merged.text_embeds, "time_ids": merged.time_ids}
    context, extra = merged.encoder_hidden_states, {}
    if merged.encoder_attention_mask is not None:
        extra["encoder_attention_mask"] = merged.encoder_attention_mask
    if session.parts.form == "native":
        added["image_embeds"] = [tokens[:, None]]
    else:
        context = torch.cat([context, tokens], dim=1)
    return session.pipe.unet(merged.sample, merged.timestep, encoder_hidden_states=context,
                             added_cond_kwargs=added, return_dict=False, **residuals, **extra)[0]


def machinery_on_for_every_row(session: InstantIDSession, merged: RowBatch):
    """ID tokens for every row, and IdentityNet residuals for every part as if it were the
    ID line (one IdentityNet call per part, as the row state calls it for the ID part)."""
    as_id = [dataclasses.replace(part, line=Line.ID) for part in merged.parts]
    tokens = [session._tokens(part, True) for part in as_id]
    per_part = [session._identitynet_residuals(part, t) for part, t in zip(as_id, tokens, strict=True)]
    assert all(per_part), "IdentityNet must be active at the checked step"
    down = [torch.cat(level) for level in zip(
        *(r["down_block_additional_residuals"] for r in per_part), strict=True)]
    mid = torch.cat([r["mid_block_additional_residual"] for r in per_part])
    return torch.cat(tokens), {"down_block_additional_residuals": down,
                               "mid_block_additional_residual": mid}


class _Checked(Exception):
    """Ends a run once its merged batch was checked: the remaining steps add nothing."""


@pytest.fixture
def merged_checks(monkeypatch):
    """Runs the three evaluations on the first merged batch that ``wanted`` accepts."""
    found: list[dict] = []
    wanted = [lambda batch: True]
    original = InstantIDSession.predict

    def spy(self, merged, model):
        output = original(self, merged, model)
        if merged.parts and wanted[0](merged):
            tokens, residuals = machinery_on_for_every_row(self, merged)
            # Off for the semantic rows: ID attention at scale 0 (unless the semantic line
            # keeps it, semantic_adapters="on") and IdentityNet not run.
            self._set_scales(self.config.semantic_adapters == "on")
            off = unet_call(self, merged, tokens, {})
            self._set_scales(True)
            on = unet_call(self, merged, tokens, residuals)
            ids = [line is not Line.SEMANTIC for line in merged.row_lines]
            found.append(dict(mixed=output, off=off, on=on, id_rows=torch.tensor(ids)))
            raise _Checked
        return output

    monkeypatch.setattr(InstantIDSession, "predict", spy)
    return found, wanted


@pytest.mark.parametrize("form, settings", [
    ("native", {}),  # after M2 the semantic rows carry the IdAP tokens: padding is masked
    ("native", {"semantic_adapters": "on"}),  # ID attention on for every row, IdentityNet not
    ("official", {"use_idap": False}),  # the official form batches equal lengths only
])
def test_row_state_switches_exactly_per_row(pipes, analyzer, merged_checks, form, settings):
    found, wanted = merged_checks
    if not settings:
        wanted[0] = lambda batch: batch.encoder_attention_mask is not None
    with pytest.raises(_Checked):
        generate(pipes[form], analyzer, kps="reference", **settings)
    check = found[0]
    semantic, identity = ~check["id_rows"], check["id_rows"]
    mixed, off, on = check["mixed"], check["off"], check["on"]
    assert semantic.any() and identity.any()
    # Zero ID tokens at the ID scale == scale 0; zero residuals == IdentityNet not called.
    assert torch.equal(mixed[semantic], off[semantic])
    assert torch.equal(mixed[identity], on[identity])
    # Each switch matters: the ID rows really differ with the machinery off, and so would
    # the semantic rows with it on.
    assert (mixed[identity] - off[identity]).abs().max() > 1e-4
    assert (mixed[semantic] - on[semantic]).abs().max() > 1e-4


@pytest.mark.parametrize("form", ["native", "official"])
def test_batched_loop_matches_separate_calls(pipes, analyzer, form):
    """kps='auto' and IdAP on (the defaults). The native form merges every two-line step; the
    official one between M1 and M2 only, and falls back to separate calls once the IdAP
    tokens make the semantic context longer (it cannot take a padding mask)."""
    conds = {}

    def run(batch_lines):
        seen = conds.setdefault(batch_lines, [])
        hook = pipes[form].controlnet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()),
            with_kwargs=True)
        try:
            return generate(pipes[form], analyzer, batch_lines=batch_lines)
        finally:
            hook.remove()

    with batch_invariant_kernels():  # else kernels differ by batch size (~1e-6)
        separate, batched = run(False), run(True)
    m1, m2 = separate.diagnostics["idaf_start"], separate.diagnostics["idap_start"]
    assert m1 < m2 < STEPS - 1
    assert separate.diagnostics["model_calls"] == STEPS + (STEPS - m1 - 1)
    if form == "native":
        assert batched.diagnostics["model_calls"] == STEPS  # one call per step
    else:
        assert batched.diagnostics["model_calls"] == STEPS + (STEPS - m2 - 1)
    assert batched.diagnostics["model_rows"] == separate.diagnostics["model_rows"]
    # IdentityNet ran as often, on the same keypoint images (kps='auto' saw the same preview).
    assert len(conds[True]) == len(conds[False]) > 0
    assert all(torch.equal(a, b) for a, b in zip(conds[True], conds[False], strict=True))
    assert torch.equal(batched.images, separate.images)


def test_state_restored_after_a_failure_inside_a_merged_call(analyzer):
    pipe = tiny_pipeline(seed=0)
    pipe.set_ip_adapter_scale(0.6)
    processors = dict(pipe.unet.attn_processors)
    projection = pipe.unet.encoder_hid_proj
    calls = []

    def fail_on_merged_rows(module, args, kwargs):
        calls.append(args[0].shape[0])
        if len(calls) > 1 and args[0].shape[0] > calls[0]:  # more rows than one line's
            raise RuntimeError("forced failure")

    hook = pipe.unet.register_forward_pre_hook(fail_on_merged_rows, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="forced failure"):
            generate(pipe, analyzer, steps=6, ip_adapter_scale=1.3)
    finally:
        hook.remove()
    assert len(calls) > 1 and calls[-1] > calls[0]  # it failed inside the merged call
    assert pipe.unet.encoder_hid_proj is projection
    for name, proc in pipe.unet.attn_processors.items():
        assert proc is processors[name]
        if hasattr(proc, "to_k_ip"):
            assert proc.scale == [0.6]
