"""Several people in one image: the faces found, matched to the persons, and what that says.

Every face the detector finds (the largest ``MAX_MATCHED_FACES`` of them) is compared with
each person's reference faces: the mean ArcFace cosine in percent, as Face sim. Persons
and faces are then matched one to one by the assignment with the largest total
similarity (brute force over permutations: at most 4 persons and 8 faces, 1,680
candidates). From that match, per image:

- identity recall: the share of persons whose matched face reaches ``MATCH_THRESHOLD``;
  the match is one to one, so one face never counts for two persons;
- swap/blend: one face reaches the threshold for two persons or more (a blend), or a
  person's best face (its most similar one, above the threshold for that person alone)
  belongs to another person: matched to that person, or lying in that person's region
  and not in its own (a swap);
- face-count accuracy: the detector found exactly as many faces as there are persons;
- the close-up measures per face: each person's matched face box as a fraction of the
  frame and of its height (0 for a person without a face, as for one person);
- CLIP-T, the built-in one.

All in percent except the face count. These metrics are not registered through the
metrics hook: they need the persons and regions of a multi item, which a ``Sample`` of
one identity does not carry.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.metrics.builtin import (
    ClipTextMetric,
    ReferenceCache,
    box_fractions,
    cosine_percent,
    largest_faces,
    reference_face_embeddings,
)

#: ArcFace cosine (percent) from which a face counts as the person's: a common choice for
#: insightface's embeddings; a run with another recogniser sets the threshold it verifies
#: people at (``--multi-match-threshold``).
MATCH_THRESHOLD = 30.0
#: faces beyond the largest this many are counted but not matched (busy crowds, and the
#: random detectors of the tiny run, find many)
MAX_MATCHED_FACES = 8
#: the similarity of a person without any reference face: below every threshold
NO_REFERENCE = -100.0

Box = tuple[float, float, float, float]


def best_assignment(similarity: np.ndarray) -> tuple[int | None, ...]:
    """Per person, the face it is matched with (None when faces run out), maximising the
    summed similarity over matched pairs; every face goes to one person at most.

    similarity: (P, F), persons x faces. Ties keep the first candidate in
    ``itertools.permutations`` order, so the result is deterministic.
    """
    sim = np.asarray(similarity, np.float64)
    persons, faces = sim.shape
    best: tuple[int | None, ...] = (None,) * persons
    best_total = -np.inf
    if faces >= persons:  # each person picks a distinct face
        for chosen in itertools.permutations(range(faces), persons):
            total = float(sum(sim[p, f] for p, f in enumerate(chosen)))
            if total > best_total:
                best, best_total = chosen, total
        return tuple(best)
    for owners in itertools.permutations(range(persons), faces):  # each face picks a person
        total = float(sum(sim[p, f] for f, p in enumerate(owners)))
        if total > best_total:
            assignment: list[int | None] = [None] * persons
            for face, person in enumerate(owners):
                assignment[person] = face
            best, best_total = tuple(assignment), total
    return best


def box_contains(box: Box | None, x: float, y: float) -> bool:
    """Whether the point (x, y) (fractions of the image) lies in ``box`` (x0, y0, x1, y1
    fractions; None is the whole frame)."""
    if box is None:
        return True
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


@dataclass(frozen=True)
class PeopleMatch:
    """How the faces of one image match its persons.

    assignment: per person, the index of its matched face, or None.
    recalled: per person, matched to a face at or above the threshold.
    blend: some face reaches the threshold for two persons or more.
    swap: some person's best face, above the threshold for that person alone, belongs to
        another person.
    """

    assignment: tuple[int | None, ...]
    recalled: tuple[bool, ...]
    blend: bool
    swap: bool


def match_people(similarity: np.ndarray, threshold: float = MATCH_THRESHOLD,
                 face_centres: Sequence[tuple[float, float]] | None = None,
                 regions: Sequence[Box | None] | None = None) -> PeopleMatch:
    """Match persons to faces and name the failures.

    similarity: (P, F) percent. face_centres: (F,) face-box centres (x, y) in fractions of
    the image; regions: per person its box in fractions (None: the whole frame). Without
    either, only the assignment decides who a face belongs to.
    """
    sim = np.asarray(similarity, np.float64)
    persons, faces = sim.shape
    assignment = best_assignment(sim)
    recalled = tuple(f is not None and sim[p, f] >= threshold for p, f in enumerate(assignment))
    shared = (sim >= threshold).sum(axis=0) >= 2  # (F,) faces that pass for two persons
    blend = bool(shared.any())
    swap = False
    for person in range(persons if faces else 0):
        best = int(np.argmax(sim[person]))
        if sim[person, best] < threshold or shared[best]:
            continue  # no face of this person, or a blend (counted as such)
        owner = assignment.index(best) if best in assignment else None
        if owner is not None and owner != person:
            swap = True
        if face_centres is not None and regions is not None:
            x, y = face_centres[best]
            elsewhere = any(box_contains(regions[q], x, y) for q in range(persons)
                            if q != person and regions[q] is not None)
            if elsewhere and not box_contains(regions[person], x, y):
                swap = True
    return PeopleMatch(assignment, recalled, blend, swap)


def face_centre(bbox: Sequence[float], width: int, height: int) -> tuple[float, float]:
    """The centre of a face box (x1, y1, x2, y2 pixels) in fractions of the image."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return (x1 + x2) / 2 / width, (y1 + y2) / 2 / height


def similarity_matrix(references: Sequence[list[np.ndarray]], faces: Sequence[Any]) -> np.ndarray:
    """(P, F) percent: the mean cosine between each face's normed embedding and each
    person's reference embeddings; ``NO_REFERENCE`` for a person without any."""
    sim = np.full((len(references), len(faces)), NO_REFERENCE)
    for p, embeddings in enumerate(references):
        if embeddings:
            for f, face in enumerate(faces):
                sim[p, f] = np.mean([cosine_percent(face.normed_embedding, r) for r in embeddings])
    return sim


def people_values(match: PeopleMatch, similarity: np.ndarray, boxes: Sequence[Sequence[float]],
                  face_count: int, image_size: tuple[int, int]) -> dict[str, float | None]:
    """One image's values from its match. boxes: (F,) face boxes in pixels of an image of
    ``image_size`` (width, height). Rates are 100 or 0 per image (their mean is the rate)."""
    persons = len(match.assignment)
    matched = [(p, f) for p, f in enumerate(match.assignment) if f is not None]
    closeups = [box_fractions(boxes[f], *image_size) if f is not None else (0.0, 0.0)
                for f in match.assignment]
    sims = [float(similarity[p, f]) for p, f in matched if similarity[p, f] > NO_REFERENCE]
    return {
        "identity_recall": 100.0 * sum(match.recalled) / persons,
        "swap_blend_rate": 100.0 if match.swap or match.blend else 0.0,
        "swap": 100.0 if match.swap else 0.0,
        "blend": 100.0 if match.blend else 0.0,
        "face_count_accuracy": 100.0 if face_count == persons else 0.0,
        "faces_found": float(face_count),
        "matched_face_sim": float(np.mean(sims)) if sims else None,
        "face_area_fraction": float(np.mean([c[0] for c in closeups])),
        "face_box_height": float(np.mean([c[1] for c in closeups])),
    }


class MultiPeopleMetric:
    """The multi scenario's metrics for one image (see the module docstring)."""

    name = "multi_people"
    columns = ("identity_recall", "swap_blend_rate", "face_count_accuracy", "faces_found",
               "matched_face_sim", "face_area_fraction", "face_box_height", "clip_t")
    #: per image only (items CSV): the two halves of swap_blend_rate
    detail_columns = ("swap", "blend")
    labels = {"identity_recall": "ID recall %", "swap_blend_rate": "Swap/blend %",
              "face_count_accuracy": "Face count OK %", "faces_found": "Faces found",
              "matched_face_sim": "Matched face sim", "face_area_fraction": "Face area %",
              "face_box_height": "Face height %", "clip_t": "CLIP-T", "swap": "Swap %",
              "blend": "Blend %"}
    higher_is_better = {"identity_recall": True, "swap_blend_rate": False,
                        "face_count_accuracy": True, "matched_face_sim": True,
                        "face_area_fraction": False, "face_box_height": False, "clip_t": True}

    def __init__(self, threshold: float = MATCH_THRESHOLD):
        self.threshold = float(threshold)
        self._references = ReferenceCache()
        self._clip_t = ClipTextMetric()

    def score(self, sample: Any, identities: Sequence[Any], regions: Sequence[Box | None] | None,
              context: Any) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
        """(values, matches): ``values`` by column; ``matches`` per person its matched face
        box (pixels) and similarity, or None (drawn on the contact sheet).

        sample: the image and its scene prompt (``Sample``); identities: the persons in
        order; regions: the regions in use per person, fractions (None: not checked).
        """
        analyzer = context.models.face_analyzer()
        image = sample.image
        count, faces = largest_faces(analyzer, image, MAX_MATCHED_FACES)
        references = [self._references.get(identity, lambda images: reference_face_embeddings(
            images, analyzer)) for identity in identities]
        similarity = similarity_matrix(references, faces)
        centres = [face_centre(face.bbox, *image.size) for face in faces]
        match = match_people(similarity, self.threshold, centres, regions)
        boxes = [face.bbox for face in faces]
        values = people_values(match, similarity, boxes, count, image.size)
        values.update(self._clip_t.score(sample, context))
        matches = [None if f is None else {"box": [float(v) for v in boxes[f]],
                                           "similarity": float(similarity[p, f])}
                   for p, f in enumerate(match.assignment)]
        return values, matches
