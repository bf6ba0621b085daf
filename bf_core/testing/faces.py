"""Random-weight insightface model packs, so face analysis can be tested offline.

``make_random_insightface_pack`` writes two small ONNX graphs into a folder:

- a detector with SCRFD's interface: input ``input.1`` of shape 1 x 3 x H x W (H, W
  dynamic), nine outputs in the order insightface's ``SCRFD`` class reads them, i.e.
  scores, box distances and keypoint offsets, each at strides 8, 16 and 32, two anchors
  per feature-map cell, as rows of widths 1, 4 and 10;
- a recogniser with ArcFace's interface: N x 3 x 112 x 112 -> N x 512.

insightface's model zoo recognises them by those shapes, so ``FaceAnalysis`` on the
folder runs its real letterboxing, decoding, NMS, ``norm_crop`` alignment and embedding
code. The weights are random: the "faces" are wherever the random detector scores high.
``face_logit_bias`` moves every score logit, which makes the two cases tests need
deterministic: strongly negative gives no face on any image, strongly positive gives
faces on every image. How many faces survive NMS depends on the image; do not assert
counts (with a strongly positive bias a 128 x 128 detection finds a few dozen).

Needs the ``onnx`` package (a test dependency), imported only when a pack is written.

``ScriptedFaceDetector`` is the test face detector of placement code (``region="auto"``,
InstantID's ``kps="auto"``): it "finds" the faces it is given, at known places.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bf_core.faces import FACE_MODEL_PACKS, Face

DETECTOR_STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
KEYPOINTS = 5
RECOGNIZER_SIZE = 112
EMBEDDING_DIM = 512

_OPSET = 13
# An IR version every onnxruntime >= 1.14 reads; the onnx package would otherwise stamp
# its own newest version, which older runtimes refuse.
_IR_VERSION = 8
_FEATURES = 8
_RECOGNIZER_PATCH = 16
_RECOGNIZER_CHANNELS = 4
# Random score logits stay within about +-2 of the bias: a bias of +-10 decides alone.
_SCORE_WEIGHT_STD = 0.05


class ScriptedFaceDetector:
    """A face detector that finds exactly the boxes it is given, in every image.

    boxes: (x0, y0, x1, y1) in fractions of the image, in the order ``detect`` returns them
    (give them out of left-to-right order to test ordering); scaled to each image's pixels.
    ``seen`` records the (width, height) of every image it was shown.
    """

    def __init__(self, boxes):
        self.boxes = [tuple(float(v) for v in box) for box in boxes]
        self.seen: list[tuple[int, int]] = []

    def detect(self, image, *, index=None) -> list[Face]:
        width, height = image.size
        self.seen.append((width, height))
        return [self._face(box, width, height) for box in self.boxes]

    @staticmethod
    def _face(box, width: int, height: int) -> Face:
        x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        w, h = x1 - x0, y1 - y0
        # eyes, nose, mouth corners at their usual places in the box
        kps = np.array([[x0 + 0.3 * w, y0 + 0.4 * h], [x0 + 0.7 * w, y0 + 0.4 * h],
                        [x0 + 0.5 * w, y0 + 0.6 * h], [x0 + 0.35 * w, y0 + 0.8 * h],
                        [x0 + 0.65 * w, y0 + 0.8 * h]], dtype=np.float32)
        embedding = np.zeros(EMBEDDING_DIM, dtype=np.float32)
        return Face(np.array([x0, y0, x1, y1], dtype=np.float32), kps, 0.99, embedding, embedding)


def make_random_insightface_pack(
    folder: str | os.PathLike,
    seed: int = 0,
    detector_name: str = "det_10g.onnx",
    recognizer_name: str = "w600k_r50.onnx",
    *,
    face_logit_bias: float = 0.0,
) -> Path:
    """Write a random detector and recogniser into ``folder``; return the folder.

    ``face_logit_bias`` is added to every detection logit before the sigmoid: about
    -10 or lower finds no face, +10 or higher finds at least one in every image at
    the default threshold 0.5. The same ``seed`` writes identical files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _save(_detector_graph(rng, face_logit_bias), folder / detector_name)
    _save(_recognizer_graph(rng), folder / recognizer_name)
    return folder


def make_random_antelopev2_pack(
    folder: str | os.PathLike, seed: int = 0, *, face_logit_bias: float = 0.0
) -> Path:
    """The same random pack under antelopev2's file names (InstantID, PuLID)."""
    files = FACE_MODEL_PACKS["antelopev2"]
    return make_random_insightface_pack(
        folder, seed, files.detector, files.recognizer, face_logit_bias=face_logit_bias
    )


def _save(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _initializer(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _detector_graph(rng: np.random.Generator, face_logit_bias: float):
    """SCRFD-shaped graph: per stride, a patchify conv then three 1x1 heads."""
    from onnx import TensorProto, helper

    nodes, inits = [], []
    outputs = {"score": [], "bbox": [], "kps": []}
    heads = (("score", 1), ("bbox", 4), ("kps", 2 * KEYPOINTS))
    for stride in DETECTOR_STRIDES:
        feature = f"feat_{stride}"
        inits += [
            _initializer(f"patch_w_{stride}",
                         rng.normal(0, 1 / np.sqrt(3 * stride * stride),
                                    (_FEATURES, 3, stride, stride))),
            _initializer(f"patch_b_{stride}", np.zeros(_FEATURES)),
        ]
        nodes += [
            helper.make_node("Conv", ["input.1", f"patch_w_{stride}", f"patch_b_{stride}"],
                             [f"{feature}_lin"], kernel_shape=[stride, stride],
                             strides=[stride, stride], name=f"patchify_{stride}"),
            helper.make_node("Relu", [f"{feature}_lin"], [feature], name=f"relu_{stride}"),
        ]
        for head, width in heads:
            channels = ANCHORS_PER_CELL * width
            std = _SCORE_WEIGHT_STD if head == "score" else 1 / np.sqrt(_FEATURES)
            bias = np.full(channels, face_logit_bias if head == "score" else 0.0)
            inits += [
                _initializer(f"{head}_w_{stride}",
                             rng.normal(0, std, (channels, _FEATURES, 1, 1))),
                _initializer(f"{head}_b_{stride}", bias),
            ]
            raw = f"{head}_raw_{stride}"
            nodes.append(helper.make_node(
                "Conv", [feature, f"{head}_w_{stride}", f"{head}_b_{stride}"], [raw],
                kernel_shape=[1, 1], name=f"{head}_head_{stride}"))
            activated, more_nodes, more_inits = _head_activation(head, raw, stride)
            nodes += more_nodes
            inits += more_inits
            out = f"{head}_{stride}"
            nodes += _cells_to_rows(activated, out, width, stride)
            outputs[head].append(
                helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"rows_{stride}", width]))
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                            [1, 3, "height", "width"])]
    # insightface reads outputs by position: all scores, then all boxes, then all keypoints.
    ordered = outputs["score"] + outputs["bbox"] + outputs["kps"]
    graph = helper.make_graph(nodes, "random_scrfd", inputs, ordered, initializer=inits)
    return _model(graph)


def _head_activation(head: str, raw: str, stride: int):
    """Scores through a sigmoid; box distances kept positive, between 2 and 6 strides.

    insightface multiplies box and keypoint outputs by the stride; positive distances
    give well-formed boxes, and boxes a few strides wide overlap their neighbours enough
    for NMS to keep the face count small.
    """
    from onnx import helper

    if head == "score":
        return f"{raw}_p", [helper.make_node("Sigmoid", [raw], [f"{raw}_p"],
                                             name=f"score_sigmoid_{stride}")], []
    if head == "bbox":
        nodes = [
            helper.make_node("Sigmoid", [raw], [f"{raw}_s"], name=f"bbox_sigmoid_{stride}"),
            helper.make_node("Mul", [f"{raw}_s", "four"], [f"{raw}_m"], name=f"bbox_scale_{stride}"),
            helper.make_node("Add", [f"{raw}_m", "two"], [f"{raw}_d"], name=f"bbox_shift_{stride}"),
        ]
        consts = [] if stride != DETECTOR_STRIDES[0] else [
            _initializer("two", np.array(2.0)), _initializer("four", np.array(4.0))]
        return f"{raw}_d", nodes, consts
    # Keypoints: offsets from the anchor in (-1, 1) strides, so they land near the box.
    return f"{raw}_t", [helper.make_node("Tanh", [raw], [f"{raw}_t"],
                                         name=f"kps_tanh_{stride}")], []


def _cells_to_rows(tensor: str, out: str, width: int, stride: int):
    """(1, anchors * width, h, w) -> (h * w * anchors, width), SCRFD's row order.

    Row index = (y * w + x) * anchors + anchor, matching the anchor centres insightface
    builds (each cell's centre repeated once per anchor).
    """
    from onnx import helper

    shape = f"{out}_shape"
    return [
        helper.make_node("Transpose", [tensor], [f"{out}_nhwc"], perm=[0, 2, 3, 1],
                         name=f"{out}_to_nhwc"),
        helper.make_node("Constant", [], [shape], name=f"{out}_shape_const",
                         value=helper.make_tensor(shape, 7, [2], [-1, width])),
        helper.make_node("Reshape", [f"{out}_nhwc", shape], [out], name=f"{out}_rows"),
    ]


def _recognizer_graph(rng: np.random.Generator):
    """ArcFace-shaped graph: (N, 3, 112, 112) -> patchify conv -> linear -> (N, 512).

    Node names must not start with "Sub"/"Mul": insightface takes such a graph for an
    old MXNet export and would then feed it raw 0..255 pixels.
    """
    from onnx import TensorProto, helper

    cells = (RECOGNIZER_SIZE // _RECOGNIZER_PATCH) ** 2 * _RECOGNIZER_CHANNELS
    inits = [
        _initializer("embed_patch_w",
                     rng.normal(0, 1 / np.sqrt(3 * _RECOGNIZER_PATCH ** 2),
                                (_RECOGNIZER_CHANNELS, 3, _RECOGNIZER_PATCH,
                                 _RECOGNIZER_PATCH))),
        _initializer("embed_patch_b", np.zeros(_RECOGNIZER_CHANNELS)),
        _initializer("embed_proj_w", rng.normal(0, 1 / np.sqrt(cells), (cells, EMBEDDING_DIM))),
        _initializer("embed_proj_b", rng.normal(0, 0.1, EMBEDDING_DIM)),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "embed_patch_w", "embed_patch_b"], ["patches"],
                         kernel_shape=[_RECOGNIZER_PATCH] * 2, strides=[_RECOGNIZER_PATCH] * 2,
                         name="embed_patchify"),
        helper.make_node("Flatten", ["patches"], ["flat"], axis=1, name="embed_flatten"),
        helper.make_node("Gemm", ["flat", "embed_proj_w", "embed_proj_b"], ["embedding"],
                         name="embed_project"),
    ]
    inputs = [helper.make_tensor_value_info(
        "input.1", TensorProto.FLOAT, ["batch", 3, RECOGNIZER_SIZE, RECOGNIZER_SIZE])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                             ["batch", EMBEDDING_DIM])]
    graph = helper.make_graph(nodes, "random_arcface", inputs, outputs, initializer=inits)
    return _model(graph)


def _model(graph):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)],
                              producer_name="beyondfacial-testing")
    model.ir_version = _IR_VERSION
    return model


__all__ = ["make_random_insightface_pack", "make_random_antelopev2_pack"]
