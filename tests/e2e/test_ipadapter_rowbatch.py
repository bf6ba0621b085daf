"""IP-Adapter row batching: both lines in one UNet call, with the identity machinery switched
per row. The per-row switch is exact within one batch composition; the merged loop equals
separate calls up to batch-size-dependent kernel round-off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("insightface")

from PIL import Image  # noqa: E402

import bf_core  # noqa: E402
from bf_backends.ipadapter import testing  # noqa: E402
from bf_backends.ipadapter.backend import IPAdapterSession, _ip_masks_fit_any_batch  # noqa: E402
from bf_backends.ipadapter.state import (  # noqa: E402
    faceid_lora_layers,
    image_projection_layers,
    ip_attention_processors,
)
from bf_core.faces import FaceAnalyzer  # noqa: E402
from bf_core.records import Line  # noqa: E402
from bf_core.testing import (  # noqa: E402
    add_tiny_lora,
    batch_invariant_kernels,
    forward_hooks_registered,
    pipeline_fingerprint,
)
from bf_core.testing.faces import make_random_insightface_pack  # noqa: E402

# The random detector finds several faces in a random photo; the policy picks one.
pytestmark = pytest.mark.filterwarnings("ignore::bf_core.faces.MultipleFacesWarning")

PROMPT = "a person is kneeling by a small lake, touching the water"
# Covers every piece of per-row state: IP tokens (all), FaceID LoRA (faceid, faceid-plusv2),
# FaceID-Plus clip_embeds module state (faceid-plusv2).
VARIANTS = ["vit-h", "plus-face", "faceid", "faceid-plusv2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one thread (see the ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("buffalo_l")
    make_random_insightface_pack(folder, seed=0, face_logit_bias=10.0)
    return FaceAnalyzer(folder, det_size=(128, 128))


def photo(seed: int = 0, size: int = 96) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def identity_kwargs(variant: str, analyzer) -> dict:
    if variant in testing.FACEID_VARIANTS:
        return {"id_images": [photo()], "face_analyzer": analyzer}
    return {"id_images": [photo()]}


def call_kwargs(steps: int, **overrides) -> dict:
    kwargs = dict(prompt=PROMPT, num_inference_steps=steps, height=64, width=64,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    kwargs.update(overrides)
    return kwargs


def separate_calls(steps: int, idaf_start: int) -> int:
    """UNet calls of a run with one call per line: the ID line stops at the IdAF start."""
    return steps + (steps - idaf_start - 1)


@pytest.mark.parametrize(("variant", "style_lora"), [(variant, False) for variant in VARIANTS]
                         + [("faceid", True)])
def test_row_switch_is_exact_within_the_merged_batch(variant, style_lora, analyzer, monkeypatch):
    """At every merged step of a real run (IdAP-padded context, encoder attention mask, CFG),
    the semantic rows of the row-switched call equal, bit for bit, the same merged inputs
    run with the identity machinery off for the whole batch, and the ID rows the same
    inputs with it on for the whole batch. With a style LoRA on the FaceID LoRA's layers,
    only the FaceID LoRA is switched: the style LoRA stays on for every row."""
    pipe = testing.tiny_pipeline(variant)
    if style_lora:
        add_tiny_lora(pipe, adapter_name="style", text_encoders=False)
        pipe.unet.set_adapters(["faceid_0", "style"], weights=[1.0, 0.5])
    checked = []
    original = IPAdapterSession.predict

    def predict_and_compare(session, batch, model):
        output = original(session, batch, model)
        if batch.line is None:
            with session.line_state(Line.SEMANTIC):
                all_off = session.forward(batch, model)
            with session.line_state(Line.ID):
                all_on = session.forward(batch, model)
            semantic = torch.tensor([line is Line.SEMANTIC for line in batch.row_lines])
            checked.append((batch.encoder_attention_mask is not None,
                            torch.equal(output[semantic], all_off[semantic]),
                            torch.equal(output[~semantic], all_on[~semantic]),
                            torch.equal(all_off, all_on)))
        return output

    monkeypatch.setattr(IPAdapterSession, "predict", predict_and_compare)
    out = bf_core.wrap(pipe)(**call_kwargs(6), **identity_kwargs(variant, analyzer))
    assert out.diagnostics["model_calls"] == 6  # one call per step, both lines merged where both run
    both_lines = separate_calls(6, out.diagnostics["idaf_start"]) - 6
    assert both_lines >= 2 and len(checked) == both_lines
    # Before M2 both contexts are 77 tokens; after it IdAP lengthens the semantic one, so the
    # padded, masked path is exercised too.
    assert any(padded for padded, *_ in checked) and not all(padded for padded, *_ in checked)
    for _, semantic_exact, identity_exact, machinery_inert in checked:
        assert semantic_exact and identity_exact
        assert not machinery_inert  # the identity machinery really changes the output


@pytest.mark.parametrize(("variant", "policy"), [("plus-face", "off"), ("faceid-plusv2", "off"),
                                                 ("faceid-plusv2", "on")])
def test_batched_loop_matches_separate_calls(variant, policy, analyzer):
    pipe = testing.tiny_pipeline(variant)

    def run(batch_lines: bool):
        config = bf_core.BFConfig(batch_lines=batch_lines, semantic_adapters=policy)
        return bf_core.wrap(pipe, config=config)(**call_kwargs(10),
                                                 **identity_kwargs(variant, analyzer))

    with batch_invariant_kernels():  # else kernels differ by batch size (~1e-6)
        separate, batched = run(False), run(True)
    m1 = separate.diagnostics["idaf_start"]
    assert separate.diagnostics["model_calls"] == separate_calls(10, m1)
    assert batched.diagnostics["model_calls"] == 10  # one call per step
    assert batched.diagnostics["model_rows"] == separate.diagnostics["model_rows"]
    assert torch.equal(batched.images, separate.images)


def test_biased_ip_projection_falls_back_to_separate_calls():
    """Zero tokens give zero keys only without a bias: otherwise one call per line."""
    pipe = testing.tiny_pipeline("plus-face")
    to_k_ip = ip_attention_processors(pipe)[0].to_k_ip[0]
    to_k_ip.bias = torch.nn.Parameter(torch.full((to_k_ip.out_features,), 0.1))
    out = bf_core.wrap(pipe)(**call_kwargs(6), id_images=[photo()])
    assert out.diagnostics["model_calls"] == separate_calls(6, out.diagnostics["idaf_start"])


def test_ip_masks_batch_only_when_one_row_fits_every_batch():
    assert _ip_masks_fit_any_batch(None) and _ip_masks_fit_any_batch({"scale": 0.5})
    assert _ip_masks_fit_any_batch({"ip_adapter_masks": [torch.ones(1, 1, 8, 8), None]})
    assert not _ip_masks_fit_any_batch({"ip_adapter_masks": [torch.ones(2, 1, 8, 8)]})
    assert not _ip_masks_fit_any_batch({"ip_adapter_masks": torch.ones(1, 1, 8, 8)})


def test_state_restored_after_a_failure_inside_the_merged_call(analyzer):
    """An exception inside the row-switched UNet call leaves no hook and no cut clip_embeds."""
    pipe = testing.tiny_pipeline("faceid-plusv2")
    bf = bf_core.wrap(pipe)
    bf(**call_kwargs(2), **identity_kwargs("faceid-plusv2", analyzer))  # first-use hooks
    before = pipeline_fingerprint(pipe)
    layer = image_projection_layers(pipe)[0]
    up_projections = [up for tuner in faceid_lora_layers(pipe) for up in tuner.lora_B.values()]
    calls = []

    def fail_on_third_call(module, args):
        calls.append(args[0].shape[0])
        if len(calls) == 3:
            raise RuntimeError("forced failure inside the UNet")

    handle = pipe.unet.conv_in.register_forward_pre_hook(fail_on_third_call)
    try:
        with pytest.raises(RuntimeError, match="forced failure"):
            bf(**call_kwargs(6), **identity_kwargs("faceid-plusv2", analyzer))
    finally:
        handle.remove()
    assert calls[-1] == 4  # it failed in a merged call of both lines' CFG rows
    assert not pipe.unet.encoder_hid_proj._forward_hooks
    assert up_projections and not any(up._forward_hooks for up in up_projections)
    assert layer.__dict__.get("clip_embeds") is None
    assert pipeline_fingerprint(pipe) == before
    again = bf(**call_kwargs(2), **identity_kwargs("faceid-plusv2", analyzer)).images
    assert np.isfinite(again.numpy()).all()


def test_faceid_row_mask_hooks_are_installed_once_per_call(analyzer):
    """Registering a hook on every FaceID up-projection at every step would cost
    milliseconds of Python per step at SDXL size: they go on once and come off at the end."""
    pipe = testing.tiny_pipeline("faceid")
    up_projections = [layer.lora_B[name] for layer in faceid_lora_layers(pipe.unet)
                      for name in layer.active_adapters if name in layer.lora_B]
    with forward_hooks_registered() as registered:
        out = bf_core.wrap(pipe)(**call_kwargs(8), **identity_kwargs("faceid", analyzer))
    assert out.diagnostics["model_calls"] == 8  # merged steps did run
    up_ids = {id(p) for p in up_projections}
    on_up = [id(m) for m in registered if id(m) in up_ids]
    assert up_ids and sorted(on_up) == sorted(up_ids)  # each hooked exactly once
    assert all(not p._forward_hooks for p in up_projections)  # removed when the call ended
