"""Face detection, choice and embedding over insightface, shared by the face backends.

PhotoMaker V2 and IP-Adapter FaceID use insightface's ``buffalo_l`` pack, InstantID and
PuLID ``antelopev2``. All four run the same steps: detect faces on the BGR image, choose
one, align it to the ArcFace template with ``norm_crop`` and embed it. This module does
exactly that with insightface's own code, so embeddings match the official scripts.

insightface and onnxruntime are optional (the ``beyondfacial[faces]`` extra) and are
imported only when a ``FaceAnalyzer`` is first used. No code path here downloads: the
model folder is located and checked before insightface sees it, and a missing pack is a
``FaceModelsNotFoundError`` that lists the files and where to put them.

insightface 0.7.x and 2.x: both are supported. The analyser always passes an absolute
model folder (both versions then skip their download) and an explicit ``det_size``
(2.x would otherwise detect at two sizes, 128 and 640, and merge the candidates).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bf_core.errors import (
    CheckpointError,
    ConfigError,
    FaceNotFoundError,
    MissingDependencyError,
    MultipleFacesError,
)
from bf_core.images import load_image

FACE_POLICIES = ("largest", "highest_score", "error")
# Detection sizes the official PhotoMaker V2 scripts try in turn until a face is found.
PHOTOMAKER_RETRY_DET_SIZES = tuple((s, s) for s in (640, 576, 512, 448, 384, 320, 256))


@dataclass(frozen=True)
class FaceModelPack:
    """File names of one insightface model pack and where it can be obtained."""

    detector: str
    recognizer: str
    unused: tuple[str, ...]
    source: str


FACE_MODEL_PACKS = {
    "buffalo_l": FaceModelPack(
        detector="det_10g.onnx",
        recognizer="w600k_r50.onnx",
        unused=("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
        source="buffalo_l.zip from insightface's 'model-zoo' GitHub release",
    ),
    "antelopev2": FaceModelPack(
        detector="scrfd_10g_bnkps.onnx",
        recognizer="glintr100.onnx",
        unused=("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
        source=("the antelopev2 pack linked from the insightface and InstantID READMEs "
                "(also mirrored on the Hugging Face hub as DIAMONIK7777/antelopev2)"),
    ),
}


class FaceModelsNotFoundError(CheckpointError, FileNotFoundError):
    """The insightface model files are not on disk; the message lists what goes where."""


class MultipleFacesWarning(UserWarning):
    """A reference image held several faces and one was chosen by the face policy."""


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in pixel coordinates of the analysed image.

    bbox: (4,) float32 x1, y1, x2, y2. kps: (5, 2) float32 eye centres (left and right
    in the image), nose tip, mouth corners. embedding: (512,) float32, the raw ArcFace
    output (PhotoMaker V2, InstantID and PuLID use this one). normed_embedding: (512,)
    the same divided by its L2 norm (IP-Adapter FaceID uses this one).
    """

    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    embedding: np.ndarray
    normed_embedding: np.ndarray = field(repr=False)

    @property
    def area(self) -> float:
        """Box area (x2 - x1) * (y2 - y1), the key of the ``largest`` policy."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return (x2 - x1) * (y2 - y1)


class FaceAnalyzer:
    """Lazily built insightface ``FaceAnalysis`` with detection and recognition only.

    model: a pack name (``"buffalo_l"``, ``"antelopev2"``) or the path of a folder that
    holds the pack's ``.onnx`` files. root: where to look for the pack: a folder holding
    the ``.onnx`` files itself, or an insightface root with ``models/<model>/`` inside
    (the official InstantID scripts use root ``./``); default ``~/.insightface``.
    providers: onnxruntime execution providers; default CUDA when available, then CPU.
    det_size: detector input (width, height); det_thresh: minimum detection score.
    retry_det_sizes: further sizes tried in turn when nothing is found at ``det_size``
    (``PHOTOMAKER_RETRY_DET_SIZES`` reproduces PhotoMaker V2's scripts, except that the
    official code starts the next image at the size that worked for the previous one;
    this analyser always starts at ``det_size``).
    """

    def __init__(
        self,
        model: str | os.PathLike = "buffalo_l",
        root: str | os.PathLike | None = None,
        providers: Sequence[Any] | None = None,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        retry_det_sizes: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.model = model
        self.root = root
        self.providers = None if providers is None else list(providers)
        self.det_size = _check_size(det_size, "det_size")
        self.retry_det_sizes = tuple(_check_size(s, "retry_det_sizes") for s in retry_det_sizes)
        if not 0.0 < det_thresh < 1.0:
            raise ConfigError(f"det_thresh must lie in (0, 1), got {det_thresh}; insightface "
                              "and the official scripts use 0.5.")
        self.det_thresh = float(det_thresh)
        self._app = None

    @property
    def model_dir(self) -> Path:
        """The folder the ``.onnx`` files are loaded from (checked, nothing downloaded)."""
        return resolve_model_dir(self.model, self.root)

    @property
    def app(self):
        """The underlying insightface ``FaceAnalysis``, built on first access."""
        if self._app is None:
            self._app = _build_face_analysis(self.model_dir, self.providers,
                                             self.det_size, self.det_thresh)
        return self._app

    def detect(self, image: Any, *, index: int | None = None) -> list[Face]:
        """All faces in ``image`` (anything ``load_image`` accepts), highest score first.

        The order is insightface's: descending detection score after NMS. Coordinates
        refer to the image as given (after its EXIF rotation). ``index`` only labels
        errors.
        """
        bgr = _bgr_array(load_image(image, index=index))
        app = self.app
        found = list(app.get(bgr))  # the detector was prepared at det_size
        for size in self.retry_det_sizes:
            if found:
                break
            found = _detect_at_size(app, bgr, size)
        if found:
            return [_to_face(f) for f in found]
        return []

    def embed(self, images: Any, policy: str = "largest") -> list[Face]:
        """One chosen face per reference image (a single image or a list).

        Raises ``FaceNotFoundError`` naming the first image without a face, and, with
        policy ``"error"``, ``MultipleFacesError`` for an image with several.
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise FaceNotFoundError("no reference images were given; pass at least one "
                                    "photo with a clearly visible face.")
        chosen = []
        for index, item in enumerate(items):
            faces = self.detect(item, index=index)
            chosen.append(select_face(faces, policy, index, image_label=_label(item, index)))
        return chosen


def select_face(
    faces: Sequence[Face],
    policy: str = "largest",
    image_index: int | None = None,
    *,
    image_label: str | None = None,
) -> Face:
    """Choose the face a method uses from one image's detections.

    policy "largest": largest box area, as InstantID and PuLID do (a stable ascending
    sort by area, last element: among equal areas the later, lower-scoring face wins).
    "highest_score": the most confident face, PhotoMaker V2's ``faces[0]`` (first among
    equal scores). "error": refuse an image with more than one face. Choosing among
    several faces warns with ``MultipleFacesWarning``.
    """
    if policy not in FACE_POLICIES:
        raise ConfigError(f"face policy must be one of {', '.join(FACE_POLICIES)}; "
                          f"got {policy!r}.")
    label = image_label or _label(None, image_index)
    if not faces:
        raise FaceNotFoundError(
            f"no face was found in {label}. Use a clearer photo in which the face is "
            "larger, well lit, frontal and unobstructed (the face should fill a good part "
            "of the image).")
    if len(faces) == 1:
        return faces[0]
    if policy == "error":
        raise MultipleFacesError(
            f"{len(faces)} faces were found in {label} and the face policy is 'error'. "
            "Crop the photo to the one person, or use policy 'largest' or 'highest_score'.")
    if policy == "largest":
        chosen = sorted(faces, key=lambda f: f.area)[-1]
    else:
        chosen = max(faces, key=lambda f: f.det_score)
    box = ", ".join(f"{v:.0f}" for v in chosen.bbox)
    warnings.warn(
        f"{len(faces)} faces were found in {label}; using the {policy.replace('_', ' ')} "
        f"one (box {box}). Crop the photo to one person to be sure which face is used.",
        MultipleFacesWarning, stacklevel=2)
    return chosen


def align_face(image: Any, kps: np.ndarray, size: int = 224) -> Any:
    """The face warped onto insightface's ArcFace template, as an RGB PIL image.

    kps: (5, 2) keypoints of ``Face.kps``. size: side in pixels, a multiple of 112 or
    128 (insightface's ``norm_crop`` rule). 112 is the recogniser's own crop; 224 is the
    crop IP-Adapter FaceID-PlusV2 gives its CLIP image encoder. Pixels outside the
    image are black, as in ``norm_crop``.
    """
    if size <= 0 or (size % 112 and size % 128):
        raise ConfigError(f"align_face size must be a multiple of 112 or 128, got {size}.")
    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise ConfigError(f"kps must have shape (5, 2) (Face.kps), got {kps.shape}.")
    face_align = _import_insightface().utils.face_align
    from PIL import Image

    rgb = np.asarray(load_image(image))
    # The similarity warp treats channels alike, so warping RGB gives norm_crop's BGR
    # result with channels swapped, i.e. exactly the RGB crop.
    return Image.fromarray(face_align.norm_crop(rgb, landmark=kps, image_size=size))


def resolve_model_dir(model: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """The folder holding ``model``'s files; ``FaceModelsNotFoundError`` if none does."""
    direct = Path(model).expanduser()
    if direct.is_dir() and (len(direct.parts) > 1 or str(model) not in FACE_MODEL_PACKS):
        return _checked_folder(direct, _pack_for(direct.name))
    name = str(model)
    pack = FACE_MODEL_PACKS.get(name)
    base = Path(root).expanduser() if root is not None else Path("~/.insightface").expanduser()
    candidates = [base] if root is not None and any(base.glob("*.onnx")) else []
    candidates += [base / "models" / name, base / name]
    for folder in candidates:
        if folder.is_dir() and not _missing_files(folder, pack):
            return folder.resolve()
    # Where to tell the user to put the files: the folder they pointed at if it already
    # holds some .onnx files, else insightface's own layout <root>/models/<name>.
    target = candidates[0] if len(candidates) == 3 else base / "models" / name
    raise FaceModelsNotFoundError(_missing_message(name, pack, candidates, target))


def _pack_for(folder_name: str) -> FaceModelPack | None:
    return FACE_MODEL_PACKS.get(folder_name)


def _checked_folder(folder: Path, pack: FaceModelPack | None) -> Path:
    if _missing_files(folder, pack):
        raise FaceModelsNotFoundError(_missing_message(folder.name, pack, [folder], folder))
    return folder.resolve()


def _missing_files(folder: Path, pack: FaceModelPack | None) -> list[str]:
    """Files the analyser needs that ``folder`` lacks (any .onnx for an unknown pack)."""
    if pack is None:
        return [] if any(folder.glob("*.onnx")) else ["*.onnx"]
    return [f for f in (pack.detector, pack.recognizer) if not (folder / f).is_file()]


def _missing_message(
    name: str, pack: FaceModelPack | None, searched: Sequence[Path], target: Path
) -> str:
    looked = "; ".join(_folder_state(p) for p in searched)
    if pack is None:
        what = (f"the .onnx files of the insightface pack {name!r} (a detector with "
                "5 keypoints and a 512-d recogniser)")
        where = "Obtain them from the pack's publisher"
    else:
        what = (f"{pack.detector} (detector) and {pack.recognizer} (recogniser); "
                f"{', '.join(pack.unused)} may sit beside them but are not used")
        where = f"Get them from {pack.source}"
    return (f"insightface model pack {name!r} not found. Searched: {looked}. Needed: {what}. "
            f"{where} and place the files in {target}/ (or pass root= or model= pointing "
            "at the folder that holds them). Nothing is downloaded automatically.")


def _folder_state(folder: Path) -> str:
    if not folder.is_dir():
        return f"{folder} (no such folder)"
    onnx = sorted(p.name for p in folder.glob("*.onnx"))
    if not onnx:
        # insightface leaves an empty folder behind after a failed download.
        return f"{folder} (exists but holds no .onnx files)"
    return f"{folder} (holds {', '.join(onnx)})"


def _import_insightface():
    try:
        import onnxruntime  # noqa: F401  (insightface needs it; name it if it is missing)
    except ImportError as exc:
        raise MissingDependencyError(
            "face analysis needs onnxruntime, which is not installed. Install it with "
            "pip install 'beyondfacial[faces]' (CPU); for CUDA install "
            "'beyondfacial[faces,gpu]' and afterwards reinstall onnxruntime-gpu "
            "(pip install --force-reinstall --no-deps onnxruntime-gpu), because "
            "insightface's own onnxruntime overwrites it.") from exc
    try:
        import insightface
        import insightface.app  # noqa: F401  (FaceAnalysis lives here)
        import insightface.utils.face_align  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"face analysis needs insightface, which could not be imported ({exc}). "
            "Install it with pip install 'beyondfacial[faces]'.") from exc
    return insightface


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always as the fallback."""
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def _build_face_analysis(model_dir: Path, providers, det_size, det_thresh):
    insightface = _import_insightface()
    if providers is None:
        providers = default_providers()
    try:
        app = insightface.app.FaceAnalysis(
            name=str(model_dir), allowed_modules=["detection", "recognition"],
            providers=providers)
    except AssertionError as exc:
        # insightface asserts that a detector was among the loaded files.
        raise FaceModelsNotFoundError(
            f"insightface found no face detector in {model_dir} ({_folder_state(model_dir)}). "
            "The folder must hold an SCRFD detector .onnx (det_10g.onnx for buffalo_l, "
            "scrfd_10g_bnkps.onnx for antelopev2) and an ArcFace recogniser .onnx.") from exc
    except OSError as exc:
        raise FaceModelsNotFoundError(
            f"insightface could not load the model pack in {model_dir} ({exc}). Place the "
            "pack's .onnx files there; nothing is downloaded automatically.") from exc
    except Exception as exc:
        # onnxruntime reports damaged graphs with its own exception types.
        if type(exc).__module__.startswith("onnxruntime"):
            raise CheckpointError(
                f"an .onnx file in {model_dir} could not be loaded by onnxruntime ({exc}). "
                "It is probably truncated or corrupt: download the pack again.") from exc
        raise
    if "recognition" not in app.models:
        raise FaceModelsNotFoundError(
            f"insightface found no face recogniser in {model_dir} "
            f"({_folder_state(model_dir)}). The folder must also hold an ArcFace .onnx "
            "(w600k_r50.onnx for buffalo_l, glintr100.onnx for antelopev2).")
    app.prepare(ctx_id=0, det_thresh=det_thresh, det_size=tuple(det_size))
    return app


def _detect_at_size(app, bgr: np.ndarray, size: tuple[int, int]) -> list:
    """Run ``app.get`` with the detector set to ``size``, then restore its size."""
    detector = app.det_model
    saved = (getattr(detector, "input_size", None), getattr(detector, "input_sizes", None))
    # 0.7.x reads input_size, 2.x input_sizes; a fixed-size graph ignores both in 2.x.
    detector.input_size = tuple(size)
    if saved[1] is not None:
        detector.input_sizes = [tuple(size)]
    try:
        return list(app.get(bgr))
    finally:
        detector.input_size = saved[0]
        if saved[1] is not None:
            detector.input_sizes = saved[1]


def _to_face(found) -> Face:
    embedding = np.asarray(found.embedding, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(embedding))
    normed = embedding / norm if norm > 0 else embedding.copy()
    return Face(
        bbox=np.asarray(found.bbox, dtype=np.float32).reshape(4).copy(),
        kps=np.asarray(found.kps, dtype=np.float32).reshape(5, 2).copy(),
        det_score=float(found.det_score),
        embedding=embedding,
        normed_embedding=normed.astype(np.float32),
    )


def _bgr_array(image) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8 BGR, the OpenCV order insightface expects."""
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def _label(item: Any, index: int | None) -> str:
    name = "reference image" if index is None else f"reference image {index}"
    if isinstance(item, (str, os.PathLike)):
        return f"{name} ({item})"
    return name


def _check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    if len(size) != 2 or any(int(v) <= 0 or int(v) % 32 for v in size):
        raise ConfigError(f"{name} must be (width, height) with positive multiples of 32 "
                          f"(the detector's largest stride); got {size}.")
    return int(size[0]), int(size[1])


__all__ = [
    "FACE_MODEL_PACKS", "FACE_POLICIES", "PHOTOMAKER_RETRY_DET_SIZES", "Face",
    "FaceAnalyzer", "FaceModelPack", "FaceModelsNotFoundError", "MultipleFacesWarning",
    "align_face", "default_providers", "resolve_model_dir", "select_face",
]
