"""PhotoMaker with both lines in one UNet call: the per-row LoRA switch is exact, the loop is
faithful to separate calls, and the cases that cannot be switched per row fall back."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import bf_core
from bf_backends.photomaker.testing import official_like, reference_photo_path, tiny_pipeline
from bf_core.errors import ConfigError
from bf_core.hosts.sdxl import RowBatch, SDXLModel, merge_row_batches
from bf_core.records import Line
from bf_core.switching import active_up_projections, adapters_disabled, peft_tuner_layers
from bf_core.testing import (
    add_tiny_lora,
    batch_invariant_kernels,
    forward_hooks_registered,
    opened_session,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PROMPT = "a person img is kneeling by a small lake, touching the water"
STEPS = 10


def with_style_lora(pipe):
    """A second LoRA on the same attention projections, active together with PhotoMaker's."""
    add_tiny_lora(pipe, adapter_name="style", text_encoders=False)
    pipe.set_adapters(["photomaker", "style"], adapter_weights=[1.0, 1.0])
    return pipe


def lora_up_projections(unet) -> list[torch.nn.Module]:
    return [up for _, up in active_up_projections([layer for _, layer in peft_tuner_layers(unet)])]


def line_batch(line: Line, rows: int, length: int, seed: int) -> RowBatch:
    generator = torch.Generator().manual_seed(seed)
    return RowBatch(line, 3, torch.tensor(500), torch.randn(rows, 4, 8, 8, generator=generator),
                    ("uncond", "cond"), torch.randn(rows, length, 64, generator=generator),
                    torch.randn(rows, 32, generator=generator), torch.randn(rows, 6, generator=generator))


def run_merged(session, merged: RowBatch, state) -> torch.Tensor:
    with torch.no_grad(), state:
        return SDXLModel(session.pipe)(merged)


@pytest.mark.parametrize("style", [False, True], ids=["photomaker-only", "with-style-lora"])
def test_row_state_is_exact_for_each_row_of_one_merged_call(style):
    pipe = tiny_pipeline(version=1)
    if style:
        with_style_lora(pipe)
    # Semantic rows with a longer context (IdAP's K extra tokens), so the padding mask is in play.
    merged = merge_row_batches([line_batch(Line.SEMANTIC, 2, 85, seed=1),
                                line_batch(Line.ID, 2, 77, seed=2)])
    assert merged.encoder_attention_mask is not None
    with opened_session(pipe) as session:
        assert session.supports_row_batching(merged)
        mixed = run_merged(session, merged, session.rows_state(merged))
        lora_off = run_merged(session, merged, session.line_state(Line.SEMANTIC))
        lora_on = run_merged(session, merged, session.line_state(Line.ID))
        # Same inputs, same batch size, same kernels: each row is bit for bit its line's model.
        assert torch.equal(mixed[:2], lora_off[:2])
        assert torch.equal(mixed[2:], lora_on[2:])
        assert not torch.allclose(lora_off, lora_on)  # the PhotoMaker LoRA really acts
        if style:  # the style LoRA stays on for the semantic rows
            bare = run_merged(session, merged, adapters_disabled([pipe.unet]))
            assert not torch.allclose(mixed[:2], bare[:2])
        # Outside a rows block the hooks pass through: the whole batch is the LoRA-on model.
        assert torch.equal(run_merged(session, merged, nullcontext()), lora_on)
    # Hooks are gone after the session: again the LoRA-on model.
    assert torch.equal(run_merged(session, merged, nullcontext()), lora_on)


def loop_call(pipe, batch_lines: bool, semantic_adapters: str = "off", steps: int = STEPS,
              **kwargs):
    config = bf_core.BFConfig(batch_lines=batch_lines, semantic_adapters=semantic_adapters)
    return bf_core.wrap(pipe, config=config)(
        prompt=PROMPT, id_images=[reference_photo_path()], num_inference_steps=steps,
        height=64, width=64, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kwargs)


def separate_calls(steps: int, idaf_start: int) -> int:
    """UNet calls of a run whose lines are called one after the other (spec: M1 then both)."""
    return steps + (steps - idaf_start - 1)


def assert_batched_matches_separate(pipe, semantic_adapters="off", **kwargs):
    with batch_invariant_kernels():  # else kernels differ by batch size (~1e-6)
        separate = loop_call(pipe, False, semantic_adapters, **kwargs)
        batched = loop_call(pipe, True, semantic_adapters, **kwargs)
    m1 = separate.diagnostics["idaf_start"]
    assert 0 < m1 < STEPS - 1  # both lines run at some steps, else nothing is tested
    assert separate.diagnostics["model_calls"] == separate_calls(STEPS, m1)
    assert batched.diagnostics["model_calls"] == STEPS  # one call per step
    assert batched.diagnostics["model_rows"] == separate.diagnostics["model_rows"]
    assert torch.equal(batched.images, separate.images)


@pytest.mark.parametrize("version, semantic_adapters, style", [
    (1, "off", False), (1, "on", False), (2, "off", False), (1, "off", True)],
    ids=["v1-off", "v1-on", "v2-off", "v1-off-style"])
def test_batched_loop_matches_separate_calls(version, semantic_adapters, style):
    pipe = tiny_pipeline(version=version, face_analyzer=None)
    if style:
        with_style_lora(pipe)
    # V2: given face embeddings, so no face detector runs.
    extra = {"id_embeds": torch.randn(1, 512).numpy()} if version == 2 else {}
    assert_batched_matches_separate(pipe, semantic_adapters, **extra)


def test_baseline_stays_one_line_and_is_never_merged():
    pipe = tiny_pipeline(version=1)
    out = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(
        prompt=PROMPT, id_images=[reference_photo_path()], num_inference_steps=4, height=64,
        width=64, output_type="latent", start_merge_step=1)
    assert out.diagnostics["model_calls"] == 4
    with opened_session(pipe) as session:
        baseline_rows = merge_row_batches([line_batch(Line.BASELINE, 2, 77, 0)] * 2)
        assert not session.supports_row_batching(baseline_rows)


# --------------------------------------------------------------------------------------
# The official pipeline, duck-typed (its attributes only; no official package imported)
# --------------------------------------------------------------------------------------

def test_official_pipeline_with_a_peft_lora_is_batched():
    official = official_like(tiny_pipeline(version=1))
    assert not hasattr(official, "photomaker")
    assert_batched_matches_separate(official)


def test_official_pipeline_with_a_baked_in_lora_falls_back_to_separate_calls():
    official = official_like(tiny_pipeline(version=1))
    official.fuse_lora(adapter_names=["photomaker"])
    official.unload_lora_weights()  # the LoRA now lives in the weights, not in PEFT layers
    assert lora_up_projections(official.unet) == []
    out = loop_call(official, True)
    assert out.diagnostics["model_calls"] == separate_calls(STEPS, out.diagnostics["idaf_start"])


def test_fused_lora_batches_only_when_every_row_runs_the_same_model():
    pipe = tiny_pipeline(version=1)
    pipe.fuse_lora(adapter_names=["photomaker"])
    assert loop_call(pipe, True, "on", steps=4).diagnostics["model_calls"] == 4
    with pytest.raises(ConfigError, match="fused"):
        loop_call(pipe, True, "off", steps=4)  # separate calls, which name the problem


def test_row_masks_are_removed_after_an_exception_inside_a_merged_call():
    pipe = tiny_pipeline(version=1)
    ups = lora_up_projections(pipe.unet)
    live_hooks = []

    def fail_in_merged_call(module, args, output):
        if output.shape[0] == 4:  # semantic + ID rows with CFG: the merged call
            live_hooks.append(sum(len(up._forward_hooks) for up in ups))
            raise RuntimeError("forced failure inside the UNet call")

    handle = pipe.unet.conv_out.register_forward_hook(fail_in_merged_call)
    try:
        with pytest.raises(RuntimeError, match="forced failure"):
            loop_call(pipe, True)
    finally:
        handle.remove()
    assert live_hooks == [len(ups)] and ups  # the failure came while the row masks were on
    assert all(not up._forward_hooks for up in ups)
    assert all(not layer._disable_adapters for layer in pipe.unet.modules()
               if hasattr(layer, "_disable_adapters"))


def test_lora_row_mask_hooks_are_installed_once_per_call():
    """One hook per PhotoMaker up-projection for the whole call, not one per step."""
    pipe = tiny_pipeline(version=1, face_analyzer=None)
    with forward_hooks_registered() as registered:
        out = loop_call(pipe, True)
    assert out.diagnostics["model_calls"] == STEPS  # merged steps did run
    up_projections = {id(m) for m in pipe.unet.modules() if type(m).__name__ == "Linear"
                      and any(m is layer.lora_B[name] for layer in pipe.unet.modules()
                              if hasattr(layer, "lora_B") for name in layer.lora_B)}
    on_up = [id(m) for m in registered if id(m) in up_projections]
    assert up_projections and sorted(on_up) == sorted(up_projections)  # each hooked exactly once
    assert not any(pipe.unet.get_submodule(n)._forward_hooks for n, _ in pipe.unet.named_modules()
                   if n)  # removed when the call ended
