"""The models behind the metrics, loaded once, from local paths or hub ids, or tiny and random.

Real models (users with weights or network access):
- DINO ViT-S/16: ``facebook/dino-vits16`` (transformers ``ViTModel``), CLS token.
- CLIP: ``openai/clip-vit-large-patch14`` by default (the paper does not name its CLIP;
  pass another id or folder to match a different report).
- Inception: the pytorch-fid ``pt_inception-2015-12-05-6726825d.pth`` file (a path).
- ArcFace: an insightface pack (``buffalo_l`` by default) through ``bf_core.faces``.

``tiny=True`` builds each of them from a small config with fixed random weights, and a
random insightface ONNX pack in ``cache_dir``: the numbers mean nothing, the code paths
are the real ones. Nothing here downloads unless a hub id is given and the hub is online.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bf_core.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_tensor(images: list, crop: int, resize: int, mean, std):
    """PIL images -> (N, 3, crop, crop) float32: shorter side to ``resize`` (bicubic),
    centre crop, then (x - mean) / std per channel."""
    import torch
    from PIL import Image

    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        size = (max(crop, round(image.width * scale)), max(crop, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
        arrays.append(np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def _seeded(build, seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _from_pretrained(cls, name: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise CheckpointError(
            f"could not load the {what} model {name!r} ({exc}). Give a local folder saved with "
            "save_pretrained, or a hub id with network access (HF_HUB_OFFLINE unset).") from exc


@dataclass
class MetricModels:
    """Where each metric model comes from, and a cache of the loaded ones."""

    dino: str = "facebook/dino-vits16"
    clip: str = "openai/clip-vit-large-patch14"
    inception: str | None = None
    face_model: str = "buffalo_l"
    face_root: str | None = None
    face_det_size: tuple[int, int] = (640, 640)
    device: str = "cpu"
    tiny: bool = False
    cache_dir: Path | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def _cached(self, key: str, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- DINO ---------------------------------------------------------------------------------
    def dino_model(self):
        """(model, crop, resize): a ViTModel whose CLS token is the DINO feature."""
        def build():
            from transformers import ViTConfig, ViTModel

            if self.tiny:
                config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, image_size=32, patch_size=8)
                model = _seeded(lambda: ViTModel(config, add_pooling_layer=False), 11)
            else:
                model = _from_pretrained(ViTModel, self.dino, "DINO", add_pooling_layer=False)
            crop = int(model.config.image_size)
            return model.to(self.device).eval(), crop, round(crop * 256 / 224)
        return self._cached("dino", build)

    # -- CLIP ---------------------------------------------------------------------------------
    def clip_model(self):
        """(model, tokenizer, crop)."""
        def build():
            from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

            if self.tiny:
                from bf_core.testing.tiny import tiny_tokenizer_folder

                tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer_folder()),
                                                          model_max_length=77)
                config = CLIPConfig(
                    text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=37,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=77,
                                     bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id),
                    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
                    projection_dim=16)
                model = _seeded(lambda: CLIPModel(config), 12)
            else:
                model = _from_pretrained(CLIPModel, self.clip, "CLIP")
                tokenizer = _from_pretrained(CLIPTokenizer, self.clip, "CLIP tokenizer")
            return model.to(self.device).eval(), tokenizer, int(model.config.vision_config.image_size)
        return self._cached("clip", build)

    # -- Inception ----------------------------------------------------------------------------
    def inception_model(self):
        def build():
            from benchmarks.metrics.inception import (
                FID_WEIGHTS_FILE,
                FIDInception,
                InceptionConfig,
                load_fid_inception,
            )

            if self.tiny:
                config = InceptionConfig(width=1 / 16, input_size=75)
                return _seeded(lambda: _signal_preserving(FIDInception(config)),
                               13).to(self.device).eval()
            if not self.inception:
                raise ConfigError(
                    "FID needs the Inception weights file: download "
                    f"{FID_WEIGHTS_FILE} from the pytorch-fid project's GitHub release and pass "
                    "its path (--inception-weights), or leave the fid metric out (--metrics)")
            return load_fid_inception(self.inception, self.device)
        return self._cached("inception", build)

    # -- faces --------------------------------------------------------------------------------
    def face_analyzer(self):
        def build():
            from bf_core.faces import FaceAnalyzer

            if self.tiny:
                pack = _tiny_face_pack(str(self.cache_dir or _default_cache()))
                return FaceAnalyzer(model=pack, det_size=(64, 64), providers=["CPUExecutionProvider"])
            return FaceAnalyzer(model=self.face_model, root=self.face_root, det_size=self.face_det_size)
        return self._cached("faces", build)


def _signal_preserving(model):
    """Re-draw conv weights with He scaling: torch's default init shrinks the signal at every
    layer, and through Inception's depth random features would vanish to ~1e-8."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def _default_cache() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / "beyondfacial-bench-tiny-models"


@functools.lru_cache(maxsize=4)
def _tiny_face_pack(folder: str) -> str:
    """A random insightface pack that finds faces in every image (bias +10), written once."""
    import os
    import shutil

    from bf_core.testing.faces import make_random_insightface_pack

    target = Path(folder) / "buffalo_l"
    if not target.is_dir():
        # Written aside and renamed into place: ranks starting together never read half a file.
        staging = Path(folder) / f"buffalo_l.{os.getpid()}.partial"
        make_random_insightface_pack(staging, seed=0, face_logit_bias=10.0)
        try:
            os.rename(staging, target)
        except OSError:  # another rank finished first; its files are identical
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
