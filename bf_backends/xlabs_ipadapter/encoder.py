"""The XLabs IP-Adapter's identity step: a person's photos -> CLIP image embeds and T_id.

Embeds are made exactly as ``FluxPipeline.__call__`` makes them, through the pipeline's own
``prepare_ip_adapter_image_embeds`` (so the baseline equals ``pipe(prompt,
ip_adapter_image=...)``): one tensor per loaded adapter, (R, m, E) with R = prompts x images
per prompt, m reference images and E the CLIP ``image_embeds`` width (768). The negative
embeds of true CFG are the stock ones: the caller's ``negative_ip_adapter_image(_embeds)``,
else a black ``np.zeros((width, height, 3))`` image per adapter.

T_id = ``transformer.encoder_hid_proj(embeds)``: 4 tokens per image of width
``joint_attention_dim`` (4096), the tokens the IP attention reads, laid side by side.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from bf_core.errors import ConfigError
from bf_core.records import GenerationRequest, Identity, Person


class EncoderSession(Protocol):
    """What the identity step reads from its session (``backend.XLabsIPAdapterSession``)."""

    backend: Any  # default_id_prompt
    pipe: Any
    call: Any  # the FluxCall: its arguments, height and width
    request: GenerationRequest


def num_adapters(transformer: Any) -> int:
    return int(transformer.encoder_hid_proj.num_ip_adapters)


def projected_tokens(transformer: Any, embeds: list[torch.Tensor]) -> torch.Tensor:
    """The image tokens the IP attention reads: per adapter (R, m, E) -> (R, m * t, D),
    all adapters' tokens following each other in load order."""
    projected = transformer.encoder_hid_proj(list(embeds))  # [(R, m, t, D)]
    return torch.cat([tokens.flatten(1, 2) for tokens in projected], dim=1)


def check_image_embeds(transformer: Any, embeds: Any, name: str) -> list[torch.Tensor]:
    """Precomputed embeds as ``FluxPipeline`` takes them: a list, one (1, m, E) tensor per
    loaded adapter (the pipeline repeats them for every row itself)."""
    layers = transformer.encoder_hid_proj.image_projection_layers
    if not isinstance(embeds, (list, tuple)):
        embeds = [embeds]
    if len(embeds) != len(layers):
        raise ConfigError(f"{name} has {len(embeds)} tensor(s) for {len(layers)} loaded "
                          "IP-Adapter(s); pass one per adapter.")
    for index, (tensor, layer) in enumerate(zip(embeds, layers, strict=True)):
        width = int(layer.image_embeds.in_features)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 1 \
                or tensor.shape[-1] != width:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ConfigError(f"{name}[{index}] is {shape}; adapter {index} reads CLIP image_embeds "
                              f"shaped (1, num_images, {width}).")
    return list(embeds)


class XLabsIdentityEncoder:
    """A person -> per-adapter image embeds (and their negative) and T_id.

    The identity comes from exactly one of the person's ``id_images`` and the pipeline's own
    ``ip_adapter_image`` / ``ip_adapter_image_embeds`` call arguments.
    """

    def __init__(self, session: EncoderSession):
        self.session = session
        self._negative: list[torch.Tensor] | None = None

    def encode(self, person: Person) -> Identity:
        """``tokens`` (R, m * 4, D); ``negative_tokens`` the negative embeds' projection (true
        CFG only); ``state``: ``image_embeds`` and ``negative_image_embeds`` (None without
        true CFG), per adapter (R, m, E), which every line's transformer call reads."""
        session = self.session
        transformer = session.pipe.transformer
        embeds = self.image_embeds(person)
        tokens = projected_tokens(transformer, embeds)
        negative = negative_tokens = None
        if session.request.do_cfg:
            negative = self.negative_image_embeds()
            negative_tokens = projected_tokens(transformer, negative)
        return Identity(person.id_prompt or session.backend.default_id_prompt, tokens,
                        negative_tokens, state={"image_embeds": embeds,
                                                "negative_image_embeds": negative})

    def identity_source(self, person: Person) -> str:
        """The one identity input given: ``id_images``, ``ip_adapter_image`` or
        ``ip_adapter_image_embeds``."""
        arguments = self.session.call.arguments
        given = [name for name, value in (("id_images", person.id_images),
                                          ("ip_adapter_image", arguments.ip_adapter_image),
                                          ("ip_adapter_image_embeds",
                                           arguments.ip_adapter_image_embeds))
                 if value is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ConfigError("the XLabs IP-Adapter needs exactly one identity input: id_images "
                              "(reference photos), ip_adapter_image or ip_adapter_image_embeds; "
                              f"got {what}.")
        return given[0]

    def image_embeds(self, person: Person) -> list[torch.Tensor]:
        """Per adapter (R, m, E), as ``pipe(..., ip_adapter_image=...)`` computes them."""
        session = self.session
        arguments, transformer = session.call.arguments, session.pipe.transformer
        source = self.identity_source(person)
        if source == "ip_adapter_image_embeds":
            given = check_image_embeds(transformer, arguments.ip_adapter_image_embeds, source)
            return self._prepare(None, given)
        if source == "ip_adapter_image":
            return self._prepare(arguments.ip_adapter_image, None)
        if num_adapters(transformer) != 1:
            raise ConfigError(f"{num_adapters(transformer)} IP-Adapters are loaded; give "
                              "ip_adapter_image (one entry per adapter) instead of id_images.")
        from bf_core.images import load_images

        return self._prepare([load_images(person.id_images)], None)  # all photos: one adapter

    def negative_image_embeds(self) -> list[torch.Tensor]:
        """The stock negative of true CFG: the caller's, else one black image per adapter;
        the same for every person, made once per call."""
        if self._negative is None:
            import numpy as np

            session = self.session
            arguments, transformer = session.call.arguments, session.pipe.transformer
            if arguments.negative_ip_adapter_image_embeds is not None:
                given = check_image_embeds(transformer, arguments.negative_ip_adapter_image_embeds,
                                           "negative_ip_adapter_image_embeds")
                self._negative = self._prepare(None, given)
            else:
                images = arguments.negative_ip_adapter_image
                if images is None:  # (width, height) as the stock call writes it
                    black = np.zeros((session.call.width, session.call.height, 3), dtype=np.uint8)
                    images = [black] * num_adapters(transformer)
                self._negative = self._prepare(images, None)
        return self._negative

    def _prepare(self, images: Any, embeds: list[torch.Tensor] | None) -> list[torch.Tensor]:
        session = self.session
        if embeds is None and getattr(session.pipe, "image_encoder", None) is None:
            raise ConfigError("the pipeline has no image_encoder, so photos cannot be encoded; "
                              "load the adapter with image_encoder_pretrained_model_name_or_path "
                              "(openai/clip-vit-large-patch14), or pass ip_adapter_image_embeds.")
        request = session.request
        return session.pipe.prepare_ip_adapter_image_embeds(images, embeds, request.device,
                                                            request.num_rows)
