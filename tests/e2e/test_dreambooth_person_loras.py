"""Several people on the DreamBooth backend, each on the same LoRA or on their own.

The pipeline holds two random character LoRAs, "ana" and "ben", both active. With
``person_adapters``, person j's rows keep only j's adapters, in the UNet and in the text
encoders: each ID line must then be exactly what a pipeline with only that LoRA active
computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bf_core
from bf_core import Person
from bf_core.errors import ConfigError
from bf_core.switching import active_adapter_names, peft_tuner_layers
from bf_core.testing import batch_invariant_kernels
from bf_core.testing.tiny import add_tiny_lora, tiny_sdxl_pipeline

STEPS = 6
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
ANA, BEN = "a photo of sks woman", "a photo of sks man"
# peft warns that a second adapter joins the first: exactly what these tests build
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")


@pytest.fixture
def pipe():
    pipe = tiny_sdxl_pipeline(seed=0)
    add_tiny_lora(pipe, adapter_name="ana", seed=1)
    add_tiny_lora(pipe, adapter_name="ben", seed=2)
    pipe.set_adapters(["ana", "ben"])
    return pipe


def people(first=ANA, second=BEN):
    return [Person(id_prompt=first, region=LEFT), Person(id_prompt=second, region=RIGHT)]


def call(pipe, config=None, **kwargs):
    kwargs = dict(dict(prompt="two friends shaking hands at a market", people=people(),
                       num_inference_steps=STEPS, height=64, width=64, output_type="np",
                       generator=torch.Generator().manual_seed(0)), **kwargs)
    return bf_core.wrap(pipe, backend="dreambooth", config=config)(**kwargs)


def first_id_step_outputs(pipe, **kwargs):
    """The UNet outputs of the first step with ID lines, one per line (semantic, person 1,
    person 2): before it every call is the same semantic line, so these compare exactly."""
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        result = call(pipe, config=bf_core.BFConfig(batch_lines=False, use_idap=False), **kwargs)
    finally:
        handle.remove()
    first = result.diagnostics["idaf_start"] + 1  # calls 0..M1 are the semantic line's alone
    return outputs[first:first + 3]


def active_sets(pipe) -> set[frozenset[str]]:
    return {frozenset(active_adapter_names(layer))
            for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
            for _, layer in peft_tuner_layers(module)}


def lora_hooks(pipe) -> int:
    return sum(len(layer.lora_B[name]._forward_hooks)
               for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
               for _, layer in peft_tuner_layers(module) for name in layer.lora_B)


def test_each_persons_rows_see_only_their_own_lora(pipe, one_thread):
    semantic, ana_line, ben_line = first_id_step_outputs(pipe, person_adapters=["ana", ["ben"]])
    same_lora = first_id_step_outputs(pipe, person_adapters=["ana", "ana"])
    pipe.set_adapters("ana")
    ana_alone = first_id_step_outputs(pipe)
    pipe.set_adapters("ben")
    ben_alone = first_id_step_outputs(pipe)
    # Each ID line is bit for bit what the pipeline computes with only that person's LoRA,
    # its text encoders included (the ID prompt's embeddings enter the UNet output).
    assert torch.equal(ana_line, ana_alone[1]) and torch.equal(ben_line, ben_alone[2])
    # The second person's LoRA changes the second person's rows only.
    assert torch.equal(same_lora[1], ana_line) and not torch.equal(same_lora[2], ben_line)
    assert torch.equal(same_lora[0], semantic) and torch.equal(ana_alone[0], semantic)


def test_two_people_on_one_lora_equal_the_pipeline_with_only_that_lora(pipe, one_thread):
    """Each on the same LoRA: naming it for both equals a pipeline where it is the only one."""
    named = call(pipe, person_adapters=[["ana"], ["ana"]])
    pipe.set_adapters("ana")
    alone = call(pipe)
    np.testing.assert_array_equal(named.images, alone.images)


def test_merged_rows_equal_separate_lines_with_a_lora_per_person(pipe, one_thread):
    options = dict(person_adapters=["ana", "ben"])
    with batch_invariant_kernels():
        merged = call(pipe, **options)
        separate = call(pipe, config=bf_core.BFConfig(batch_lines=False), **options)
    np.testing.assert_array_equal(merged.images, separate.images)
    assert merged.diagnostics["model_calls"] == STEPS  # both ID lines in the semantic's call
    assert separate.diagnostics["model_calls"] > STEPS
    assert lora_hooks(pipe) == 0  # the row switches are gone after the call


def test_semantic_adapters_on_keeps_every_lora_on_the_semantic_line(pipe, one_thread):
    config = bf_core.BFConfig(semantic_adapters="on", batch_lines=False, use_idap=False)
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        with_option = call(pipe, config=config, person_adapters=["ana", "ben"])
        semantic_with_option = outputs[with_option.diagnostics["idaf_start"] + 1]
        outputs.clear()
        call(pipe, config=config)
    finally:
        handle.remove()
    assert torch.equal(semantic_with_option, outputs[with_option.diagnostics["idaf_start"] + 1])


def test_a_single_person_can_pick_one_lora(pipe, one_thread):
    kwargs = dict(people=None, id_prompt=BEN)
    _, picked, *_ = first_id_step_outputs(pipe, person_adapters=["ben"], **kwargs)
    pipe.set_adapters("ben")
    _, alone, *_ = first_id_step_outputs(pipe, **kwargs)
    assert torch.equal(picked, alone)


@pytest.mark.parametrize("value, message", [
    ("ana", "must be a list with one entry per person"),
    (["ana", 3], r"person_adapters\[1\] must be an adapter name"),
    (["ana"], "has 1 entry but the call has more people"),
    (["ana", "ben", "ana"], "has 3 entries but the call has 2 people"),
    (["ana", "cai"], r"names \['cai'\], which the pipeline has not loaded; its adapters are "
                     r"\['ana', 'ben'\]"),
])
def test_bad_person_adapters_are_named_and_leave_the_pipeline_as_it_was(value, message, pipe):
    before = active_sets(pipe)
    with pytest.raises(ConfigError, match=message):
        call(pipe, person_adapters=value)
    assert active_sets(pipe) == before and lora_hooks(pipe) == 0


def test_a_loaded_but_inactive_adapter_is_named_with_the_fix(pipe):
    pipe.set_adapters("ana")
    with pytest.raises(ConfigError, match=r"\['ben'\], loaded but not active.*set_adapters"):
        call(pipe, person_adapters=["ana", "ben"])
    assert active_sets(pipe) == {frozenset({"ana"})}


def test_a_person_without_any_lora_runs_the_base_model_in_their_rows(pipe, one_thread):
    """An empty entry: that person is only their prompt (a textual-inversion token, say)."""
    _, _, bare = first_id_step_outputs(pipe, person_adapters=["ana", []])
    pipe.disable_lora()
    _, _, base = first_id_step_outputs(pipe)
    assert torch.equal(bare, base)



def test_a_fused_lora_is_refused_with_the_fix(pipe):
    layer = next(layer for _, layer in peft_tuner_layers(pipe.unet))
    layer.merge(adapter_names=["ana"])
    with pytest.raises(ConfigError, match=r"fused or DoRA adapter.*unfuse_lora"):
        call(pipe, person_adapters=["ana", "ben"])
    assert layer.merged and lora_hooks(pipe) == 0
