"""Tiny InstantID parts for offline tests, the demo and the benchmarks: an IdentityNet
config, an ``ip-adapter.bin`` writer, tiny pipelines and the ``BackendExtras`` set-ups.

Everything here is random-weight and sized for a tiny SDXL UNet (cross-attention width 64),
while keeping what makes InstantID InstantID: a 512-wide raw face embedding in, 16 ID tokens
out, the official two-part file layout, and the processor numbering of the official loader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bf_backends.instantid.loader import (
    FACE_EMBEDDING_DIM,
    ID_TOKEN_COUNT,
    ip_adapter_shapes,
    resampler_shapes,
)
from bf_core.extras import PipelineSetup, SpeedSetup

TINY_RESAMPLER_WIDTH = 128
KEYPOINT_IMAGE_GAIN = 30.0  # two heads of 64, the smallest width diffusers' converter accepts


def tiny_identitynet_config(cross_attention_dim: int = 64) -> dict:
    """A ``ControlNetModel`` config shaped like IdentityNet for the tiny SDXL UNet.

    Mirrors the tiny UNet (channels 32/64, one layer per block, transformer layers 1/2,
    text_time conditioning with 8-wide time embeddings and a 32-wide pooled text vector).
    The conditioning embedding keeps IdentityNet's three stride-2 stages so an RGB keypoint
    image at pixel resolution lands on the latent grid (vae_scale_factor 8).
    """
    return {
        "in_channels": 4,
        "conditioning_channels": 3,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "layers_per_block": 1,
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,
        "norm_num_groups": 8,
        "conditioning_embedding_out_channels": (8, 8, 16, 16),
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }


def tiny_identitynet(seed: int = 0, cross_attention_dim: int = 64):
    """A random tiny IdentityNet whose residuals are not all zero.

    A fresh ControlNet has zero-initialised output convolutions, which would make every
    residual zero and every test of the conditioning path vacuous; they are re-drawn here.
    """
    from diffusers import ControlNetModel

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # diffusers initialises from the global RNG; leave it as found
        torch.manual_seed(seed)
        net = ControlNetModel(**tiny_identitynet_config(cross_attention_dim))
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                  net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
        # A trained IdentityNet's residuals depend strongly on where the keypoints are; with
        # random weights the keypoint image must also weigh enough to tell placements apart.
        embedding_out = net.controlnet_cond_embedding.conv_out.weight
        embedding_out.mul_(KEYPOINT_IMAGE_GAIN)
    return net.eval()


def _random_like_shapes(shapes: dict[str, tuple[int, ...]], generator: torch.Generator,
                        ) -> dict[str, torch.Tensor]:
    """Random tensors for a ``{key: shape}`` map; norms start near identity like trained ones."""
    tensors = {}
    for key, shape in shapes.items():
        is_norm = ".norm" in f".{key}" or key.endswith((".1.0.weight", ".1.0.bias"))
        if is_norm and key.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif is_norm or key.endswith(".bias"):
            value = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        tensors[key] = value.float().contiguous()
    return tensors


def make_instantid_state_dict(unet, seed: int = 0, hidden_dim: int = TINY_RESAMPLER_WIDTH,
                              ) -> dict[str, dict[str, torch.Tensor]]:
    """Random ``{"image_proj": ..., "ip_adapter": ...}`` in the official layout for ``unet``.

    ``image_proj`` is a Resampler 512 -> ``hidden_dim`` -> the UNet's cross-attention width
    with 16 queries and depth 4; ``ip_adapter`` has ``"{k}.to_k_ip.weight"`` /
    ``"{k}.to_v_ip.weight"`` for every cross-attention processor position k of ``unet``.
    """
    generator = torch.Generator().manual_seed(seed)
    output_dim = unet.config.cross_attention_dim
    return {
        "image_proj": _random_like_shapes(
            resampler_shapes(FACE_EMBEDDING_DIM, hidden_dim, output_dim, ID_TOKEN_COUNT),
            generator),
        "ip_adapter": _random_like_shapes(ip_adapter_shapes(unet), generator),
    }


def write_tiny_ip_adapter_bin(path: str | os.PathLike, unet, seed: int = 0,
                              hidden_dim: int = TINY_RESAMPLER_WIDTH) -> dict:
    """Write ``make_instantid_state_dict(unet, seed)`` with ``torch.save`` like the official file.

    Returns the state dict that was written.
    """
    state_dict = make_instantid_state_dict(unet, seed=seed, hidden_dim=hidden_dim)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, str(path))
    return state_dict


# --------------------------------------------------------------------------- tiny pipelines

TINY_IDENTITYNET_SEED_OFFSET = 10
TINY_ADAPTER_SEED_OFFSET = 11


def tiny_pipeline(seed: int = 0, scheduler: str = "ddim", ip_scale: float = 0.8):
    """A tiny InstantID pipeline the backend recognises, the way ``load_instantid_pipeline``
    builds real ones: ``bf_core.testing.tiny_sdxl_pipeline`` + a random tiny IdentityNet as
    the ControlNet + a random ``ip-adapter.bin`` loaded through diffusers' ``load_ip_adapter``.
    """
    from bf_backends.instantid.loader import assemble_instantid_pipeline
    from bf_core.testing import tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline(seed=seed, scheduler=scheduler)
    net = tiny_identitynet(seed=seed + TINY_IDENTITYNET_SEED_OFFSET,
                           cross_attention_dim=base.unet.config.cross_attention_dim)
    state = make_instantid_state_dict(base.unet, seed=seed + TINY_ADAPTER_SEED_OFFSET)
    return assemble_instantid_pipeline(base, net, state, scale=ip_scale)


def tiny_adapter_state(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The ``ip-adapter.bin`` contents ``tiny_pipeline(seed)`` loaded (official layout)."""
    from bf_core.testing import tiny_sdxl_pipeline

    unet = tiny_sdxl_pipeline(seed=seed).unet
    return make_instantid_state_dict(unet, seed=seed + TINY_ADAPTER_SEED_OFFSET)


class OfficialStyleResampler(torch.nn.Module):
    """A Resampler with the official module layout (``image_proj_model`` of the official
    pipeline): its ``state_dict`` keys are the ``image_proj`` keys of ``ip-adapter.bin``.
    The forward is the spec's math (``reference.reference_resampler``).
    """

    def __init__(self, image_proj: dict[str, torch.Tensor]):
        super().__init__()
        nn = torch.nn
        width = image_proj["latents"].shape[-1]
        out_dim = image_proj["proj_out.weight"].shape[0]
        depth = len({key.split(".")[1] for key in image_proj if key.startswith("layers.")})
        self.latents = nn.Parameter(torch.zeros(1, ID_TOKEN_COUNT, width))
        self.proj_in = nn.Linear(FACE_EMBEDDING_DIM, width)
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

        def attention():
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            block.to_q = nn.Linear(width, width, bias=False)
            block.to_kv = nn.Linear(width, 2 * width, bias=False)
            block.to_out = nn.Linear(width, width, bias=False)
            return block

        def feed_forward():
            return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width, bias=False),
                                 nn.GELU(), nn.Linear(4 * width, width, bias=False))

        self.layers = nn.ModuleList([nn.ModuleList([attention(), feed_forward()])
                                     for _ in range(depth)])
        self.load_state_dict(image_proj, strict=True)

    def forward(self, face_embeddings: torch.Tensor) -> torch.Tensor:
        from bf_backends.instantid.reference import reference_resampler

        return reference_resampler(self.state_dict(), face_embeddings)


class OfficialStyleIPAttnProcessor(torch.nn.Module):
    """A processor with the official layout: ``to_k_ip``/``to_v_ip`` Linears, float ``scale``,
    int ``num_tokens``; defines ``forward`` only, as the official class does."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 0.5,
                 num_tokens: int = ID_TOKEN_COUNT):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.scale, self.num_tokens = scale, num_tokens
        self.to_k_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                temb=None, *args, **kwargs):
        from bf_backends.instantid.reference import ReferenceIPAttnProcessor

        math = ReferenceIPAttnProcessor(self.to_k_ip.weight, self.to_v_ip.weight, self.scale,
                                        self.num_tokens)
        return math(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def tiny_official_style_pipeline(seed: int = 0, scheduler: str = "ddim", ip_scale: float = 0.8):
    """The same tiny weights set up the official way, without its code.

    An ``StableDiffusionXLControlNetPipeline`` carrying ``image_proj_model`` (official
    layout) and official-style processors loaded from ``ip_adapter`` by processor position,
    what ``load_ip_adapter_instantid`` leaves behind. Same numbers as ``tiny_pipeline(seed)``.
    """
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from bf_backends.instantid.loader import cross_attention_numbering
    from bf_core.testing import tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline(seed=seed, scheduler=scheduler)
    unet = base.unet
    net = tiny_identitynet(seed=seed + TINY_IDENTITYNET_SEED_OFFSET,
                           cross_attention_dim=unet.config.cross_attention_dim)
    state = make_instantid_state_dict(unet, seed=seed + TINY_ADAPTER_SEED_OFFSET)
    pipe = StableDiffusionXLControlNetPipeline(
        **{k: v for k, v in base.components.items()
           if k not in ("feature_extractor", "image_encoder")},
        controlnet=net, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    processors: dict[str, object] = {name: AttnProcessor2_0() for name in unet.attn_processors}
    context_dim = unet.config.cross_attention_dim
    for k, path in cross_attention_numbering(unet).items():
        proc = OfficialStyleIPAttnProcessor(unet.get_submodule(path).to_q.in_features,
                                            context_dim, scale=ip_scale)
        proc.to_k_ip.weight.data.copy_(state["ip_adapter"][f"{k}.to_k_ip.weight"])
        proc.to_v_ip.weight.data.copy_(state["ip_adapter"][f"{k}.to_v_ip.weight"])
        processors[f"{path}.processor"] = proc
    unet.set_attn_processor(processors)
    pipe.image_proj_model = OfficialStyleResampler(state["image_proj"]).eval()
    pipe.image_proj_model_in_features = FACE_EMBEDDING_DIM
    return pipe


def face_pack(folder: str | os.PathLike, finds_faces: bool = True, seed: int = 0) -> Path:
    """A random antelopev2-named insightface pack that finds faces everywhere or nowhere."""
    from bf_core.testing.faces import make_random_antelopev2_pack

    return make_random_antelopev2_pack(folder, seed=seed,
                                       face_logit_bias=10.0 if finds_faces else -10.0)


# --------------------------------------------------------------------------- BackendExtras


def reference_photo(seed: int = 0, size: tuple[int, int] = (80, 96)):
    """A random RGB picture of ``size`` (width, height): the random face pack of
    ``face_pack(finds_faces=True)`` finds a face in any photo, so its content is free."""
    from PIL import Image

    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    return Image.fromarray(pixels)


def tiny_setup(seed: int = 0) -> PipelineSetup:
    """The tiny offline InstantID pipeline, one photo as the demo identity, and a random
    antelopev2 pack that finds a face in every photo as every call's analyser."""
    import tempfile

    from bf_core.faces import FaceAnalyzer

    folder = Path(tempfile.mkdtemp(prefix="beyondfacial-antelopev2-"))
    pack = face_pack(folder / "antelopev2", finds_faces=True, seed=seed)
    analyzer = FaceAnalyzer(str(pack), det_size=(128, 128), providers=["CPUExecutionProvider"])
    return PipelineSetup(tiny_pipeline(seed=seed),
                         identity={"id_images": [reference_photo(seed)], "id_prompt": "a person"},
                         options={"face_analyzer": analyzer})


def five_keypoints(resolution: int) -> np.ndarray:
    """(5, 2) face keypoints in output pixels (eyes, nose, mouth corners), centred."""
    fractions = np.array([[0.42, 0.40], [0.58, 0.40], [0.50, 0.50], [0.44, 0.60], [0.56, 0.60]])
    return fractions * resolution


def speed_setup(pipe: Any, real: bool, resolution: int, seed: int = 0,
                lora_rank: int = 64) -> SpeedSetup:
    """InstantID at the pipeline's size (random weights): IdentityNet from the published
    ControlNet config (or the tiny one) and the 16-token ID attention (1280-wide Resampler
    at real size); a precomputed face embedding and fixed keypoints replace the face
    analyser. ``lora_rank`` is unused: InstantID has no LoRA."""
    from bf_backends.instantid.loader import (
        RESAMPLER_WIDTH,
        assemble_instantid_pipeline,
        config_for_identitynet,
    )

    if real:
        from diffusers import ControlNetModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ControlNetModel(**config_for_identitynet())
        state = make_instantid_state_dict(pipe.unet, seed=seed, hidden_dim=RESAMPLER_WIDTH)
    else:
        net = tiny_identitynet(seed=seed, cross_attention_dim=pipe.unet.config.cross_attention_dim)
        state = make_instantid_state_dict(pipe.unet, seed=seed)
    net = net.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    pipe = assemble_instantid_pipeline(pipe, net, state)
    face = torch.randn((1, FACE_EMBEDDING_DIM), generator=torch.Generator().manual_seed(seed))
    return SpeedSetup(pipe, {"face_embeds": face, "kps": five_keypoints(resolution)})
