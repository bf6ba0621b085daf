"""The built-in metrics: the paper's five and the close-up measures, as one plugin.

Paper (Table 1): Face sim (ArcFace cosine, reference vs generated face), DINO and CLIP-I
(image similarity to the reference photos), CLIP-T (prompt vs image), FID (Inception
pool3 against a reference set). Ours: face detection rate, face-box area as a fraction of
the frame, face-box height relative to the image height: the measures of the claim that
the method turns close-ups into whole people in scenes. All in percent.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from bf_core.hookspecs import hookimpl


def cosine_percent(a: np.ndarray, b: np.ndarray) -> float:
    """100 x cosine similarity of two vectors (d,)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(100.0 * (a @ b) / denominator) if denominator > 0 else 0.0


def mean_cosine_percent(query: np.ndarray, references: list[np.ndarray]) -> float | None:
    """Mean of ``cosine_percent(query, r)`` over the reference vectors; None without any."""
    if not references:
        return None
    return float(np.mean([cosine_percent(query, r) for r in references]))


def box_fractions(bbox, width: int, height: int) -> tuple[float, float]:
    """(area %, height %) of a face box x1, y1, x2, y2 clipped to a width x height image."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, x2 = np.clip([x1, x2], 0, width)
    y1, y2 = np.clip([y1, y2], 0, height)
    box_w, box_h = max(0.0, x2 - x1), max(0.0, y2 - y1)
    return 100.0 * box_w * box_h / (width * height), 100.0 * box_h / height


def largest_face(analyzer: Any, image: Any):
    """The largest face of ``image`` by box area, embedded; None when none is found.

    analyzer: a ``bf_core.faces.FaceAnalyzer``; image: PIL RGB. Returns a
    ``bf_core.faces.Face``. The detector keeps only its largest box (insightface's
    ``max_num=1`` with the ``"max"`` metric) before the recogniser runs, so one face is
    embedded where ``analyzer.detect`` embeds every candidate: same box, same embedding,
    a fraction of the work when a busy image (or a random test detector) yields many.
    """
    bgr = _bgr(image)
    app = analyzer.app
    boxes, keypoints = app.det_model.detect(bgr, max_num=1, metric="max")
    if boxes.shape[0] == 0:
        return None
    return _embedded_face(app, bgr, boxes[0], None if keypoints is None else keypoints[0])


def largest_faces(analyzer: Any, image: Any, limit: int) -> tuple[int, list]:
    """(how many faces ``image`` holds, the ``limit`` largest of them embedded).

    The count is every detection after the detector's own score threshold and NMS; only
    the largest ``limit`` boxes (by area, largest first) go through the recogniser, for
    the reason ``largest_face`` gives. Returns ``bf_core.faces.Face`` objects.
    """
    bgr = _bgr(image)
    app = analyzer.app
    boxes, keypoints = app.det_model.detect(bgr, max_num=0, metric="max")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas, kind="stable")[:limit]
    return int(boxes.shape[0]), [
        _embedded_face(app, bgr, boxes[k], None if keypoints is None else keypoints[k])
        for k in order]


def _bgr(image: Any) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8 BGR, the order insightface reads."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def _embedded_face(app: Any, bgr: np.ndarray, box: np.ndarray, kps: np.ndarray | None):
    """One detection (box row x1, y1, x2, y2, score; its 5 keypoints) embedded as a
    ``bf_core.faces.Face``: aligned on the keypoints and run through the recogniser."""
    from insightface.app.common import Face as DetectedFace

    from bf_core.faces import Face

    found = DetectedFace(bbox=box[:4], kps=kps, det_score=box[4])
    app.models["recognition"].get(bgr, found)  # aligns on the keypoints, sets .embedding
    embedding = np.asarray(found.embedding, np.float32).reshape(-1)
    norm = float(np.linalg.norm(embedding))
    return Face(bbox=np.asarray(found.bbox, np.float32).reshape(4).copy(),
                kps=np.asarray(found.kps, np.float32).reshape(5, 2).copy(),
                det_score=float(found.det_score), embedding=embedding,
                normed_embedding=embedding / norm if norm > 0 else embedding.copy())


def reference_face_embeddings(images: list, analyzer: Any) -> list[np.ndarray]:
    """The normed ArcFace embedding (512,) of the largest face of each reference photo;
    photos without a face are skipped, and a warning says when none had one."""
    embeddings = []
    for image in images:
        face = largest_face(analyzer, image)
        if face is not None:
            embeddings.append(face.normed_embedding)
    if not embeddings:
        warnings.warn("no face was found in any reference photo of an identity: its face "
                      "similarity is left empty; use clearer, frontal reference photos",
                      stacklevel=3)
    return embeddings


class ReferenceCache:
    """Reference-photo features per identity, computed once per run."""

    def __init__(self):
        self._features: dict[str, list[np.ndarray]] = {}

    def get(self, identity: Any, compute) -> list[np.ndarray]:
        if identity.name not in self._features:
            self._features[identity.name] = compute(identity.load_images())
        return self._features[identity.name]


class FaceMetric:
    """ArcFace similarity and the close-up measures from one face detection per image.

    The largest detected face is the person's. face_sim: mean cosine to the faces of the
    reference photos (None when no face is found; see face_detected). face_detected: 100
    or 0 (its mean is the detection rate). face_area_fraction, face_box_height: 0 when
    no face is found, so that a missing face counts as no close-up.
    """

    name = "face"
    kind = "image"
    columns = ("face_sim", "face_detected", "face_area_fraction", "face_box_height")
    labels = {"face_sim": "Face sim", "face_detected": "Face found %",
              "face_area_fraction": "Face area %", "face_box_height": "Face height %"}
    higher_is_better = {"face_sim": True, "face_detected": True, "face_area_fraction": False,
                        "face_box_height": False}

    def __init__(self):
        self._references = ReferenceCache()

    def score(self, sample, context) -> dict[str, float | None]:
        analyzer = context.models.face_analyzer()
        face = largest_face(analyzer, sample.image)
        if face is None:
            return {"face_sim": None, "face_detected": 0.0, "face_area_fraction": 0.0,
                    "face_box_height": 0.0}
        area, height = box_fractions(face.bbox, *sample.image.size)
        references = self._references.get(
            sample.identity, lambda images: reference_face_embeddings(images, analyzer))
        return {"face_sim": mean_cosine_percent(face.normed_embedding, references),
                "face_detected": 100.0, "face_area_fraction": area, "face_box_height": height}


def _dino_features(images: list, models) -> list[np.ndarray]:
    import torch

    model, crop, resize = models.dino_model()
    pixels = _image_batch(images, crop, resize, "dino").to(models.device)
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    return list(cls.float().cpu().numpy())


def _clip_image_features(images: list, models) -> list[np.ndarray]:
    import torch

    model, _, crop = models.clip_model()
    pixels = _image_batch(images, crop, crop, "clip").to(models.device)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        features = model.visual_projection(pooled)
    return list(features.float().cpu().numpy())


def _clip_text_features(texts: list[str], models) -> list[np.ndarray]:
    import torch

    model, tokenizer, _ = models.clip_model()
    tokens = tokenizer(texts, padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(input_ids=tokens.input_ids.to(models.device),
                                  attention_mask=tokens.attention_mask.to(models.device)).pooler_output
        features = model.text_projection(pooled)
    return list(features.float().cpu().numpy())


def _image_batch(images: list, crop: int, resize: int, kind: str):
    from benchmarks.metrics.models import (
        CLIP_MEAN,
        CLIP_STD,
        IMAGENET_MEAN,
        IMAGENET_STD,
        image_tensor,
    )

    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    return image_tensor(images, crop, resize, mean, std)


class _ReferenceSimilarity:
    """Mean cosine (percent) between the generated image's features and each reference
    photo's; the references' features are computed once per identity."""

    kind = "image"

    def __init__(self):
        self._references = ReferenceCache()

    @staticmethod
    def extract(images: list, models) -> list[np.ndarray]:
        raise NotImplementedError

    def score(self, sample, context) -> dict[str, float | None]:
        references = self._references.get(
            sample.identity, lambda images: self.extract(images, context.models))
        (feature,) = self.extract([sample.image], context.models)
        return {self.name: mean_cosine_percent(feature, references)}


class DinoMetric(_ReferenceSimilarity):
    """DINO ViT-S/16 CLS-token cosine between the generated image and each reference photo."""

    name = "dino"
    columns = ("dino",)
    labels = {"dino": "DINO"}
    higher_is_better = {"dino": True}
    extract = staticmethod(_dino_features)


class ClipImageMetric(_ReferenceSimilarity):
    """CLIP-I: CLIP image-embedding cosine between the generated image and each reference."""

    name = "clip_i"
    columns = ("clip_i",)
    labels = {"clip_i": "CLIP-I"}
    higher_is_better = {"clip_i": True}
    extract = staticmethod(_clip_image_features)


class ClipTextMetric:
    """CLIP-T: CLIP cosine between the scene prompt and the generated image."""

    name = "clip_t"
    kind = "image"
    columns = ("clip_t",)
    labels = {"clip_t": "CLIP-T"}
    higher_is_better = {"clip_t": True}

    def score(self, sample, context) -> dict[str, float | None]:
        (image,) = _clip_image_features([sample.image], context.models)
        (text,) = _clip_text_features([sample.prompt], context.models)
        return {"clip_t": cosine_percent(image, text)}


class FidMetric:
    """FID: Frechet distance of Inception pool3 features, generated set vs reference set."""

    name = "fid"
    kind = "set"
    columns = ("fid",)
    labels = {"fid": "FID"}
    higher_is_better = {"fid": False}

    def features(self, sample, context) -> np.ndarray:
        import torch

        model = context.models.inception_model()
        rgb = np.asarray(sample.image.convert("RGB"), np.float32) / 255.0
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(context.models.device)
        with torch.no_grad():
            return model(pixels)[0].float().cpu().numpy()

    def score_set(self, generated: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
        from benchmarks.metrics.fid import fid_from_features

        if len(generated) < 2 or len(reference) < 2:
            return {"fid": None}  # a covariance needs two images at least
        return {"fid": fid_from_features(generated, reference)}


def builtin_metrics() -> list[Any]:
    return [FaceMetric(), DinoMetric(), ClipImageMetric(), ClipTextMetric(), FidMetric()]


@hookimpl
def bf_register_metrics(register):
    for metric in builtin_metrics():
        register(metric)
