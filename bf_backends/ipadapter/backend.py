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
LoRA is masked per row (``bf_core.switching.RowMaskedLoRA``); per-call tensors (image embeds,
FaceID-Plus ``clip_embeds``) are cut per part and concatenated. Where that is not exact
(fused FaceID LoRA, biased IP projections, per-row IP masks) the loop makes one call per line.

The identity step (``encoder.IPAdapterIdentityEncoder``) prepares the image embeds from the
person's photos or diffusers' own arguments; every line's UNet call passes them. Everything
the call changes (processor scales, PEFT active adapters, FaceID-Plus ``clip_embeds`` /
``shortcut`` / ``shortcut_scale``, forward hooks) is captured when the session opens and
put back when the call ends, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from bf_backends.ipadapter.encoder import (
    DEFAULT_FACE_MODEL,
    FACE_CROP_CHANNELS,
    IPAdapterIdentityEncoder,
    is_faceid_plus_layer,
)
from bf_backends.ipadapter.state import (
    IPAdapterStateSnapshot,
    IPAdapterSwitches,
    detect_variants,
    faceid_adapter_names,
    image_projection_layers,
)
from bf_core.config import BFConfig
from bf_core.errors import CheckpointError, ConfigError, UnsupportedPipelineError
from bf_core.hosts import sdxl
from bf_core.hosts.sdxl import RowBatch, SDXLCall, SDXLModel, SDXLSession
from bf_core.records import Identity, Line, LineConditioning
from bf_core.switching import RowMaskedLoRA, lora_layer_row_maskable, row_mask

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
    **sdxl.ID_LINE_OPTIONS,
}


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Check the option values (the wrapper has already refused keywords that are no option)."""
    channels = options.get("face_crop_channels", "bgr")
    if channels not in FACE_CROP_CHANNELS:
        raise ConfigError(f"face_crop_channels must be one of {FACE_CROP_CHANNELS}, got {channels!r}.")
    return dict(options)


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


class IPAdapterSession(SDXLSession):
    """One call on a pipeline with diffusers' IP-Adapter loaded."""

    def __init__(self, backend: Any, call: SDXLCall, config: BFConfig):
        super().__init__(backend, call, config)
        self.options = check_options(self.request.backend_options)
        self.layers = image_projection_layers(self.pipe)
        if not self.layers:
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} has no IP-Adapter loaded: "
                                           f"{backend.recognizes_description}")
        self.variants = detect_variants(self.pipe)  # named errors for a mismatched image encoder
        self.encoder = IPAdapterIdentityEncoder(self)
        self.switches: IPAdapterSwitches | None = None
        self._faceid_row_mask: RowMaskedLoRA | None = None
        self._modules_row_switchable: bool | None = None

    # -- state -----------------------------------------------------------------------------
    def open(self, restore: ExitStack) -> None:
        # Captured before anything changes (the encoder sets FaceID-Plus clip_embeds);
        # restored when the call ends, also after an exception.
        restore.enter_context(IPAdapterStateSnapshot.capture(self.pipe))
        self.switches = IPAdapterSwitches(self.pipe)
        # By layer and adapter name: a layer that also carries the caller's own LoRA (a
        # style LoRA on the same projections) masks only its FaceID up-projection. Its
        # hooks go on at the first merged call and come off when the call ends.
        self._faceid_row_mask = RowMaskedLoRA(self.switches.faceid_layers,
                                              faceid_adapter_names(self.pipe))
        restore.callback(self._faceid_row_mask.close)

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        # Every line's UNet call gets image embeds (``line_identities``): the baseline's at the
        # caller's scales, the semantic line's (the first person's) with the IP branch
        # switched off, and each ID line its own person's.
        self.line_identities.note(line, identity)
        return super().conditioning(line, identity)

    @contextmanager
    def line_state(self, line: Line) -> Iterator[None]:
        """One line's rows: for the semantic line (when "off") IP scales 0, FaceID LoRA off."""
        if line is Line.SEMANTIC and self.config.semantic_adapters == "off":
            with self.switches.ip_scales_off(), self.switches.faceid_lora_off():
                yield
        else:
            yield

    def negative_shareable(self) -> bool:
        # Only with the identity machinery on for both lines do they run the same model.
        return self.config.semantic_adapters == "on"

    # -- both lines in one UNet call ---------------------------------------------------------
    def preview_face_analyzer(self):
        """FaceID's face analyser (the call's, else buffalo_l): ``region="auto"``'s detector."""
        return self.encoder.face_analyzer()

    def supports_row_batching(self, batch: RowBatch) -> bool:
        """Whether the lines merged in ``batch`` can share one UNet call, exactly switched per row.

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
        return all(_ip_masks_fit_any_batch(part.cross_attention_kwargs) for part in batch.parts)

    @contextmanager
    def rows_state(self, batch: RowBatch) -> Iterator[None]:
        """Semantic rows: IP tokens zeroed and FaceID LoRA masked off; ID rows: as the caller set.

        Each semantic row equals, bit for bit, the same merged call under the semantic line's
        state (IP scales 0, FaceID LoRA inactive), and each ID row the call under the ID
        line's state; the module state itself (scales, active adapters) is never changed.
        """
        if self.config.semantic_adapters == "on":
            yield  # every row runs the same model
            return
        identity_rows = row_mask(batch, (Line.ID, Line.BASELINE))
        with self.switches.ip_tokens_rows(identity_rows), self._faceid_row_mask.rows(identity_rows):
            yield

    # -- the UNet call -----------------------------------------------------------------------
    @contextmanager
    def _faceid_plus_rows(self, batch: RowBatch) -> Iterator[None]:
        """FaceID-Plus ``clip_embeds`` (module state) cut to the rows of ``batch``.

        A merged batch gets each part's rows concatenated, matching its image embeds row
        for row; the projection reads the whole tensor, so every row must be present.
        """
        plus_layers = [(k, layer) for k, layer in
                       enumerate(layer for layer in self.layers if is_faceid_plus_layer(layer))
                       if layer.clip_embeds is not None]
        saved = [layer.clip_embeds for _, layer in plus_layers]
        parts = batch.parts or (batch,)
        try:
            for (k, layer), current in zip(plus_layers, saved, strict=True):
                layer.clip_embeds = torch.cat([
                    cfg_rows(self._state_clip_embeds(part, k, current), part, self.request.do_cfg)
                    for part in parts])
            yield
        finally:
            for (_, layer), clip_embeds in zip(plus_layers, saved, strict=True):
                layer.clip_embeds = clip_embeds

    def _state_clip_embeds(self, part: RowBatch, k: int, current: torch.Tensor) -> torch.Tensor:
        """FaceID-Plus layer ``k``'s CLIP state for ``part``'s person (the module's own when
        the identity carries none)."""
        identity = self.line_identities.of(part)
        kept = identity.state.get("clip_embeds") if identity is not None else None
        return kept[k] if kept and kept[k] is not None else current

    def _image_embeds_for(self, batch: RowBatch) -> list[torch.Tensor]:
        """Per adapter, the image embeds of every row of ``batch``: each part its person's."""
        parts, do_cfg = batch.parts or (batch,), self.request.do_cfg
        per_part = []
        for part in parts:
            identity = self.line_identities.of(part)
            embeds = identity.state["image_embeds"] if identity is not None else []
            per_part.append([cfg_rows(tensor, part, do_cfg) for tensor in embeds])
        return [torch.cat(rows) if len(rows) > 1 else rows[0]
                for rows in zip(*per_part, strict=True)]

    def forward(self, batch: RowBatch, model: SDXLModel) -> torch.Tensor:
        """The UNet output for ``batch`` with the image embeds (and FaceID-Plus
        ``clip_embeds``) cut to its rows, under whatever line state is current."""
        image_embeds = self._image_embeds_for(batch)
        with self._faceid_plus_rows(batch):
            return model(batch, added_cond={"image_embeds": image_embeds})

    def predict(self, batch: RowBatch, model: SDXLModel) -> torch.Tensor:
        with self.rows_state(batch) if batch.parts else self.line_state(batch.line):
            return self.forward(batch, model)


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
    hosts = (sdxl.HOST_NAME,)
    options = OPTIONS
    #: each person's image embeds (and FaceID-Plus CLIP state) go to its own line's rows
    max_people = 4

    def __init__(self) -> None:
        self._analyzers: dict[tuple, Any] = {}

    def recognizes(self, pipe: Any) -> bool:
        if not sdxl.is_sdxl_pipeline(pipe) or not sdxl.has_ip_adapter(pipe):
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

    def open_session(self, call: SDXLCall, config: BFConfig) -> IPAdapterSession:
        return IPAdapterSession(self, call, config)

    def face_analyzer(self, model: str = DEFAULT_FACE_MODEL, root: str | None = None,
                      providers: Sequence[str] | None = None):
        """A ``FaceAnalyzer`` built once per (model, root, providers); no download."""
        from bf_core.faces import FaceAnalyzer

        key = (str(model), None if root is None else str(root),
               None if providers is None else tuple(providers))
        if key not in self._analyzers:
            self._analyzers[key] = FaceAnalyzer(model, root=root, providers=providers)
        return self._analyzers[key]


# -- the benchmark's view (BackendExtras) ------------------------------------------------------
def benchmark_call_kwargs(identity: Any, images: list) -> dict[str, Any]:
    """The identity's photos as ``id_images``, and its ``id_prompt`` (the IP-Adapter one,
    else the shared one) when it sets one; without it the backend's default P_id is used."""
    kwargs: dict[str, Any] = {"id_images": images}
    id_prompt = identity.option(IPAdapterBackend.name, "id_prompt", identity.id_prompt)
    if id_prompt:
        kwargs["id_prompt"] = id_prompt
    return kwargs
