"""PuLID's face features: reference photo -> ``id_cond`` (N, 1280) and five EVA hidden states.

Per reference image:

1. insightface ``antelopev2``: detect, choose the largest face, take its **raw** 512-d
   ArcFace ``embedding`` (not the normalised one);
2. align that face onto the FFHQ 512 x 512 template (5-point similarity transform, LMEDS,
   grey border), as facexlib's ``FaceRestoreHelper`` does;
3. parse the crop with a 19-class CelebAMask-HQ face parser (facexlib's BiSeNet) and
   whiten background, clothes, hat, ears, earrings, neck and necklace; every other pixel
   becomes the greyscale of the crop (0.299 R + 0.587 G + 0.114 B) on 3 channels;
4. bicubic resize to the tower's size **without antialiasing and without clamping** (what
   the pinned torchvision did), OpenAI CLIP normalisation, EVA02-CLIP in float32;
5. ``id_cond`` = [ArcFace (raw) ; CLIP embedding / its L2 norm], hidden states raw.

Decision (differs from the official code, documented in docs/backends/pulid.md): the face
is chosen once, by insightface, and its keypoints drive the alignment too. The official
pipeline runs a second detector (RetinaFace, most central face) for the alignment, so on a
photo with several people the ArcFace and CLIP features could come from different faces;
and where insightface finds no face it falls back to a lower-quality embedding, where we
raise ``FaceNotFoundError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bf_core.errors import ConfigError, MissingDependencyError
from bf_core.faces import FaceAnalyzer, select_face
from bf_core.images import load_image

#: facexlib's FFHQ landmark template for a 512 x 512 crop: eye centres, nose, mouth corners.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936],
                              [256.63416, 314.01935], [201.26117, 371.41043],
                              [313.08905, 371.15118]], dtype=np.float32)
ALIGNED_SIZE = 512
#: facexlib's border colour (135, 133, 132) is BGR; we warp RGB images.
BORDER_RGB = (132, 133, 135)
#: CelebAMask-HQ labels PuLID whitens: background, neck, neck_l, cloth, hat, l_ear, r_ear, ear_r.
REMOVED_FACE_LABELS = (0, 7, 8, 9, 14, 15, 16, 18)
PARSER_CLASSES = 19
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_WEIGHTS = (0.299, 0.587, 0.114)

#: (N, 3, 512, 512) ImageNet-normalised RGB -> (N, 19, 512, 512) logits (or a tuple whose
#: first entry is that, as facexlib's BiSeNet returns).
FaceParser = Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]]
#: (N, 3, S, S) CLIP-normalised pixels -> (embedding (N, E), five (N, tokens, width)).
VisionFeatures = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass
class FaceFeatures:
    """One reference image's PuLID inputs.

    id_cond: (1, 512 + E), [raw ArcFace ; unit-norm CLIP embedding], float32.
    vit_hidden: five (1, tokens, width) raw EVA hidden states, CLS first.
    aligned: (512, 512, 3) uint8 RGB aligned crop; clip_input: (3, 512, 512) float, the
        whitened grey face before resizing (both kept for inspection).
    """

    id_cond: torch.Tensor
    vit_hidden: list[torch.Tensor]
    aligned: np.ndarray
    clip_input: torch.Tensor


# ---------------------------------------------------------------- pure steps

def _import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise MissingDependencyError(
            "PuLID's face alignment needs OpenCV (cv2), which is not installed. Install "
            "pip install 'beyondfacial[faces]' (insightface brings opencv) or "
            "opencv-python-headless.") from exc
    return cv2


def align_ffhq(rgb: np.ndarray, kps: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 RGB + (5, 2) keypoints -> (size, size, 3) uint8 FFHQ-aligned crop.

    A 5-point similarity transform (OpenCV ``estimateAffinePartial2D``, LMEDS) onto the
    FFHQ template scaled to ``size``, bilinear ``warpAffine`` with facexlib's grey border.
    """
    cv2 = _import_cv2()
    kps = np.asarray(kps, dtype=np.float32).reshape(5, 2)
    template = FFHQ_TEMPLATE_512 * (size / ALIGNED_SIZE)
    matrix, _ = cv2.estimateAffinePartial2D(kps, template, method=cv2.LMEDS)
    if matrix is None:
        raise ConfigError("the face keypoints are degenerate (no similarity transform maps "
                          "them onto the FFHQ template); use a clearer, frontal photo.")
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (size, size),
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)


def to_unit_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 3, H, W) -> (x - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


@torch.no_grad()
def parse_face(parser: FaceParser, crop: torch.Tensor) -> torch.Tensor:
    """crop (N, 3, H, W) in [0, 1] -> labels (N, H, W) int64, argmax of the parser's logits."""
    param = next(iter(getattr(parser, "parameters", lambda: iter(()))()), None)
    inputs = normalise(crop, IMAGENET_MEAN, IMAGENET_STD)
    if param is not None:
        inputs = inputs.to(param.device, param.dtype)
    logits = parser(inputs)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]  # BiSeNet returns (main, aux16, aux32)
    if logits.ndim != 4 or logits.shape[1] != PARSER_CLASSES:
        raise ConfigError(f"the face parser must return (N, {PARSER_CLASSES}, H, W) logits "
                          f"(CelebAMask-HQ classes), got {tuple(logits.shape)}.")
    return logits.argmax(dim=1).to(crop.device)


def whitened_grey_face(crop: torch.Tensor, labels: torch.Tensor,
                       removed: Sequence[int] = REMOVED_FACE_LABELS) -> torch.Tensor:
    """crop (N, 3, H, W) in [0, 1], labels (N, H, W) -> (N, 3, H, W) PuLID's CLIP input.

    Removed labels are pure white (1.0); elsewhere the greyscale of the un-normalised crop
    copied to three channels.
    """
    r, g, b = crop[:, 0:1], crop[:, 1:2], crop[:, 2:3]
    grey = (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).repeat(1, 3, 1, 1)
    background = torch.zeros_like(labels, dtype=torch.bool)
    for label in removed:
        background |= labels == label
    return torch.where(background[:, None], torch.ones_like(grey), grey)


def clip_pixels(face: torch.Tensor, size: int, mean: Sequence[float] = (0.48145466, 0.4578275,
                                                                        0.40821073),
                std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): bicubic, no antialias, no clamp, CLIP-normalised.

    Antialias off on purpose: the official code ran under torchvision 0.15, whose tensor
    resize did not antialias; newer torchvision defaults would change the features.
    """
    resized = F.interpolate(face, size=(size, size), mode="bicubic", align_corners=False,
                            antialias=False)
    return normalise(resized, mean, std)


def id_condition(arcface: torch.Tensor, clip_embedding: torch.Tensor) -> torch.Tensor:
    """(N, 512) raw ArcFace + (N, E) CLIP -> (N, 512 + E): ArcFace first, CLIP L2-normalised."""
    unit = clip_embedding / torch.norm(clip_embedding, 2, 1, True)
    return torch.cat([arcface.to(unit.dtype), unit], dim=-1)


# ---------------------------------------------------------------- the extractor

class PuLIDFaceFeatures:
    """Reference image -> :class:`FaceFeatures`, with the three models PuLID needs.

    analyzer: an insightface ``FaceAnalyzer`` (``antelopev2`` for the official weights).
    parser: a 19-class face parser (see :func:`load_bisenet_parser`).
    vision: the EVA-CLIP tower as :class:`bf_backends.pulid.eva.EVAFeatures` (or any
        callable with its signature and an ``image_size`` attribute).
    face_policy: which face of a multi-face photo to use ("largest" as officially).
    """

    def __init__(self, analyzer: FaceAnalyzer, parser: FaceParser, vision: VisionFeatures, *,
                 face_policy: str = "largest") -> None:
        self.analyzer = analyzer
        self.parser = parser
        self.vision = vision
        self.face_policy = face_policy

    @property
    def image_size(self) -> int:
        return int(getattr(self.vision, "image_size", 336))

    @torch.no_grad()
    def __call__(self, image, index: int | None = None) -> FaceFeatures:
        rgb_image = load_image(image, index=index)
        faces = self.analyzer.detect(rgb_image, index=index)
        label = "reference image" if index is None else f"reference image {index}"
        face = select_face(faces, self.face_policy, index, image_label=label)
        aligned = align_ffhq(np.asarray(rgb_image), face.kps)
        crop = to_unit_tensor(aligned)
        labels = parse_face(self.parser, crop)
        clip_input = whitened_grey_face(crop, labels)
        device, dtype = _module_place(self.vision)
        embedding, hidden = self.vision(clip_pixels(clip_input, self.image_size).to(device, dtype))
        arcface = torch.from_numpy(face.embedding).reshape(1, -1)
        id_cond = id_condition(arcface.to(embedding.device, torch.float32), embedding.float())
        return FaceFeatures(id_cond, [h.float() for h in hidden], aligned, clip_input[0])


def _module_place(module) -> tuple[torch.device, torch.dtype]:
    params = getattr(module, "parameters", None)
    param = next(iter(params()), None) if params is not None else None
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def load_bisenet_parser(weights: str | os.PathLike,
                        device: torch.device | str | None = None) -> torch.nn.Module:
    """facexlib's BiSeNet face parser loaded strictly from ``parsing_bisenet.pth``.

    The file is facexlib's release v0.2.0 asset; it is read with
    ``torch.load(weights_only=True)``, never downloaded.
    """
    try:
        from facexlib.parsing.bisenet import BiSeNet
    except ImportError as exc:
        raise MissingDependencyError(
            f"PuLID's face parsing uses facexlib's BiSeNet, which could not be imported "
            f"({exc}). Install the PuLID extra: pip install 'beyondfacial[pulid]' (facexlib "
            "also needs a torchvision matching your torch).") from exc
    from bf_core.checkpoints import load_state_dict_file, load_strict

    parser = BiSeNet(num_class=PARSER_CLASSES)
    load_strict(parser, load_state_dict_file(weights), "BiSeNet face parser (parsing_bisenet.pth)")
    return parser.to(device).eval()
