"""PhotoMaker's prompt side: the trigger word, the repeated class token, the ID prompt.

A PhotoMaker prompt names the person with a class word followed by the trigger word,
e.g. "a photo of a man img". For the ID-conditioned embedding the trigger is removed and
the class token (the single token just before the trigger) is repeated once per ID token
(N images x T tokens per image: T = 1 for V1, 2 for V2); the fusion then replaces those
positions with identity. The text-only embedding used before the merge step encodes the
prompt with the trigger removed and the class word once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bf_core.errors import ConfigError

DEFAULT_TRIGGER_WORD = "img"


def add_trigger_word(tokenizers: Sequence, trigger_word: str = DEFAULT_TRIGGER_WORD) -> None:
    """Register the trigger as an added special token in each tokenizer (None skipped).

    As a special token it is split out of the text before lower-casing and BPE, so it
    always becomes one id. The text encoders are not resized: that id never reaches
    them, because the trigger is removed before encoding. Adding it twice is harmless.
    """
    for tokenizer in tokenizers:
        if tokenizer is not None:
            tokenizer.add_tokens([trigger_word], special_tokens=True)


def trigger_token_id(tokenizer, trigger_word: str) -> int:
    """The id of the trigger word, which must have been added with ``add_trigger_word``."""
    if trigger_word not in tokenizer.get_added_vocab():
        raise ConfigError(
            f"the trigger word {trigger_word!r} is not a token of this tokenizer; load "
            "PhotoMaker with load_photomaker(pipe, ...) (or call add_trigger_word) first.")
    return int(tokenizer.convert_tokens_to_ids(trigger_word))


def find_trigger_positions(token_ids: Sequence[int], trigger_id: int) -> list[int]:
    """Indices of every occurrence of ``trigger_id`` in ``token_ids``."""
    return [index for index, token in enumerate(token_ids) if token == trigger_id]


def _trigger_count_error(count: int, trigger_word: str) -> ConfigError:
    where = "none was found" if count == 0 else f"{count} were found"
    return ConfigError(
        f"a PhotoMaker prompt needs exactly one trigger word {trigger_word!r}, right after "
        f"the class word (e.g. 'a photo of a man {trigger_word}'), but {where}. A trigger "
        "beyond the 77th token is cut off: move it earlier.")


@dataclass(frozen=True)
class ExpandedPromptIds:
    """Token ids with the class token repeated, and where the repeats are."""

    input_ids: list[int]
    """Exactly ``max_length`` ids, trigger removed, class token repeated, padded."""
    class_tokens_mask: list[bool]
    """True at the repeated class-token positions (fewer than asked if cut at the end)."""
    class_token_index: int
    """Position of the first copy of the class token."""


def expand_class_token(token_ids: Sequence[int], trigger_id: int, num_copies: int,
                       max_length: int, pad_id: int,
                       trigger_word: str = DEFAULT_TRIGGER_WORD) -> ExpandedPromptIds:
    """Remove the trigger and repeat the token before it ``num_copies`` times.

    token_ids: the prompt's ids already padded/truncated to ``max_length`` (BOS first).
    Returns ids of length ``max_length`` (truncated, or padded with ``pad_id``) and the
    class-token mask. A prompt starting with the trigger repeats BOS. Exactly one
    trigger is required.
    """
    positions = find_trigger_positions(token_ids, trigger_id)
    if len(positions) != 1:
        raise _trigger_count_error(len(positions), trigger_word)
    clean = [token for token in token_ids if token != trigger_id]
    class_index = positions[0] - 1
    copies = [clean[class_index]] * num_copies
    expanded = clean[:class_index] + copies + clean[class_index + 1:]
    expanded = expanded[:max_length] + [pad_id] * (max_length - len(expanded))
    mask = [class_index <= index < class_index + num_copies for index in range(max_length)]
    return ExpandedPromptIds(expanded, mask, class_index)


def remove_trigger_word(tokenizer, prompt: str, trigger_word: str = DEFAULT_TRIGGER_WORD
                        ) -> str:
    """The text-only prompt: the first trigger removed, the class word kept once.

    Tokenises without special tokens, drops the first trigger id and decodes, so the
    result reads like CLIP's decoding ("a photo of a man img, smiling" ->
    "a photo of a man , smiling"), which re-tokenises to the same tokens.
    """
    trigger_id = trigger_token_id(tokenizer, trigger_word)
    token_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    if trigger_id in token_ids:
        token_ids.remove(trigger_id)
    return tokenizer.decode(token_ids)


@dataclass
class TriggerPromptEmbeds:
    """What the fusion needs from the text side of one PhotoMaker prompt."""

    prompt_embeds: torch.Tensor
    """(1, 77, D): hidden_states[-2] of both text encoders on the expanded ids, concatenated."""
    pooled_prompt_embeds: torch.Tensor
    """(1, P): text_encoder_2's pooled projection of the expanded ids (no identity in it)."""
    class_tokens_mask: torch.Tensor
    """(1, 77) bool: the positions the fusion replaces."""
    num_id_tokens: int
    """N x T, the number of ID tokens the fusion expects."""


def _text_pairs(pipe, prompt: str, prompt_2: str | None):
    pairs = [(pipe.tokenizer, pipe.text_encoder, prompt),
             (pipe.tokenizer_2, pipe.text_encoder_2, prompt_2 if prompt_2 is not None else prompt)]
    return [pair for pair in pairs if pair[0] is not None and pair[1] is not None]


def encode_prompt_with_trigger(pipe, prompt: str, trigger_word: str, num_id_images: int,
                               tokens_per_image: int, *, prompt_2: str | None = None,
                               clip_skip: int | None = None, device=None) -> TriggerPromptEmbeds:
    """Encode the class-expanded prompt with an SDXL pipeline's two text encoders.

    For each (tokenizer, text encoder) pair: tokenise to 77 ids, remove the trigger,
    repeat the class token ``num_id_images * tokens_per_image`` times, pad/truncate to 77,
    run the encoder without attention mask and take ``hidden_states[-2]`` (or
    ``[-(clip_skip + 2)]``). The widths are concatenated (CLIP-L first) and cast to
    ``text_encoder_2``'s dtype; the pooled vector comes from ``text_encoder_2``.
    ``prompt_2`` (for the second pair) must hold the trigger too.
    """
    if num_id_images < 1 or tokens_per_image < 1:
        raise ConfigError(f"num_id_images ({num_id_images}) and tokens_per_image "
                          f"({tokens_per_image}) must both be at least 1.")
    num_copies = num_id_images * tokens_per_image
    device = device if device is not None else pipe.text_encoder_2.device
    hidden_layer = -2 if clip_skip is None else -(clip_skip + 2)
    embeds, masks, pooled = [], [], None
    for tokenizer, text_encoder, text in _text_pairs(pipe, prompt, prompt_2):
        max_length = tokenizer.model_max_length
        token_ids = tokenizer(text, padding="max_length", max_length=max_length,
                              truncation=True).input_ids
        expanded = expand_class_token(token_ids, trigger_token_id(tokenizer, trigger_word),
                                      num_copies, max_length, tokenizer.pad_token_id,
                                      trigger_word)
        ids = torch.tensor([expanded.input_ids], device=device)
        output = text_encoder(ids, output_hidden_states=True)
        embeds.append(output.hidden_states[hidden_layer])
        masks.append(expanded.class_tokens_mask)
        pooled = output[0]  # text_embeds of the projection model; the last pair wins
    if any(mask != masks[-1] for mask in masks):
        raise ConfigError("prompt and prompt_2 put the class word at different token "
                          "positions; give prompt_2=None or the same class word and trigger "
                          "at the same place.")
    mask = torch.tensor([masks[-1]], device=device)
    if int(mask.sum()) != num_copies:
        raise ConfigError(
            f"the {num_copies} copies of the class word do not fit in {mask.shape[1]} tokens "
            f"(only {int(mask.sum())} do): shorten the prompt, move the class word and "
            f"trigger earlier, or use fewer reference images.")
    dtype = pipe.text_encoder_2.dtype
    prompt_embeds = torch.cat(embeds, dim=-1).to(dtype=dtype, device=device)
    return TriggerPromptEmbeds(prompt_embeds, pooled.to(dtype=dtype, device=device), mask,
                               num_copies)


def fuse_identity(encoder, encoded: TriggerPromptEmbeds, pixel_values: torch.Tensor,
                  face_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The ID-fused prompt embedding P' (1, 77, D) in the prompt's dtype.

    pixel_values (N, 3, H, W) from ``preprocess_id_images``; face_embeds (N, 512) raw
    insightface embeddings for V2, None for V1. ``encoded`` must have been built with
    the same N and the encoder's ``tokens_per_image``.
    """
    expected = pixel_values.shape[-4] * encoder.tokens_per_image
    if encoded.num_id_tokens != expected:
        raise ConfigError(
            f"the prompt was expanded for {encoded.num_id_tokens} ID tokens but "
            f"{pixel_values.shape[-4]} image(s) x {encoder.tokens_per_image} token(s) give "
            f"{expected}: encode the prompt with num_id_images={pixel_values.shape[-4]} and "
            f"tokens_per_image={encoder.tokens_per_image}.")
    weight = next(encoder.parameters())
    pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
    if face_embeds is not None:
        face_embeds = face_embeds.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        id_tokens = encoder.encode_id_tokens(pixel_values, face_embeds)
        prompt_embeds = encoded.prompt_embeds.to(weight.device)
        fused = encoder.fuse(prompt_embeds, encoded.class_tokens_mask.to(weight.device),
                             id_tokens)
    return fused.to(encoded.prompt_embeds.device)
