"""Test support: the official single-line InstantID noise prediction, written out from the spec.

This is deliberately independent of diffusers' IP-Adapter machinery: the Resampler is
plain tensor math on the official ``image_proj`` keys, and the UNet's cross-attention uses
a processor that implements the official "last 16 context tokens are ID tokens" layout
with ``to_k_ip`` / ``to_v_ip`` taken from ``ip_adapter`` by processor position. Later
bit-exact tests compare the backend's ID line against ``reference_noise_prediction``.

Order and negatives follow the official basic pipeline: CFG halves are [negative;
positive]; the negative ID tokens are the Resampler's output for a zero embedding (not
zero tokens) and feed both the UNet and IdentityNet; IdentityNet sees only the ID tokens
as its context, the pooled text and time ids as added conditions, and the same keypoint
image in both halves; its residuals are already scaled by the conditioning scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from bf_backends.instantid.loader import (
    ID_TOKEN_COUNT,
    RESAMPLER_HEAD_DIM,
    cross_attention_numbering,
)
from bf_backends.instantid.state import preserved_attention_state
from bf_core.attention import merge_heads, split_heads

Tensor = torch.Tensor


def _resampler_attention(weights: Mapping[str, Tensor], prefix: str, faces: Tensor,
                         queries: Tensor) -> Tensor:
    """One Perceiver attention: queries (B, 16, W) read [norm1(faces); norm2(queries)].

    Softmax in float32 with Q and K each pre-scaled by d**-1/4, as the official code does.
    Returns (B, 16, W), to be added to the un-normalised queries.
    """
    width = queries.shape[-1]

    def layer_norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, (width,), weights[f"{prefix}.{name}.weight"],
                            weights[f"{prefix}.{name}.bias"], eps=1e-5)

    faces_n, queries_n = layer_norm(faces, "norm1"), layer_norm(queries, "norm2")
    q = queries_n @ weights[f"{prefix}.to_q.weight"].T
    k, v = (torch.cat([faces_n, queries_n], dim=1) @ weights[f"{prefix}.to_kv.weight"].T).chunk(2, -1)
    heads = width // RESAMPLER_HEAD_DIM  # the attention's inner width is the queries'
    q, k, v = (split_heads(t, heads) for t in (q, k, v))
    quarter = RESAMPLER_HEAD_DIM ** -0.25
    attn = ((q * quarter) @ (k * quarter).transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
    return merge_heads(attn @ v) @ weights[f"{prefix}.to_out.weight"].T


def reference_resampler(image_proj: Mapping[str, Tensor], face_embeddings: Tensor) -> Tensor:
    """The official InstantID Resampler: (B, N, 512) face embeddings -> (B, 16, D) ID tokens.

    ``image_proj`` is the official state dict (``latents``, ``proj_in``, ``layers.{i}.0``
    attention, ``layers.{i}.1`` feed-forward, ``proj_out``, ``norm_out``).
    """
    weights = image_proj
    faces = F.linear(face_embeddings, weights["proj_in.weight"], weights["proj_in.bias"])
    queries = weights["latents"].repeat(face_embeddings.shape[0], 1, 1)
    width = queries.shape[-1]
    depth = len({key.split(".")[1] for key in weights if key.startswith("layers.")})
    for i in range(depth):
        queries = queries + _resampler_attention(weights, f"layers.{i}.0", faces, queries)
        ff = f"layers.{i}.1"
        hidden = F.layer_norm(queries, (width,), weights[f"{ff}.0.weight"],
                              weights[f"{ff}.0.bias"], eps=1e-5)
        hidden = F.gelu(hidden @ weights[f"{ff}.1.weight"].T) @ weights[f"{ff}.3.weight"].T
        queries = queries + hidden
    out = F.linear(queries, weights["proj_out.weight"], weights["proj_out.bias"])
    return F.layer_norm(out, (out.shape[-1],), weights["norm_out.weight"],
                        weights["norm_out.bias"], eps=1e-5)


class ReferenceIPAttnProcessor:
    """Official InstantID cross-attention: context = [text tokens; 16 ID tokens].

    Output = to_out(Attn(q, K_text, V_text) + scale * Attn(q, K_ip(ID), V_ip(ID))), two
    separate softmaxes with the layer's heads, no mask on the ID branch.
    """

    def __init__(self, to_k_ip: Tensor, to_v_ip: Tensor, scale: float,
                 num_tokens: int = ID_TOKEN_COUNT):
        self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip
        self.scale, self.num_tokens = scale, num_tokens

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 *args, **kwargs) -> Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.norm_cross:
            raise ValueError("ReferenceIPAttnProcessor covers SDXL cross-attention only "
                             "(3-D hidden states, a context, no norm_cross).")
        text = encoder_hidden_states[:, : -self.num_tokens]
        identity = encoder_hidden_states[:, -self.num_tokens:]
        heads = attn.heads  # every projection here is the layer's width, heads x head_dim
        q = split_heads(attn.to_q(hidden_states), heads)
        text_out = F.scaled_dot_product_attention(
            q, split_heads(attn.to_k(text), heads), split_heads(attn.to_v(text), heads),
            attn_mask=attention_mask)
        id_out = F.scaled_dot_product_attention(
            q, split_heads(F.linear(identity, self.to_k_ip.to(q.dtype)), heads),
            split_heads(F.linear(identity, self.to_v_ip.to(q.dtype)), heads))
        out = attn.to_out[1](attn.to_out[0](merge_heads(text_out + self.scale * id_out)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def reference_unet(unet, ip_adapter: Mapping[str, Tensor], scale: float) -> Iterator[object]:
    """``unet`` temporarily running the official InstantID attention (restored afterwards).

    Works on a plain UNet and on one that carries diffusers' IP-Adapter: its projection is
    detached for the duration, as the official pipeline has none on the UNet.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    with preserved_attention_state(unet):
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None
        processors: dict[str, object] = {n: AttnProcessor2_0() for n in unet.attn_processors}
        for k, path in cross_attention_numbering(unet).items():
            processors[f"{path}.processor"] = ReferenceIPAttnProcessor(
                ip_adapter[f"{k}.to_k_ip.weight"], ip_adapter[f"{k}.to_v_ip.weight"], scale)
        unet.set_attn_processor(processors)
        yield unet


def reference_id_tokens(image_proj: Mapping[str, Tensor], face_embeddings: Tensor,
                        num_images: int, do_cfg: bool = True) -> Tensor:
    """ID tokens of the official pipeline: (2n, 16, D) as [R(0) x n; R(emb) x n], or (n, 16, D).

    ``face_embeddings`` (N, 512) are read by the Resampler as N tokens of one prompt.
    """
    emb = face_embeddings.reshape(1, -1, face_embeddings.shape[-1])
    if do_cfg:
        emb = torch.cat([torch.zeros_like(emb), emb])
    tokens = reference_resampler(image_proj, emb)
    return tokens.repeat_interleave(num_images, dim=0)


def reference_control_image(image, height: int | None = None, width: int | None = None,
                            vae_scale_factor: int = 8) -> Tensor:
    """Keypoint image -> (1, 3, H, W) float in [0, 1], as diffusers' ControlNet preprocessing.

    Sides are floored to multiples of ``vae_scale_factor`` (the image's own size when
    height/width are not given) and the image is Lanczos-resized only if the size changes.
    """
    from PIL import Image

    height = image.height if height is None else height
    width = image.width if width is None else width
    height -= height % vae_scale_factor
    width -= width % vae_scale_factor
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def reference_noise_prediction(
    unet, controlnet, instantid_state: Mapping[str, Mapping[str, Tensor]], *,
    latents: Tensor, timestep, scheduler, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor,
    time_ids: Tensor, face_embeddings: Tensor, control_image: Tensor,
    guidance_scale: float, ip_scale: float, conditioning_scale: float,
    id_tokens: Tensor | None = None,
) -> Tensor:
    """One step's guided noise prediction of the official basic InstantID pipeline.

    Shapes (n = images per prompt, CFG on when guidance_scale > 1 with halves [neg; pos],
    c = 2n under CFG, else n): latents (n, 4, h, w); prompt_embeds (c, L, D);
    pooled_prompt_embeds (c, P); time_ids (c, 6); face_embeddings (N, 512);
    control_image (1, 3, 8h, 8w) in [0, 1].
    ``conditioning_scale`` already includes the start/end keep flag. ``id_tokens`` (c, 16, D),
    if given, replaces the Resampler's output. Returns (n, 4, h, w).
    """
    n = latents.shape[0]
    do_cfg = guidance_scale > 1.0
    copies = 2 if do_cfg else 1
    if id_tokens is None:
        id_tokens = reference_id_tokens(instantid_state["image_proj"], face_embeddings, n, do_cfg)
    id_tokens = id_tokens.to(prompt_embeds.dtype)
    model_input = scheduler.scale_model_input(torch.cat([latents] * copies), timestep)
    added = {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids}
    down, mid = controlnet(
        model_input, timestep, encoder_hidden_states=id_tokens,
        controlnet_cond=control_image.to(controlnet.dtype).repeat(copies * n, 1, 1, 1),
        conditioning_scale=conditioning_scale, added_cond_kwargs=added,
        guess_mode=False, return_dict=False)
    with reference_unet(unet, instantid_state["ip_adapter"], ip_scale):
        noise = unet(model_input, timestep,
                     encoder_hidden_states=torch.cat([prompt_embeds, id_tokens], dim=1),
                     added_cond_kwargs=added, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0]
    if not do_cfg:
        return noise
    negative, positive = noise.chunk(2)
    return negative + guidance_scale * (positive - negative)


@torch.no_grad()
def reference_instantid_call(
    pipe, controlnet, instantid_state: Mapping[str, Mapping[str, Tensor]], *,
    prompt, face_embeddings: Tensor, keypoint_image, height: int, width: int,
    num_inference_steps: int, generator: torch.Generator, negative_prompt=None,
    num_images_per_prompt: int = 1, guidance_scale: float = 5.0, ip_scale: float = 0.8,
    conditioning_scale: float = 0.8, control_guidance_start: float = 0.0,
    control_guidance_end: float = 1.0, output_type: str = "np", resampler=None,
):
    """The official basic pipeline's whole call, restated for tests.

    Test support only: the backend never runs this; it is the stock algorithm the
    backend's baseline must equal bit for bit, written from the spec like the per-step
    ``reference_noise_prediction``. ``resampler`` maps (B, N, 512) to ID tokens; default
    the official math on ``instantid_state["image_proj"]``. Returns an object with
    ``.images`` (numpy (n, H, W, 3) or latents).
    """
    from types import SimpleNamespace

    device = torch.device("cpu")
    do_cfg = guidance_scale > 1.0
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt)
    if do_cfg:
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    rows = num_images_per_prompt
    control = reference_control_image(keypoint_image, height, width, pipe.vae_scale_factor)
    height, width = control.shape[-2:]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
    time_ids = time_ids.repeat(embeds.shape[0], 1)
    state = dict(instantid_state)
    if resampler is not None:  # the same official batch [0; emb], through another module
        emb = face_embeddings.reshape(1, -1, face_embeddings.shape[-1])
        emb = torch.cat([torch.zeros_like(emb), emb]) if do_cfg else emb
        tokens = resampler(emb).repeat_interleave(rows, dim=0)
        state["image_proj"] = None
    else:
        tokens = None
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    latents = pipe.prepare_latents(rows, pipe.unet.config.in_channels, height, width,
                                   embeds.dtype, device, generator)
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    total = len(timesteps)
    for i, t in enumerate(timesteps):  # the official loop, one step at a time
        keep = 0.0 if i / total < control_guidance_start or (i + 1) / total > control_guidance_end \
            else 1.0
        noise = reference_noise_prediction(
            pipe.unet, controlnet, state, latents=latents, timestep=t, scheduler=pipe.scheduler,
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, time_ids=time_ids,
            face_embeddings=face_embeddings, control_image=control,
            guidance_scale=guidance_scale, ip_scale=ip_scale,
            conditioning_scale=conditioning_scale * keep, id_tokens=tokens)
        latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
    if output_type == "latent":
        return SimpleNamespace(images=latents)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return SimpleNamespace(images=pipe.image_processor.postprocess(image, output_type=output_type))
