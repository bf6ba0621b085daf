"""Tiny PhotoMaker checkpoints in the official layout, for offline tests.

``write_tiny_checkpoint`` saves a tiny encoder's weights and a random LoRA on every
attention projection of a (tiny) UNet exactly as the official files are organised, so
``load_photomaker`` can be exercised end to end without the real weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from bf_backends.photomaker.encoder import PhotoMakerIDEncoderV1, PhotoMakerIDEncoderV2

_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def _projection_linear(attention: torch.nn.Module, projection: str) -> torch.nn.Linear:
    linear = attention.to_out[0] if projection == "to_out" else getattr(attention, projection)
    return getattr(linear, "base_layer", linear)  # skip a PEFT wrapper if one is there


def make_tiny_lora_weights(unet: torch.nn.Module, rank: int = 4, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random LoRA on every attention processor of ``unet``, in the official key format.

    Keys ``unet.<processor name>.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight``; down
    (rank, in), up (out, rank). Values are scaled so the LoRA visibly changes the UNet
    output without swamping it.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for processor_name in unet.attn_processors:
        attention = unet.get_submodule(processor_name.removesuffix(".processor"))
        for projection in _PROJECTIONS:
            linear = _projection_linear(attention, projection)
            prefix = f"unet.{processor_name}.{projection}_lora"
            down = torch.randn(rank, linear.in_features, generator=generator)
            up = torch.randn(linear.out_features, rank, generator=generator)
            weights[f"{prefix}.down.weight"] = (down / math.sqrt(linear.in_features)).to(dtype)
            weights[f"{prefix}.up.weight"] = (up * 0.1 / math.sqrt(rank)).to(dtype)
    return weights


def write_tiny_checkpoint(path: str | os.PathLike, version: str,
                          encoder: PhotoMakerIDEncoderV1 | PhotoMakerIDEncoderV2,
                          unet: torch.nn.Module, *, rank: int = 4, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write ``encoder`` and a random LoRA for ``unet`` as a PhotoMaker checkpoint.

    ``.safetensors``: one namespace, keys prefixed ``id_encoder.`` / ``lora_weights.``;
    any other suffix (``.bin``): ``torch.save`` of ``{"id_encoder": ..., "lora_weights":
    ...}``. ``version`` must be the encoder's. Returns the path.
    """
    if encoder.version != version:
        raise ValueError(f"version={version!r} but the encoder is {encoder.version}; pass the "
                         "encoder's own version.")
    path = Path(path)
    id_encoder = {key: tensor.detach().to("cpu", dtype).clone().contiguous()
                  for key, tensor in encoder.state_dict().items()}
    lora_weights = make_tiny_lora_weights(unet, rank=rank, seed=seed, dtype=dtype)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"id_encoder.{key}": tensor for key, tensor in id_encoder.items()}
        flat.update({f"lora_weights.{key}": tensor for key, tensor in lora_weights.items()})
        save_file(flat, str(path))
    else:
        torch.save({"id_encoder": id_encoder, "lora_weights": lora_weights}, path)
    return path


# --------------------------------------------------------------------------------------
# Private: a tiny offline SDXL pipeline for this backend's own tests (not part of the
# shared test kit that every backend runs).
# --------------------------------------------------------------------------------------


def _byte_level_vocab() -> dict[str, int]:
    """CLIP-style byte vocabulary: 256 byte symbols, their end-of-word forms, BOS, EOS.

    With no merges it tokenises character by character; EOS (513) is the largest id, as
    CLIP's legacy pooling (argmax of the ids) requires.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2's byte-to-unicode map: printable bytes stand for themselves, the rest shift up.
    shifted = [byte for byte in range(256) if byte not in printable]
    symbols = [chr(byte) for byte in printable] + [chr(256 + i) for i in range(len(shifted))]
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _byte_level_clip_tokenizer(pad_token: str):
    """An in-memory CLIPTokenizer (77 tokens) over ``_byte_level_vocab``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=77,
                         pad_token=pad_token)


def _tiny_sdxl_pipeline(seed: int = 0):
    """A 1.4 M-parameter SDXL pipeline: text widths 32 + 32 = UNet cross-attention 64."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _byte_level_clip_tokenizer("<|endoftext|>")
    tokenizer_2 = _byte_level_clip_tokenizer("!")  # SDXL's second tokenizer pads with id 0
    text_config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, vocab_size=1000, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16, 16], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)
