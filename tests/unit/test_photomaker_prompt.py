"""PhotoMaker prompt side (trigger, class-token expansion, text encoding) and image input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bf_backends.photomaker.images import (
    center_crop_box,
    preprocess_id_images,
    resized_size,
)
from bf_backends.photomaker.prompt import (
    add_trigger_word,
    encode_prompt_with_trigger,
    expand_class_token,
    find_trigger_positions,
    remove_trigger_word,
    trigger_token_id,
)
from bf_core.errors import ConfigError, ImageInputError
from bf_core.testing import tiny_sdxl_pipeline, tiny_tokenizers

BOS, EOS, PAD, TRIGGER = 100, 101, 0, 999
A, PERSON, COMMA = 5, 6, 7


def padded(ids, length=12, pad=PAD):
    return ids + [pad] * (length - len(ids))


# ---------------------------------------------------------------------------------------
# Pure id manipulation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("copies", [1, 2, 4, 6])
def test_worked_example_a_person_img(copies):
    ids = padded([BOS, A, PERSON, TRIGGER, EOS])
    expanded = expand_class_token(ids, TRIGGER, copies, 12, PAD)
    assert expanded.input_ids == padded([BOS, A] + [PERSON] * copies + [EOS])
    assert expanded.class_token_index == 2
    assert [i for i, m in enumerate(expanded.class_tokens_mask) if m] == list(
        range(2, 2 + copies))


def test_trigger_first_repeats_bos():
    ids = padded([BOS, TRIGGER, A, PERSON, EOS])
    expanded = expand_class_token(ids, TRIGGER, 3, 12, PAD)
    assert expanded.input_ids[:6] == [BOS, BOS, BOS, A, PERSON, EOS]
    assert expanded.class_tokens_mask[:4] == [True, True, True, False]


def test_expansion_past_the_end_is_cut_and_the_mask_clipped():
    ids = [BOS] + [A] * 8 + [PERSON, TRIGGER, EOS]  # 12 ids, class token at 9
    expanded = expand_class_token(ids, TRIGGER, 4, 12, PAD)
    assert len(expanded.input_ids) == 12
    assert expanded.input_ids[9:] == [PERSON] * 3
    assert sum(expanded.class_tokens_mask) == 3  # one copy did not fit


@pytest.mark.parametrize("ids", [padded([BOS, A, PERSON, EOS]),
                                 padded([BOS, PERSON, TRIGGER, COMMA, PERSON, TRIGGER, EOS])])
def test_zero_or_two_triggers_are_refused(ids):
    assert len(find_trigger_positions(ids, TRIGGER)) in (0, 2)
    with pytest.raises(ConfigError, match="exactly one trigger word"):
        expand_class_token(ids, TRIGGER, 2, 12, PAD)


# ---------------------------------------------------------------------------------------
# Tokenizer-level behaviour
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizers()[0]
    add_trigger_word([tok, None], "img")
    return tok


def test_trigger_is_one_token_split_out_of_the_text(tokenizer):
    trigger = trigger_token_id(tokenizer, "img")
    assert trigger >= 514  # a new id beyond the 514-token byte vocabulary
    ids = tokenizer("a man img").input_ids
    assert find_trigger_positions(ids, trigger) == [len(tokenizer("a man").input_ids) - 1]
    assert find_trigger_positions(tokenizer("a man IMG").input_ids, trigger) == []


def test_missing_trigger_token_says_how_to_add_it():
    with pytest.raises(ConfigError, match="add_trigger_word"):
        trigger_token_id(tiny_tokenizers()[1], "img")


def test_text_only_prompt_drops_the_first_trigger(tokenizer):
    text_only = remove_trigger_word(tokenizer, "a photo of a man img, smiling", "img")
    assert "img" not in text_only
    expected = tokenizer("a photo of a man, smiling", add_special_tokens=False).input_ids
    assert tokenizer(text_only, add_special_tokens=False).input_ids == expected


# ---------------------------------------------------------------------------------------
# Encoding with the tiny SDXL pipeline
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    pipeline = tiny_sdxl_pipeline()
    add_trigger_word([pipeline.tokenizer, pipeline.tokenizer_2], "img")
    return pipeline


@pytest.mark.parametrize(("num_images", "tokens_per_image"), [(1, 2), (3, 1), (2, 2)])
def test_encode_prompt_with_trigger_matches_direct_encoding(pipe, num_images, tokens_per_image):
    prompt = "a photo of a person img, smiling"
    copies = num_images * tokens_per_image
    result = encode_prompt_with_trigger(pipe, prompt, "img", num_images, tokens_per_image)

    # Class token = last token of "a photo of a person", right after BOS + that text.
    first = len(pipe.tokenizer("a photo of a person").input_ids) - 2
    assert result.class_tokens_mask.dtype == torch.bool
    assert result.class_tokens_mask[0].nonzero().flatten().tolist() == list(
        range(first, first + copies))
    assert result.num_id_tokens == copies

    hidden, pooled = [], None
    for tok, encoder in ((pipe.tokenizer, pipe.text_encoder),
                         (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        expanded = expand_class_token(ids, trigger_token_id(tok, "img"), copies, 77,
                                      tok.pad_token_id)
        # Each pair pads with its own id: EOS for the first tokenizer, "!" (0) for the second.
        assert expanded.input_ids[-1] == tok.pad_token_id
        output = encoder(torch.tensor([expanded.input_ids]), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output.text_embeds if hasattr(output, "text_embeds") else pooled
    assert result.prompt_embeds.shape == (1, 77, 64)
    torch.testing.assert_close(result.prompt_embeds, torch.cat(hidden, dim=-1))
    torch.testing.assert_close(result.pooled_prompt_embeds, pooled)


def test_repeated_class_tokens_get_distinct_embeddings(pipe):
    result = encode_prompt_with_trigger(pipe, "a person img", "img", 2, 1)
    rows = result.prompt_embeds[result.class_tokens_mask]
    assert rows.shape == (2, 64) and not torch.allclose(rows[0], rows[1])


def test_prompt_too_long_for_all_copies_is_refused(pipe):
    prompt = "x" * 67 + " person img"  # x by x, then p-er-s-on: class token at 71
    ids = pipe.tokenizer(prompt).input_ids
    assert ids.index(pipe.tokenizer.convert_tokens_to_ids("img")) - 1 == 71  # 6 of 8 fit
    with pytest.raises(ConfigError, match="do not fit"):
        encode_prompt_with_trigger(pipe, prompt, "img", 4, 2)


def test_prompt_without_trigger_is_refused(pipe):
    with pytest.raises(ConfigError, match="exactly one trigger"):
        encode_prompt_with_trigger(pipe, "a photo of a person", "img", 1, 2)


# ---------------------------------------------------------------------------------------
# Image preprocessing
# ---------------------------------------------------------------------------------------


def test_resize_truncates_the_long_side_and_crop_floors():
    assert resized_size(300, 451, 224) == (224, 336)
    assert resized_size(451, 300, 224) == (336, 224)
    assert center_crop_box(225, 301, 224) == (0, 38, 224, 262)


@pytest.mark.parametrize("size", [(451, 300), (224, 224), (301, 225), (80, 100), (1000, 37)])
def test_preprocessing_matches_the_pil_clip_processor(size):
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:  # transformers 4: the default class is the PIL one
        processor_class = transformers.CLIPImageProcessor
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = torch.as_tensor(np.asarray(processor_class()(image, return_tensors="np")[
        "pixel_values"]))
    ours = preprocess_id_images([image])
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_rgba_drops_alpha_without_compositing_and_order_is_kept():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (240, 260, 4), dtype=np.uint8), "RGBA")
    other = Image.fromarray(rng.integers(0, 256, (230, 230, 3), dtype=np.uint8))
    batch = preprocess_id_images([rgba, other])
    torch.testing.assert_close(batch[0], preprocess_id_images(rgba.convert("RGB"))[0])
    torch.testing.assert_close(batch[1], preprocess_id_images([other])[0])


def test_bad_image_inputs_are_named():
    with pytest.raises(ImageInputError, match="at least one"):
        preprocess_id_images([])
    with pytest.raises(ImageInputError, match="image 1"):
        preprocess_id_images([Image.new("RGB", (10, 10)), "face.jpg"])
