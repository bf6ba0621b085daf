"""A tiny, randomly initialised FLUX.1 pipeline built from configs, fully offline.

Same classes and call contract as FLUX.1-dev: a CLIP text encoder (pooled output only), a
T5 encoder, a ``FluxTransformer2DModel`` with guidance embedding, a 16-channel VAE and
FLUX.1-dev's own flow-matching scheduler config (dynamic shifting), so the shift path is
exercised. Both tokenizers are built in code: no download, as for the tiny SDXL pipeline.
A 64 x 64, 4-step call takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import string

import torch

from bf_core.testing.tiny import tiny_tokenizers

TINY_FLUX_TEXT_WIDTH = 32  # T5 d_model = the transformer's joint_attention_dim
TINY_FLUX_POOLED_WIDTH = 32  # CLIP hidden size = pooled_projection_dim
_T5_WORDS = ("a", "the", "of", "photo", "person", "man", "woman", "sks", "two", "friends",
             "at", "market", "lake", "by", "small", "full", "body", "kneeling", "shaking",
             "hands", "street", "wide", "shot", "water")


def flux_dev_scheduler_config() -> dict:
    """FLUX.1-dev's ``scheduler/scheduler_config.json``: dynamic shifting on the token count."""
    return dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer from an in-code vocabulary: <pad> 0, </s> 1, <unk> 2, single
    characters (with the word-start mark) and a few whole words."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits + ".,!?'-"]
    pieces += [("\u2581" + ch, -2.5) for ch in string.ascii_lowercase]
    pieces += [("\u2581" + word, -1.0) for word in _T5_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_flux_transformer_config() -> dict:
    """The tiny transformer: 2 double and 2 single blocks, 2 heads of 16, guidance embedding
    as FLUX.1-dev (rope axes sum to the head width)."""
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=TINY_FLUX_TEXT_WIDTH,
                pooled_projection_dim=TINY_FLUX_POOLED_WIDTH, guidance_embeds=True,
                axes_dims_rope=(4, 4, 8))


def tiny_flux_pipeline(seed: int = 0):
    """A tiny ``FluxPipeline`` with random weights, deterministic per seed; built without
    touching the global random state."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, _ = tiny_tokenizers()
    t5_tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**tiny_flux_transformer_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=1,
            block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611, sample_size=32)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=1000, hidden_size=TINY_FLUX_POOLED_WIDTH, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, projection_dim=TINY_FLUX_POOLED_WIDTH,
            max_position_embeddings=77, bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id))
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=TINY_FLUX_TEXT_WIDTH, d_kv=8, d_ff=37,
            num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**flux_dev_scheduler_config()),
                        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def add_tiny_flux_lora(pipe, adapter_name: str = "identity", rank: int = 4, seed: int = 0,
                       scale: float = 0.5, text_encoder: bool = True) -> None:
    """Give the tiny FLUX pipeline a random character LoRA named ``adapter_name`` (PEFT) on
    the transformer's attention projections and, with ``text_encoder``, on CLIP's attention
    (FLUX LoRAs train CLIP at most, never T5). Up-projections are random, scaled by ``scale``,
    so the adapter really changes the output."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
            adapter_name=adapter_name)
        if text_encoder:
            inject_adapter_in_model(
                LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                pipe.text_encoder, adapter_name=adapter_name)
    with torch.no_grad():
        for module in (pipe.transformer, pipe.text_encoder):
            for name, param in module.named_parameters():
                if adapter_name in name and "lora_B" in name:
                    param.mul_(scale)
