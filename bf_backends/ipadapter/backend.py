"""The IP-Adapter backend on diffusers' own IP-Adapter (plain, plus, plus-face, FaceID,
FaceID-PlusV2, ViT-bigG ``ip-adapter_sdxl``).

Lines (decisions in ``docs/backends/ip-adapter.md``):

* Baseline (method off): the caller's prompt with the image embeds passed exactly as
  ``pipe(prompt, ip_adapter_image=...)`` (or ``ip_adapter_image_embeds=...``) passes them,
  at the caller's scales: the stock call bit for bit.
* ID line: ``P_id`` as text, the image embeds in every IP cross-attention layer at the
  caller's per-layer scales, the FaceID LoRA as the caller left it (on).
* Semantic line: the scene prompt, every IP processor's scale at 0 with the image embeds
  still passed (diffusers then skips the IP branch: bit-identical to no adapter), and the
  ``faceid_<i>`` LoRA adapters inactive; other LoRAs stay as they are.
  ``BFConfig(semantic_adapters="on")`` keeps both on.
* ``T_id``: the projected image tokens the IP branch attends to, (R, m * t, D) with D the
  UNet's cross-attention width (2048 for SDXL); the negative: the projection of the
  unconditional embeds. IdAP prepends their aggregate to the scene prompt's text tokens,
  the extension the paper anticipates for adapter methods.

Both lines in one UNet call (``BFConfig.batch_lines``): the semantic rows' projected image
tokens are zeroed by a hook on ``unet.encoder_hid_proj`` (zero tokens through bias-free
IP key/value projections give an exactly zero IP output, as scale 0 does) and the FaceID
LoRA is masked per row (``bf_core.rowbatch.RowMaskedLoRA``); per-call tensors (image embeds,
FaceID-Plus ``clip_embeds``) are cut per part and concatenated. Where that is not exact
(fused FaceID LoRA, biased IP projections, per-row IP masks) the loop makes one call per line.

Everything the session changes (processor scales, PEFT active adapters, FaceID-Plus
``clip_embeds`` / ``shortcut`` / ``shortcut_scale``, forward hooks) is captured on entry
and put back on exit, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from bf_backends.ipadapter.encoder import (
    FACE_CROP_CHANNELS,
    faceid_image_embeds,
    faceid_inputs,
    prepare_image_embeds,
    projected_id_tokens,
    set_faceid_plus_clip_embeds,
)
from bf_backends.ipadapter.state import (
    IPAdapterStateSnapshot,
    IPAdapterSwitches,
    detect_variants,
    faceid_adapter_names,
    image_projection_layers,
)
from bf_core.errors import CheckpointError, ConfigError, UnsupportedPipelineError
from bf_core.protocols import GenerationRequest, Identity, Line, RowBatch
from bf_core.rowbatch import RowMaskedLoRA, lora_layer_row_maskable, row_mask
from bf_core.sdxl import SDXLSession, has_ip_adapter, is_sdxl_pipeline

DEFAULT_FACE_MODEL = "buffalo_l"  # the pack the FaceID model cards use
DEFAULT_FACE_POLICY = "highest_score"  # the model cards take insightface's faces[0]

OPTIONS = {
    "ip_adapter_image": "diffusers' argument: one entry per loaded adapter (instead of id_images)",
    "ip_adapter_image_embeds": "diffusers' argument: one [negative; positive] tensor per adapter",
    "face_analyzer": "a bf_core.faces.FaceAnalyzer for FaceID (default: buffalo_l, built once)",
    "face_model": "insightface pack name or folder for FaceID (default 'buffalo_l')",
    "face_model_root": "insightface root folder",
    "face_providers": "onnxruntime execution providers",
    "face_policy": "'highest_score' (default, the model cards' faces[0]), 'largest' or 'error'",
    "shortcut": "FaceID-Plus: add the face tokens back (True, the default, is PlusV2)",
    "s_scale": "FaceID-PlusV2 shortcut scale, upstream's s_scale (default 1.0)",
    "face_crop_channels": "'bgr' (default, as the official scripts feed CLIP) or 'rgb'",
    "id_negative_prompt": "the ID line's negative prompt (default: the caller's)",
    "id_negative_prompt_2": "the ID line's second negative prompt",
}


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Refuse misspelt call options instead of silently ignoring them."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        listing = "\n".join(f"  {name}: {text}" for name, text in OPTIONS.items())
        raise ConfigError(f"unknown IP-Adapter option(s) {', '.join(unknown)}; accepted:\n{listing}")
    channels = options.get("face_crop_channels", "bgr")
    if channels not in FACE_CROP_CHANNELS:
        raise ConfigError(f"face_crop_channels must be one of {FACE_CROP_CHANNELS}, got {channels!r}.")
    return dict(options)


def _is_face_layer(layer) -> bool:
    from diffusers.models.embeddings import (
        IPAdapterFaceIDImageProjection,
        IPAdapterFaceIDPlusImageProjection,
    )

    return isinstance(layer, (IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection))


def _is_faceid_plus_layer(layer) -> bool:
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    return isinstance(layer, IPAdapterFaceIDPlusImageProjection)


def cfg_rows(tensor: torch.Tensor, batch: RowBatch, do_cfg: bool) -> torch.Tensor:
    """The rows of a CFG-stacked per-call tensor that ``batch`` evaluates.

    tensor: (2R, ...) ``[negative x R; positive x R]`` under CFG, else (R, ...). A batch of
    positive rows only (a shared negative branch, or CFG switched off by a callback) gets
    the positive half; any other batch must cover every row. A merged batch (both lines in
    one call) gets each of its parts' rows, in the order the parts were merged.
    """
    if batch.parts:
        return torch.cat([cfg_rows(tensor, part, do_cfg) for part in batch.parts])
    if tensor.shape[0] == batch.rows:
        return tensor
    if do_cfg and batch.branches == ("cond",) and tensor.shape[0] == 2 * batch.rows:
        return tensor[batch.rows:]
    raise ConfigError(f"image embeds of batch {tensor.shape[0]} do not fit a UNet batch of "
                      f"{batch.rows} rows ({'/'.join(batch.branches)}).")


class IPAdapterIdentityEncoder:
    """T_id: the session's image embeds through ``unet.encoder_hid_proj``."""

    def __init__(self, session: IPAdapterSession):
        self.session = session

    def encode(self, id_images: Sequence[Any] | None, id_prompt: str,
               request: GenerationRequest) -> Identity:
        """Identity tokens (R, m * t, D) and their unconditional counterpart.

        The embeds were prepared when the session opened (the baseline needs them too), from
        ``id_images`` or the diffusers-style options; ``id_images`` is not read again here.
        """
        embeds = self.session.image_embeds
        tokens = projected_id_tokens(self.session.pipe, embeds)  # (E, m * t, D)
        negative = None
        if request.do_cfg:
            negative, tokens = tokens.chunk(2)
        return Identity(tokens=tokens, negative_tokens=negative,
                        state={"image_embeds": embeds, "variants": self.session.variants})


class IPAdapterSession(SDXLSession):
    """One call on a pipeline with diffusers' IP-Adapter loaded."""

    def __init__(self, backend: Any, pipe: Any, request: GenerationRequest, config: Any):
        super().__init__(backend, pipe, request, config)
        self.options = check_options(request.backend_options)
        self.layers = image_projection_layers(pipe)
        if not self.layers:
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no IP-Adapter loaded: "
                                           f"{backend.recognizes_description}")
        self.variants = detect_variants(pipe)  # named errors for a mismatched image encoder
        self.encoder = IPAdapterIdentityEncoder(self)
        self.image_embeds: list[torch.Tensor] = []
        self.switches: IPAdapterSwitches | None = None
        self._faceid_row_mask: RowMaskedLoRA | None = None
        self._modules_row_switchable: bool | None = None

    # -- state -----------------------------------------------------------------------------
    def setup(self) -> None:
        # Captured before anything changes; restored on exit, also after an exception.
        self.restore_stack.enter_context(IPAdapterStateSnapshot.capture(self.pipe))
        self.switches = IPAdapterSwitches(self.pipe)
        self.image_embeds = self._prepare_image_embeds()

    def _identity_source(self) -> str:
        given = [name for name, value in (("id_images", self.request.id_images),
                                          ("ip_adapter_image", self.options.get("ip_adapter_image")),
                                          ("ip_adapter_image_embeds",
                                           self.options.get("ip_adapter_image_embeds")))
                 if value is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ConfigError(f"an IP-Adapter pipeline needs exactly one identity input: id_images "
                              f"(reference photos), ip_adapter_image or ip_adapter_image_embeds; "
                              f"got {what}.")
        return given[0]

    def _prepare_image_embeds(self) -> list[torch.Tensor]:
        """Per-adapter embeds as the UNet receives them: (2R, m, ...) under CFG, else (R, m, ...)."""
        source = self._identity_source()
        common = dict(num_images_per_prompt=self.request.num_rows,
                      do_classifier_free_guidance=self.request.do_cfg, device=self.request.device)
        if source == "ip_adapter_image_embeds":
            return prepare_image_embeds(self.pipe, image_embeds=self.options[source], **common)
        if source == "ip_adapter_image":
            return prepare_image_embeds(self.pipe, images=self.options[source], **common)
        if not any(_is_face_layer(layer) for layer in self.layers):
            from bf_core.images import load_images

            photos = load_images(self.request.id_images)
            # One adapter: every photo is a reference of it (diffusers' nested list).
            per_adapter = [photos] if len(self.layers) == 1 else photos
            return prepare_image_embeds(self.pipe, images=per_adapter, **common)
        if len(self.layers) != 1:
            raise ConfigError("several IP-Adapters with a FaceID one among them cannot be fed from "
                              "id_images; pass ip_adapter_image_embeds (one tensor per adapter), "
                              "and set FaceID-Plus clip_embeds as diffusers' recipe does.")
        return [self._faceid_embeds(self.layers[0], common)]

    def _faceid_embeds(self, layer, common: dict) -> torch.Tensor:
        """FaceID embeds from the reference photos; FaceID-Plus also gets its CLIP state."""
        plus = _is_faceid_plus_layer(layer)
        normed, crops = faceid_inputs(
            self._face_analyzer(), self.request.id_images,
            policy=self.options.get("face_policy", DEFAULT_FACE_POLICY), with_crops=plus,
            crop_channels=self.options.get("face_crop_channels", "bgr"))
        dtype = next(layer.parameters()).dtype
        stacked = faceid_image_embeds(normed, do_classifier_free_guidance=self.request.do_cfg,
                                      dtype=dtype, device=self.request.device)
        if plus:
            set_faceid_plus_clip_embeds(self.pipe, crops,
                                        shortcut=bool(self.options.get("shortcut", True)),
                                        shortcut_scale=float(self.options.get("s_scale", 1.0)),
                                        **common)
        return prepare_image_embeds(self.pipe, image_embeds=[stacked], **common)[0]

    def _face_analyzer(self):
        analyzer = self.options.get("face_analyzer")
        if analyzer is not None:
            return analyzer
        return self.backend.face_analyzer(self.options.get("face_model", DEFAULT_FACE_MODEL),
                                          self.options.get("face_model_root"),
                                          self.options.get("face_providers"))

    @contextmanager
    def line_state(self, line: Line) -> Iterator[None]:
        if line is Line.SEMANTIC and self.config.semantic_adapters == "off":
            with self.switches.ip_scales_off(), self.switches.faceid_lora_off():
                yield
        else:
            yield

    def negative_shareable(self) -> bool:
        # Only with the identity machinery on for both lines do they run the same model.
        return self.config.semantic_adapters == "on"

    # -- both lines in one UNet call ---------------------------------------------------------
    def supports_row_batching(self, batches: Sequence[RowBatch]) -> bool:
        """Whether the semantic and ID rows can share one UNet call, exactly switched per row.

        With ``semantic_adapters="on"`` every row runs the same model: always. Otherwise the
        IP attention is switched off per row by zero tokens (needs bias-free IP key/value
        projections) and the FaceID LoRA by a row mask on its up-projections (needs it
        unfused and not DoRA); IP-Adapter attention masks must have one batch row, which
        diffusers repeats to any batch. Anything else falls back to one call per line.
        """
        if self.config.semantic_adapters == "on":
            return True
        if self._modules_row_switchable is None:  # asked at every step; the modules stay put
            self._modules_row_switchable = self.switches.ip_keys_bias_free() and all(
                lora_layer_row_maskable(layer) for layer in self.switches.faceid_layers)
        if not self._modules_row_switchable:
            return False
        return all(_ip_masks_fit_any_batch(batch.cross_attention_kwargs) for batch in batches)

    @contextmanager
    def row_state(self, batch: RowBatch) -> Iterator[None]:
        """Semantic rows: IP tokens zeroed and FaceID LoRA masked off; ID rows: as the caller set.

        Each semantic row equals, bit for bit, the same merged call under the semantic line's
        state (IP scales 0, FaceID LoRA inactive), and each ID row the call under the ID
        line's state; the module state itself (scales, active adapters) is never changed.
        """
        if self.config.semantic_adapters == "on":
            yield  # every row runs the same model
            return
        identity_rows = row_mask(batch, (Line.ID, Line.BASELINE))
        if self._faceid_row_mask is None:  # hooked once per call, unhooked when it ends
            # By layer and adapter name: a layer that also carries the caller's own LoRA (a
            # style LoRA on the same projections) masks only its FaceID up-projection.
            self._faceid_row_mask = RowMaskedLoRA(self.switches.faceid_layers,
                                                  faceid_adapter_names(self.pipe))
            self.restore_stack.callback(self._faceid_row_mask.close)
        with self.switches.ip_tokens_rows(identity_rows), self._faceid_row_mask.rows(identity_rows):
            yield

    # -- the UNet call -----------------------------------------------------------------------
    def added_cond_kwargs(self, batch: RowBatch) -> dict[str, Any]:
        do_cfg = self.request.do_cfg
        return {"text_embeds": batch.text_embeds, "time_ids": batch.time_ids,
                "image_embeds": [cfg_rows(embeds, batch, do_cfg) for embeds in self.image_embeds]}

    @contextmanager
    def _faceid_plus_rows(self, batch: RowBatch) -> Iterator[None]:
        """FaceID-Plus ``clip_embeds`` (module state) cut to the rows of ``batch``.

        A merged batch gets each part's rows concatenated, matching its image embeds row
        for row; the projection reads the whole tensor, so every row must be present.
        """
        plus_layers = [layer for layer in self.layers
                       if _is_faceid_plus_layer(layer) and layer.clip_embeds is not None]
        saved = [layer.clip_embeds for layer in plus_layers]
        try:
            for layer in plus_layers:
                layer.clip_embeds = cfg_rows(layer.clip_embeds, batch, self.request.do_cfg)
            yield
        finally:
            for layer, clip_embeds in zip(plus_layers, saved, strict=True):
                layer.clip_embeds = clip_embeds

    def unet_forward(self, batch: RowBatch) -> torch.Tensor:
        with self._faceid_plus_rows(batch):
            return super().unet_forward(batch)


def _ip_masks_fit_any_batch(cross_attention_kwargs: dict[str, Any] | None) -> bool:
    """True when no ``ip_adapter_masks`` are given, or each has one batch row.

    diffusers repeats a one-row mask to the call's batch, and a zero IP output times any
    mask stays zero; a mask with one row per image of a line would not fit a merged batch.
    """
    masks = (cross_attention_kwargs or {}).get("ip_adapter_masks")
    if masks is None:
        return True
    if isinstance(masks, torch.Tensor):
        return False  # the deprecated stacked form: its layout is not worth guessing
    return all(mask is None or (isinstance(mask, torch.Tensor) and mask.shape[0] == 1)
               for mask in masks)


class IPAdapterBackend:
    """Identity from diffusers' IP-Adapter (CLIP image or insightface face embeddings)."""

    name = "ipadapter"
    recognizes_description = (
        "a diffusers StableDiffusionXLPipeline (no ControlNet) with an IP-Adapter loaded by "
        "pipe.load_ip_adapter: ip-adapter_sdxl, *_vit-h, plus, plus-face, faceid or "
        "faceid-plusv2; identity from id_images, ip_adapter_image or ip_adapter_image_embeds")
    priority = 20  # above DreamBooth; below InstantID, whose UNet carries IP processors too
    default_id_prompt = "a person"

    def __init__(self) -> None:
        self._analyzers: dict[tuple, Any] = {}

    def recognizes(self, pipe: Any) -> bool:
        if not is_sdxl_pipeline(pipe) or not has_ip_adapter(pipe):
            return False
        if getattr(pipe, "controlnet", None) is not None:
            return False  # ControlNet residuals (InstantID's IdentityNet) are not this backend's
        try:
            detect_variants(pipe)
        except CheckpointError:
            return True  # an adapter of ours with the wrong image encoder: say so at call time
        except ConfigError:
            return False  # a projection this backend does not serve
        return True

    def open_session(self, pipe: Any, request: GenerationRequest, config: Any) -> IPAdapterSession:
        return IPAdapterSession(self, pipe, request, config)

    def face_analyzer(self, model: str = DEFAULT_FACE_MODEL, root: str | None = None,
                      providers: Sequence[str] | None = None):
        """A ``FaceAnalyzer`` built once per (model, root, providers); no download."""
        from bf_core.faces import FaceAnalyzer

        key = (str(model), None if root is None else str(root),
               None if providers is None else tuple(providers))
        if key not in self._analyzers:
            self._analyzers[key] = FaceAnalyzer(model, root=root, providers=providers)
        return self._analyzers[key]
