"""A tiny, randomly initialised SDXL pipeline built from configs, fully offline.

Used by the tests, the demo and the conformance kit. Same classes and call contract as
real SDXL (two CLIP text encoders, a text-time UNet, a VAE with scale factor 8), about
1.4 M parameters, so a 64x64, 6-step call takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch

TINY_TEXT_WIDTH = 32  # each text encoder; the UNet's cross-attention width is 2 * 32
TINY_CROSS_ATTENTION_DIM = 2 * TINY_TEXT_WIDTH
TINY_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("e", "r"), ("o", "n</w>")]


def _bytes_to_unicode() -> list[str]:
    """The GPT-2/CLIP byte-to-character table: 256 printable characters, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP vocabulary: bytes, their end-of-word forms, a few merges, specials.

    The end-of-text token gets the largest id, as CLIP's pooling expects.
    """
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, list(TINY_MERGES)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_folder() -> Path:
    """A folder with ``vocab.json`` and ``merges.txt`` of the tiny vocabulary (made once)."""
    folder = Path(tempfile.mkdtemp(prefix="beyondfacial-tiny-tokenizer-"))
    vocab, merges = tiny_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_tokenizers():
    """(tokenizer, tokenizer_2): CLIP tokenizers padding like SDXL's (end-of-text, then "!")."""
    from transformers import CLIPTokenizer

    folder = str(tiny_tokenizer_folder())
    first = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="<|endoftext|>")
    second = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")
    return first, second


def _text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000, hidden_size=TINY_TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=TINY_TEXT_WIDTH, hidden_act="gelu",
        layer_norm_eps=1e-5, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def tiny_unet_config() -> dict:
    """The tiny SDXL-shaped UNet's config (text_time conditioning like SDXL)."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_WIDTH,
        norm_num_groups=8)


def sdxl_scheduler_config() -> dict:
    """SDXL base's published scheduler config (so DDIM inherits clip_sample=False etc.)."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000, prediction_type="epsilon", timestep_spacing="leading",
                steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                interpolation_type="linear", use_karras_sigmas=False)


def make_scheduler(name: str):
    """``"ddim"`` (the paper's sampler) or ``"euler"`` (SDXL's default) with SDXL's config."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(**{k: v for k, v in sdxl_scheduler_config().items()
                                if k not in ("interpolation_type", "use_karras_sigmas")})
    if name == "euler":
        config = {k: v for k, v in sdxl_scheduler_config().items()
                  if k not in ("clip_sample", "set_alpha_to_one")}
        return EulerDiscreteScheduler(**config)
    raise ValueError(f"scheduler must be 'ddim' or 'euler', got {name!r}")


def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A tiny ``StableDiffusionXLPipeline`` with random weights, deterministic per seed.

    Built without touching the global random state. No watermark, no network.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, sample_size=64,
            block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=make_scheduler(scheduler),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def add_tiny_lora(pipe, adapter_name: str = "identity", rank: int = 4, seed: int = 0,
                  scale: float = 0.5, text_encoders: bool = True) -> None:
    """Give the pipeline a random DreamBooth-style LoRA named ``adapter_name`` (PEFT).

    Covers the UNet's attention projections and, with ``text_encoders``, both text
    encoders' attention, like a character LoRA trained with its text encoder. The LoRA's
    up-projections are random (not zero), so the adapter really changes the output.
    """
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        pipe.unet.add_adapter(unet_config, adapter_name=adapter_name)
        if text_encoders:
            text_config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
            # peft directly: transformers' own ``add_adapter`` insists on a newer peft than
            # some transformers 5 releases can be installed with
            inject_adapter_in_model(text_config, pipe.text_encoder, adapter_name=adapter_name)
            inject_adapter_in_model(text_config, pipe.text_encoder_2, adapter_name=adapter_name)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for name, param in module.named_parameters():
                if adapter_name in name and "lora_B" in name:
                    param.mul_(scale)
