"""The PhotoMaker backend end to end on tiny random weights (V1 and V2), offline.

The baseline (method off) is compared with a reference of the official algorithm written
here from its description (docs/backends/photomaker.md): a plain SDXL
pipeline called with the text-only embeddings and a step callback that swaps in the
ID-fused prompt after ``start_merge_step``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bf_core
from bf_backends.photomaker.backend import PhotoMakerSession
from bf_backends.photomaker.encoder import PhotoMakerIdentityEncoder
from bf_backends.photomaker.images import preprocess_id_images
from bf_backends.photomaker.testing import reference_photo_path, tiny_pipeline
from bf_core.images import load_image
from bf_core.records import Line
from bf_core.switching import peft_tuner_layers
from bf_core.testing import BackendConformance, opened_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

START_MERGE_STEP = 2  # of 6 steps: both phases of the official schedule run
PROMPT = "a person img is kneeling by a small lake, touching the water"


# --------------------------------------------------------------------------------------
# The official algorithm, written from the spec
# --------------------------------------------------------------------------------------


def expanded_ids(tokenizer, prompt: str, trigger_id: int, copies: int) -> tuple[list, list]:
    """Spec 3.2 steps 1-5: 77 ids, trigger dropped, class token repeated, padded; the mask."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    where = ids.index(trigger_id)
    ids = [i for i in ids if i != trigger_id]
    ids = ids[:where - 1] + [ids[where - 1]] * copies + ids[where:]
    ids = (ids + [tokenizer.pad_token_id] * 77)[:77]
    return ids, [where - 1 <= k < where - 1 + copies for k in range(77)]


def fused_prompt(pipe, prompt: str, pixels, faces):
    """Spec 3.2 steps 6-7 and 2.4: P' (1, 77, D) and the pooled vector of the expanded ids."""
    state = pipe.photomaker
    trigger = pipe.tokenizer_2.convert_tokens_to_ids(state.trigger_word)
    copies = pixels.shape[0] * (2 if state.version == "v2" else 1)
    hidden, pooled, mask = [], None, None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                               (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids, mask = expanded_ids(tokenizer, prompt, trigger, copies)
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    embeds = torch.cat(hidden, dim=-1)
    args = (pixels, embeds, torch.tensor([mask])) + ((faces,) if faces is not None else ())
    return state.encoder(*args), pooled


def official_reference(pipe, prompt, id_images, start_merge_step, num_images_per_prompt=1,
                       negative_prompt=None, **call_kwargs):
    """The official PhotoMaker call, as a stock SDXL call with the 5.8 swap callback."""
    state = pipe.photomaker
    images = [load_image(image) for image in id_images]
    pixels = preprocess_id_images(images)
    faces = None
    if state.version == "v2":
        chosen = state.face_analyzer.embed(images, policy="highest_score")
        faces = torch.from_numpy(np.stack([face.embedding for face in chosen]))
    # 3.3: the text-only prompt drops the first trigger id and is decoded back to text.
    trigger = pipe.tokenizer.convert_tokens_to_ids(state.trigger_word)
    ids = pipe.tokenizer.encode(prompt, add_special_tokens=False)
    ids.remove(trigger)
    text_only = pipe.tokenizer.decode(ids)
    # One row per prompt here; the pipeline repeats them per image as the official does.
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        text_only, device=pipe.device, num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=negative_prompt)
    with torch.no_grad():
        fused, fused_pooled = fused_prompt(pipe, prompt, pixels, faces)
    rows = num_images_per_prompt

    def merge(pipeline, step, timestep, tensors):
        if step == start_merge_step:  # used from the next step on: i > start_merge_step
            tensors["prompt_embeds"] = torch.cat([negative, fused]).repeat_interleave(rows, 0)
            tensors["add_text_embeds"] = torch.cat(
                [negative_pooled, fused_pooled]).repeat_interleave(rows, 0)
        return tensors

    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
                num_images_per_prompt=num_images_per_prompt, callback_on_step_end=merge,
                callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
                **call_kwargs)


# --------------------------------------------------------------------------------------
# The conformance kit, V2 and V1
# --------------------------------------------------------------------------------------


class TestPhotoMakerV2Conformance(BackendConformance):
    backend_name = "photomaker"
    merges_lines = True
    prompt = PROMPT
    version = 2

    def make_pipeline(self):
        return tiny_pipeline(version=self.version, seed=0)

    def identity_kwargs(self):
        return {"id_images": [reference_photo_path()], "start_merge_step": START_MERGE_STEP}

    def stock_call(self, pipe, **kwargs):
        return official_reference(pipe, id_images=[reference_photo_path()],
                                  start_merge_step=START_MERGE_STEP, **kwargs)


class TestPhotoMakerV1Conformance(TestPhotoMakerV2Conformance):
    version = 1


# --------------------------------------------------------------------------------------
# Lines, LoRA switching, named errors
# --------------------------------------------------------------------------------------


def call(bf, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "id_images": [reference_photo_path()], "num_inference_steps": 6,
              "height": 64, "width": 64, "output_type": "np",
              "generator": torch.Generator().manual_seed(seed), **kwargs}
    return bf(**kwargs)


@pytest.mark.parametrize("version", [1, 2])
def test_baseline_equals_reference_with_two_images_and_a_negative_prompt(version):
    pipe = tiny_pipeline(version=version)
    images = [reference_photo_path(), np.asarray(load_image(reference_photo_path()))[:, ::-1]]
    common = dict(num_inference_steps=6, height=64, width=64, output_type="np",
                  negative_prompt="blurry", num_images_per_prompt=2)
    ours = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(
        prompt=PROMPT, id_images=images, start_merge_step=3,
        generator=torch.Generator().manual_seed(1), **common).images
    reference = official_reference(pipe, PROMPT, images, 3,
                                   generator=torch.Generator().manual_seed(1), **common).images
    np.testing.assert_array_equal(ours, reference)
    # The merge step matters: a different one gives a different picture.
    later = bf_core.wrap(pipe, config=bf_core.BFConfig(enabled=False))(
        prompt=PROMPT, id_images=images, start_merge_step=4,
        generator=torch.Generator().manual_seed(1), **common).images
    assert np.abs(later - ours).max() > 1e-4


def _photomaker_lora_active(unet) -> bool:
    layers = [layer for _, layer in peft_tuner_layers(unet)
              if "photomaker" in layer.active_adapters]
    assert layers, "the tiny pipeline must carry the photomaker LoRA"
    states = {not layer._disable_adapters and layer.scaling["photomaker"] != 0 for layer in layers}
    assert len(states) == 1, "the LoRA is half on, half off"
    return states.pop()


@pytest.mark.parametrize("semantic_adapters, semantic_lora", [("off", False), ("on", True)])
def test_each_line_sees_the_lora_state_the_config_says(monkeypatch, semantic_adapters,
                                                       semantic_lora):
    pipe = tiny_pipeline(version=1)
    seen: dict[Line, set[bool]] = {}
    predict = PhotoMakerSession.predict

    def spy(session, batch, model):
        def recording_model(rows, **extra):
            seen.setdefault(batch.line, set()).add(_photomaker_lora_active(pipe.unet))
            return model(rows, **extra)
        return predict(session, batch, recording_model)

    monkeypatch.setattr(PhotoMakerSession, "predict", spy)
    # One UNet call per line, so that each call shows one line's LoRA state (the merged,
    # row-masked call is covered by test_photomaker_rowbatch.py).
    bf = bf_core.wrap(pipe, config=bf_core.BFConfig(semantic_adapters=semantic_adapters,
                                                    batch_lines=False))
    call(bf)
    assert seen == {Line.SEMANTIC: {semantic_lora}, Line.ID: {True}}
    seen.clear()
    call(bf.with_config(enabled=False), start_merge_step=START_MERGE_STEP)
    assert seen == {Line.BASELINE: {True}}
    assert _photomaker_lora_active(pipe.unet)


def test_semantic_line_switches_off_photomaker_but_keeps_a_shared_style_lora():
    from bf_core.testing import add_tiny_lora

    pipe = tiny_pipeline(version=1)
    add_tiny_lora(pipe, adapter_name="style", text_encoders=False)
    pipe.set_adapters(["photomaker", "style"], adapter_weights=[1.0, 1.0])
    unet = pipe.unet
    sample = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, 64)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}

    def predict():
        return unet(sample, 10, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    both = predict()
    with opened_session(pipe) as session, session.line_state(Line.SEMANTIC):
        style_only = predict()
    pipe.set_adapters(["style"])
    expected = predict()
    pipe.set_adapters(["photomaker", "style"], adapter_weights=[1.0, 1.0])
    torch.testing.assert_close(style_only, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(style_only, both)
    torch.testing.assert_close(predict(), both, rtol=0, atol=0)


def test_identity_tokens_are_the_fused_id_prompt(monkeypatch):
    pipe = tiny_pipeline(version=2)
    captured = {}
    encode = PhotoMakerIdentityEncoder.encode

    def spy(encoder, *args):
        captured["identity"] = encode(encoder, *args)
        captured["references"] = captured["identity"].state["references"]
        return captured["identity"]

    monkeypatch.setattr(PhotoMakerIdentityEncoder, "encode", spy)
    call(bf_core.wrap(pipe))
    identity, references = captured["identity"], captured["references"]
    assert tuple(identity.tokens.shape) == (1, 77, 64)
    assert references.face_embeds.shape == (1, 512)
    # "a person img": the class token is the last token of "a person"; it is repeated
    # 1 image x 2 tokens times and fused there. The causal text encoder gives every row
    # before it exactly as in the plain text "a person".
    text = pipe.encode_prompt("a person", device="cpu", num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[0]
    class_index = len(pipe.tokenizer("a person").input_ids) - 2  # the token before EOS
    torch.testing.assert_close(identity.tokens[:, :class_index], text[:, :class_index],
                               rtol=0, atol=0)
    fused_rows = identity.tokens[:, class_index:class_index + 2]
    assert not torch.allclose(fused_rows, text[:, class_index:class_index + 1].expand_as(fused_rows))
    assert identity.negative_tokens.shape == identity.tokens.shape
