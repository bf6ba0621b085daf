"""Both lines in one UNet call: the per-row switches are exact, the merged loop is faithful."""

from __future__ import annotations

import pytest
import torch

import bf_core
import bf_core.hosts.sdxl
from bf_core.errors import ConfigError
from bf_core.hosts.sdxl import RowBatch, merge_row_batches, pad_tokens, split_rows
from bf_core.records import Line
from bf_core.switching import adapters_disabled, lora_rows, row_mask
from bf_core.testing import add_tiny_lora, batch_invariant_kernels, tiny_sdxl_pipeline

PROMPT = "a person is kneeling by a small lake"
ID_PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def pipe(lora_pipe):
    return lora_pipe


def unet_inputs(rows: int, length: int = 77, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(rows, 4, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(rows, length, 64, generator=generator),
                added_cond_kwargs={"text_embeds": torch.randn(rows, 32, generator=generator),
                                   "time_ids": torch.randn(rows, 6, generator=generator)})


def call_unet(unet, inputs):
    with torch.no_grad():
        return unet(inputs["sample"], torch.tensor(500),
                    encoder_hidden_states=inputs["encoder_hidden_states"],
                    added_cond_kwargs=inputs["added_cond_kwargs"]).sample


def test_lora_row_mask_is_exact_per_row(pipe):
    """Same batch, same kernels: off rows equal the LoRA-free UNet, on rows the LoRA UNet."""
    inputs = unet_inputs(4)
    with adapters_disabled([pipe.unet]):
        without = call_unet(pipe.unet, inputs)
    with_lora = call_unet(pipe.unet, inputs)
    with lora_rows([pipe.unet], torch.tensor([0.0, 0.0, 1.0, 1.0])):
        mixed = call_unet(pipe.unet, inputs)
    assert torch.equal(mixed[:2], without[:2])
    assert torch.equal(mixed[2:], with_lora[2:])
    assert not torch.equal(without, with_lora)  # the LoRA really acts
    assert torch.equal(call_unet(pipe.unet, inputs), with_lora)  # hooks gone afterwards


def test_padding_tokens_and_mask():
    embeds = torch.randn(2, 77, 8)
    padded, mask = pad_tokens(embeds, 85)
    assert padded.shape == (2, 85, 8) and torch.equal(padded[:, :77], embeds)
    assert torch.count_nonzero(padded[:, 77:]) == 0
    assert mask.sum(dim=1).tolist() == [77.0, 77.0] and mask[:, 77:].sum() == 0


def _batch(line: Line, rows: int, length: int, branches=("uncond", "cond")) -> RowBatch:
    inputs = unet_inputs(rows, length, seed=rows + length)
    return RowBatch(line, 3, torch.tensor(500), inputs["sample"], branches,
                    inputs["encoder_hidden_states"], inputs["added_cond_kwargs"]["text_embeds"],
                    inputs["added_cond_kwargs"]["time_ids"])


def test_merge_and_split_keep_every_row_in_order():
    semantic, identity = _batch(Line.SEMANTIC, 2, 85), _batch(Line.ID, 2, 77)
    merged = merge_row_batches([semantic, identity])
    assert merged.line is None and merged.rows == 4
    assert merged.row_lines == (Line.SEMANTIC,) * 2 + (Line.ID,) * 2
    assert merged.encoder_hidden_states.shape == (4, 85, 64)
    assert merged.encoder_attention_mask[:2].sum() == 170 and merged.encoder_attention_mask[2:].sum() == 154
    assert row_mask(merged, [Line.ID]).tolist() == [0.0, 0.0, 1.0, 1.0]
    parts = split_rows(torch.arange(4.0).view(4, 1), merged)
    assert [p.flatten().tolist() for p in parts] == [[0.0, 1.0], [2.0, 3.0]]
    same_length = merge_row_batches([_batch(Line.SEMANTIC, 2, 77), identity])
    assert same_length.encoder_attention_mask is None  # no masked kernel when not needed


def test_masked_padding_matches_unpadded_to_round_off(pipe):
    inputs = unet_inputs(2)
    plain = call_unet(pipe.unet, inputs)
    padded, _ = pad_tokens(inputs["encoder_hidden_states"], 85)
    masked = masked_unet_call(pipe.unet, inputs, 85)
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-5)
    unmasked = call_unet(pipe.unet, dict(inputs, encoder_hidden_states=padded))
    assert (unmasked - plain).abs().max() > 1e-3  # without the mask zero tokens are not neutral


def masked_unet_call(unet, inputs, length: int):
    """The UNet on ``inputs`` with the context padded to ``length`` tokens and masked."""
    padded, mask = pad_tokens(inputs["encoder_hidden_states"], length)
    with torch.no_grad():
        return unet(inputs["sample"], torch.tensor(500), encoder_hidden_states=padded,
                    encoder_attention_mask=mask, added_cond_kwargs=inputs["added_cond_kwargs"]).sample


def rows_of(inputs, rows: slice):
    return dict(sample=inputs["sample"][rows],
                encoder_hidden_states=inputs["encoder_hidden_states"][rows],
                added_cond_kwargs={k: v[rows] for k, v in inputs["added_cond_kwargs"].items()})


def test_stock_kernels_depend_on_the_batch_and_batch_invariant_ones_do_not(pipe):
    """Why the loop tests below run inside ``batch_invariant_kernels``: with the stock kernels
    one batch-4 call and two batch-2 calls of the same UNet differ in round-off; inside it
    they are bit-equal, masked padding equals no padding, and the function computed is the
    same as with the stock kernels."""
    inputs = unet_inputs(4)
    halves = [rows_of(inputs, slice(0, 2)), rows_of(inputs, slice(2, 4))]
    stock_whole = call_unet(pipe.unet, inputs)
    stock_halves = torch.cat([call_unet(pipe.unet, half) for half in halves])
    torch.testing.assert_close(stock_whole, stock_halves, rtol=0, atol=1e-5)
    with batch_invariant_kernels():
        whole = call_unet(pipe.unet, inputs)
        in_halves = torch.cat([call_unet(pipe.unet, half) for half in halves])
        padded = masked_unet_call(pipe.unet, inputs, 85)
        single = call_unet(pipe.unet, rows_of(inputs, slice(1, 2)))
    assert torch.equal(whole, in_halves)
    assert torch.equal(padded, whole)
    assert torch.equal(single, whole[1:2])
    torch.testing.assert_close(whole, stock_whole, rtol=0, atol=1e-5)


def run_both_paths(pipe, policy: str = "off", steps: int = 10):
    def run(batch_lines):
        config = bf_core.BFConfig(batch_lines=batch_lines, semantic_adapters=policy)
        return bf_core.wrap(pipe, config=config)(
            prompt=PROMPT, id_prompt=ID_PROMPT, num_inference_steps=steps, height=64, width=64,
            output_type="latent", generator=torch.Generator().manual_seed(0))

    return run(False), run(True)


@pytest.mark.parametrize("policy", ["off", "on"])
def test_batched_loop_matches_separate_calls(pipe, policy):
    with batch_invariant_kernels():  # else kernels differ by batch size (~1e-6)
        separate, batched = run_both_paths(pipe, policy)
    m1, m2 = separate.diagnostics["idaf_start"], separate.diagnostics["idap_start"]
    assert m2 < 9  # IdAP tokens: the merged calls pad the ID rows' context
    assert separate.diagnostics["model_calls"] == 10 + (10 - m1 - 1)
    assert batched.diagnostics["model_calls"] == 10  # one call per step
    assert batched.diagnostics["model_rows"] == separate.diagnostics["model_rows"]
    assert torch.equal(batched.images, separate.images)


def test_batched_loop_with_stock_kernels_differs_by_round_off_only(pipe):
    separate, batched = run_both_paths(pipe)
    torch.testing.assert_close(batched.images, separate.images, rtol=0, atol=1e-4)


@pytest.mark.parametrize("leak", ["padding attended", "identity LoRA on semantic rows"])
def test_bit_equality_catches_a_leak_between_rows(pipe, monkeypatch, leak):
    """A merged call that lets one row's state touch another must not pass for exact."""
    if leak == "padding attended":
        real_pad = bf_core.hosts.sdxl.pad_tokens

        def pad_without_mask(embeds, length):
            padded, mask = real_pad(embeds, length)
            return padded, torch.ones_like(mask)

        monkeypatch.setattr(bf_core.hosts.sdxl, "pad_tokens", pad_without_mask)
    else:
        from bf_backends.dreambooth import backend as dreambooth

        real_mask = dreambooth.row_mask
        monkeypatch.setattr(dreambooth, "row_mask",
                            lambda batch, lines: real_mask(batch, lines).clamp(min=1e-3))
    with batch_invariant_kernels():
        separate, batched = run_both_paths(pipe, steps=6)
    assert batched.diagnostics["model_calls"] == 6  # the leaky path was the merged one
    assert not torch.equal(batched.images, separate.images)


def test_unsupported_state_falls_back_to_separate_calls(pipe, monkeypatch):
    from bf_backends.dreambooth.backend import DreamBoothSession

    monkeypatch.setattr(DreamBoothSession, "supports_row_batching", lambda self, batches: False)
    out = bf_core.wrap(pipe)(prompt=PROMPT, id_prompt=ID_PROMPT, num_inference_steps=6,
                             height=64, width=64, output_type="latent",
                             generator=torch.Generator().manual_seed(0))
    m1 = out.diagnostics["idaf_start"]
    assert out.diagnostics["model_calls"] == 6 + (6 - m1 - 1)


def test_fused_lora_batches_only_when_every_row_runs_the_same_model():
    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="identity")
    pipe.fuse_lora(adapter_names=["identity"])
    call = dict(prompt=PROMPT, id_prompt=ID_PROMPT, num_inference_steps=6, height=64, width=64,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    out = bf_core.wrap(pipe, config=bf_core.BFConfig(semantic_adapters="on"))(**call)
    assert out.diagnostics["model_calls"] == 6  # no per-row switch needed: one call per step
    with pytest.raises(ConfigError, match="fused"):
        bf_core.wrap(pipe)(**call)  # "off" would need the fused LoRA switched off


def test_named_lora_rows_switch_only_that_adapter_on_shared_layers():
    """A layer carrying the identity LoRA and a style LoRA: the row mask switches only the
    identity one, so off rows equal the style-only model exactly."""
    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="identity", seed=1, text_encoders=False)
    add_tiny_lora(pipe, adapter_name="style", seed=2, text_encoders=False)
    pipe.unet.set_adapters(["identity", "style"])
    inputs = unet_inputs(4)
    both = call_unet(pipe.unet, inputs)
    pipe.unet.set_adapters(["style"])
    style_only = call_unet(pipe.unet, inputs)
    pipe.unet.set_adapters(["identity", "style"])
    with lora_rows([pipe.unet], torch.tensor([0.0, 1.0, 0.0, 1.0]), adapter_names=["identity"]):
        mixed = call_unet(pipe.unet, inputs)
    assert not torch.equal(both, style_only)
    assert torch.equal(mixed[0::2], style_only[0::2]) and torch.equal(mixed[1::2], both[1::2])
