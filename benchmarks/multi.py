"""The ``multi`` scenario: two people in one image.

Pairs of the benchmark's identities are drawn into the two-person scenes of the
``two_person`` prompt set, person 1 in the left half of the frame and person 2 in the
right half (or both ``"auto"``: around the faces of the step-M1 preview). Per backend,
three settings are compared:

- ``n_lines``: the method with one ID line per person (``people=[Person, Person]``), each
  ID line competing only inside its person's region;
- ``native``: the backend's own single-line multi-person mode, where it has one (for
  IP-Adapter: diffusers' masked IP-Adapter, one image embedding per person restricted to
  the same regions by ``ip_adapter_masks``); a backend without one is left out of this
  row, with the reason, never stood in for;
- ``person1_only``: the single-person method with person 1 alone on the whole frame:
  the floor, what one person's identity gives the scene.

A multi item is a ``WorkItem`` whose ``people`` names the pair; it is generated, stored,
resumed and sharded with the rest of the grid, under ``images/multi/...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.metrics.multi import MATCH_THRESHOLD
from benchmarks.scenarios import (
    BenchIdentity,
    GenerationParams,
    MadeImage,
    PromptSet,
    WorkItem,
    fingerprint,
    identity_inputs,
)
from bf_core.config import BFConfig
from bf_core.errors import ConfigError

PAIR_MODES = ("consecutive", "all")
REGION_MODES = ("halves", "auto")
#: person 1 the left half, person 2 the right half: (x0, y0, x1, y1) in fractions
HALVES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
AUTO = "auto"
MULTI_SETTINGS = ("n_lines", "native", "person1_only")
#: what each setting is, for the table; ``native`` is described by the backend's baseline
SETTING_METHODS = {"n_lines": "BeyondFacial, one ID line per person",
                   "person1_only": "BeyondFacial, person 1 alone on the whole frame (floor)"}
PEOPLE = 2


@dataclass(frozen=True)
class MultiOptions:
    """How the multi scenario runs.

    pairs: ``"consecutive"`` (identity k with identity k + 1, wrapping around: each
    identity is person 1 once and person 2 once) or ``"all"`` (every unordered pair, in
    order); max_pairs: keep the first N pairs (None: all of them). regions: ``"halves"``
    or ``"auto"``. match_threshold: the face-match threshold of the metrics (percent).
    """

    prompt_set: PromptSet
    pairs: str = "consecutive"
    max_pairs: int | None = None
    regions: str = "halves"
    match_threshold: float = MATCH_THRESHOLD

    def __post_init__(self):
        if self.pairs not in PAIR_MODES:
            raise ConfigError(f"multi pairs {self.pairs!r}: choose one of {', '.join(PAIR_MODES)}")
        if self.regions not in REGION_MODES:
            raise ConfigError(f"multi regions {self.regions!r}: choose one of "
                              f"{', '.join(REGION_MODES)}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"multi max pairs must be at least 1, got {self.max_pairs}")


def identity_pairs(identities: Sequence[BenchIdentity], mode: str = "consecutive",
                   max_pairs: int | None = None) -> list[tuple[BenchIdentity, BenchIdentity]]:
    """Ordered pairs (person 1, person 2) of distinct identities.

    ``"consecutive"``: (k, k + 1 mod n) for every k, n pairs (for n = 2 both orders), so
    that every identity stands once on each side and a left/right bias of the method
    averages out. ``"all"``: every unordered pair (i < j), n(n - 1)/2 of them.
    """
    people = list(identities)
    if len(people) < PEOPLE:
        raise ConfigError(f"the multi scenario needs at least {PEOPLE} identities, got "
                          f"{len(people)}")
    if mode == "consecutive":
        pairs = [(people[k], people[(k + 1) % len(people)]) for k in range(len(people))]
        if len(people) == PEOPLE:
            pairs = pairs[:PEOPLE]  # (a, b) and (b, a)
    elif mode == "all":
        pairs = list(itertools.combinations(people, PEOPLE))
    else:
        raise ConfigError(f"multi pairs {mode!r}: choose one of {', '.join(PAIR_MODES)}")
    return pairs[:max_pairs] if max_pairs is not None else pairs


def requested_regions(setting: str, mode: str) -> tuple[Any, ...] | None:
    """The regions a setting asks for, per person; None: one person on the whole frame.

    ``native`` always gets the halves: diffusers' masks are given before the first step,
    where no preview exists to find faces in.
    """
    if setting == "person1_only":
        return None
    if setting == "n_lines" and mode == AUTO:
        return (AUTO,) * PEOPLE
    return HALVES


# -- native single-line baselines -------------------------------------------------------------
@dataclass(frozen=True)
class NativeBaseline:
    """A backend's own multi-person mode: ``generate(pipe, photos, boxes, call)`` makes one
    image from each person's photos (a list per person), their boxes (fractions) and the
    stock call keywords (prompt, steps, size, generator, ...)."""

    method: str
    generate: Callable[[Any, list[list[Any]], Sequence[Sequence[float]], dict[str, Any]], Any]


def pixel_masks(boxes: Sequence[Sequence[float]], height: int, width: int) -> list[Any]:
    """One mask picture (mode L, 255 inside) of ``width`` x ``height`` pixels per box; a
    pixel belongs to a box when its centre does, the rule of the library's own regions."""
    from PIL import Image

    from bf_core.regions import box_mask

    # a 2-D uint8 array is a mode-L picture
    return [Image.fromarray(box_mask(box, height, width).numpy().astype("uint8") * 255)
            for box in boxes]


def ip_adapter_masks(boxes: Sequence[Sequence[float]], height: int, width: int) -> list[Any]:
    """diffusers' ``ip_adapter_masks`` for one IP-Adapter with one image per box: a list
    holding one (1, P, height, width) tensor, made by ``IPAdapterMaskProcessor``."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    masks = IPAdapterMaskProcessor().preprocess(pixel_masks(boxes, height, width), height=height,
                                                width=width)  # (P, 1, H, W)
    return [masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])]


def masked_ip_adapter(pipe: Any, photos: list[list[Any]], boxes: Sequence[Sequence[float]],
                      call: dict[str, Any]) -> Any:
    """diffusers' masked IP-Adapter: the stock pipeline with one image per person (its
    first reference photo: the recipe takes one image per mask) and each person's image
    attended to only inside its box (``cross_attention_kwargs={"ip_adapter_masks": ...}``).

    Needs exactly one loaded IP-Adapter that reads pictures through the CLIP image
    encoder; FaceID adapters read face embeddings instead, which this baseline does not
    compute, and are refused with a ``ConfigError``.
    """
    from bf_backends.ipadapter.state import detect_variants

    variants = detect_variants(pipe)
    if len(variants) != 1 or variants[0].startswith("faceid"):
        raise ConfigError(f"the masked IP-Adapter baseline runs on one CLIP-image IP-Adapter; "
                          f"this pipeline carries {variants or 'none'}")
    masks = ip_adapter_masks(boxes, call["height"], call["width"])
    return pipe(**call, ip_adapter_image=[[person[0] for person in photos]],
                cross_attention_kwargs={"ip_adapter_masks": masks}).images[0]


#: backend -> its native baseline, or why it has none (the table says so)
NATIVE_BASELINES: dict[str, NativeBaseline | str] = {
    "ipadapter": NativeBaseline(
        "diffusers masked IP-Adapter (one image per person, ip_adapter_masks)", masked_ip_adapter),
    "dreambooth": "has no native multi-person mode: the identity is a LoRA and a trigger "
                  "prompt, with nothing that places a person in a region",
    "photomaker": "has no native multi-person mode: its pipeline fuses one person's photos "
                  "into the trigger word",
    "instantid": "has no native multi-person mode: one face embedding and one keypoint "
                 "image per call",
    "pulid": "has no native multi-person mode: one ID embedding per call",
}
UNKNOWN_NATIVE = "declares no native multi-person mode to the benchmark"


def native_baseline(backend: str) -> NativeBaseline | str:
    """The backend's native multi-person baseline, or the reason it has none."""
    return NATIVE_BASELINES.get(backend, UNKNOWN_NATIVE)


def setting_method(backend: str, setting: str) -> str:
    """What a (backend, setting) row of the table runs, in words."""
    if setting == "native":
        native = native_baseline(backend)
        return native.method if isinstance(native, NativeBaseline) else "none"
    return SETTING_METHODS[setting]


# -- the grid ---------------------------------------------------------------------------------
@dataclass
class MultiPlan:
    """The multi items, and what is left out: ``left_out[(backend, setting)]`` the reason
    a row has no images; ``notes`` pairs left out of a backend, in words."""

    items: list[WorkItem]
    left_out: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def pair_checkpoint(pair: Sequence[BenchIdentity], backend: str,
                    default: str | None) -> tuple[str | None, str | None]:
    """(the checkpoint the pair runs with, None) or (None, why the pair cannot run): one
    pipeline carries one checkpoint, so two people with different ones cannot share it."""
    found = {identity.option(backend, "checkpoint", default) for identity in pair}
    if len(found) > 1:
        names = ", ".join(sorted(map(str, found)))
        return None, (f"{backend}: pair {'+'.join(i.name for i in pair)} left out: the two "
                      f"people have different checkpoints ({names}), and one pipeline carries one")
    return found.pop(), None


def build_multi_grid(backends: dict[str, int], options: MultiOptions,
                     identities: Sequence[BenchIdentity], seeds: Sequence[int],
                     params: GenerationParams, checkpoints: dict[str, str | None] | None = None,
                     base_model: str | None = None,
                     config: BFConfig | None = None) -> MultiPlan:
    """Every backend x setting x pair x prompt x seed of the multi scenario.

    backends: name -> how many people it serves (``bf_core.protocols.max_people``); one
    that serves fewer than two is left out whole. config: the method's settings for
    ``n_lines`` and ``person1_only`` (default ``BFConfig()``, the paper's).
    """
    checkpoints = checkpoints or {}
    config = config if config is not None else BFConfig()
    pairs = identity_pairs(identities, options.pairs, options.max_pairs)
    plan = MultiPlan([])
    for backend, serves in backends.items():
        if serves < PEOPLE:
            for setting in MULTI_SETTINGS:
                plan.left_out[(backend, setting)] = f"serves at most {serves} person(s) per call"
            continue
        settings = list(MULTI_SETTINGS)
        native = native_baseline(backend)
        if isinstance(native, str):
            plan.left_out[(backend, "native")] = native
            settings.remove("native")
        for pair in pairs:
            checkpoint, why = pair_checkpoint(pair, backend, checkpoints.get(backend))
            if why:
                plan.notes.append(why)
                continue
            names = tuple(i.name for i in pair)
            inputs = [identity_inputs(identity, backend) for identity in pair]
            for setting in settings:
                regions = requested_regions(setting, options.regions)
                method = None if setting == "native" else dataclasses.asdict(config)
                for index, prompt in enumerate(options.prompt_set.prompts):
                    for seed in seeds:
                        plan.items.append(WorkItem(
                            backend, setting, "+".join(names), options.prompt_set.name, index,
                            prompt, int(seed), checkpoint,
                            fingerprint("multi", setting, method, regions,
                                        dataclasses.asdict(params), base_model, checkpoint,
                                        inputs, prompt, seed),
                            people=names))
    return plan


# -- one image --------------------------------------------------------------------------------
def split_person_keywords(keywords: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A backend's call keywords for one identity -> (the ``Person`` fields, the rest,
    which are call options shared by everyone in the image)."""
    rest = dict(keywords)
    person = {key: rest.pop(key) for key in ("id_images", "id_prompt") if key in rest}
    return person, rest


def shared_options(per_person: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The call options of several people, which must agree: one call has one of each."""
    merged: dict[str, Any] = {}
    for options in per_person:
        for key, value in options.items():
            if key in merged and not _same(merged[key], value):
                raise ConfigError(f"the people of one image need different values of the call "
                                  f"option {key!r}; a call takes one")
            merged[key] = value
    return merged


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # arrays and tensors compare per element
        return False


def mask_bounds(mask: Any) -> tuple[float, float, float, float] | None:
    """The bounding box (x0, y0, x1, y1 fractions) of a (h, w) or (1, h, w) bool grid: what
    the contact sheet outlines and the swap check reads; None for the whole frame."""
    import numpy as np

    if mask is None:
        return None
    grid = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool)
    grid = grid[0] if grid.ndim == 3 else grid
    rows, cols = np.nonzero(grid)
    if rows.size == 0:
        return None
    height, width = grid.shape
    return (float(cols.min() / width), float(rows.min() / height),
            float((cols.max() + 1) / width), float((rows.max() + 1) / height))


def _plain(value: Any) -> Any:
    """Numbers, tuples and arrays as JSON-ready lists and floats."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value)


@contextlib.contextmanager
def counted_unet_rows(pipe: Any) -> Iterator[dict[str, int]]:
    """Count the UNet sample-evaluations (batch rows) and calls of a stock call, as the
    wrapper's ``diagnostics["model_rows"]`` and ``["model_calls"]`` count its own."""
    counter = {"rows": 0, "calls": 0}

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        counter["rows"] += int(sample.shape[0])
        counter["calls"] += 1

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def _fusion(maps: Any, steps: Any) -> tuple[Any, list[int]] | None:
    """(maps, steps) for the fusion strip, or None when no fused step was recorded."""
    return (maps, list(steps)) if maps is not None and steps is not None and len(steps) else None


def make_multi_image(item: WorkItem, setup: Any, keywords: Sequence[dict[str, Any]],
                     photos: Sequence[list[Any]], call: dict[str, Any], region_mode: str,
                     config: BFConfig | None = None, preview_face_analyzer: Any = None
                     ) -> MadeImage:
    """Generate one multi item.

    setup: the backend's ``PipelineSetup``; keywords: per person the backend's call
    keywords (``BackendTarget.call_kwargs``); photos: per person its reference photos (the
    native baseline's input); call: the stock call keywords (prompt, steps, size, output
    type, generator). preview_face_analyzer: the detector ``"auto"`` regions search the
    preview with (None: the library's default).
    """
    import bf_core
    from bf_core import Person

    config = config if config is not None else BFConfig()
    regions = requested_regions(item.setting, region_mode)
    if item.setting == "native":
        native = native_baseline(item.backend)
        if isinstance(native, str):
            raise ConfigError(f"backend {item.backend!r} {native}")
        with counted_unet_rows(setup.pipe) as counted:
            image = native.generate(setup.pipe, list(photos), regions, call)
        return MadeImage(image, {"model_rows": counted["rows"], "model_calls": counted["calls"]},
                          record={"regions": [list(box) for box in regions]})
    split = [split_person_keywords(k) for k in keywords]
    bf = bf_core.wrap(setup.pipe, backend=item.backend, config=config)
    if regions is None:  # the floor: person 1 alone, the single-person call
        person, options = split[0]
        result = bf(**call, **setup.options, **options, **person, return_fusion_maps=True)
        return MadeImage(result.images[0], result.diagnostics,
                         _fusion(result.fusion_maps, result.fusion_steps), record={"regions": None})
    extra: dict[str, Any] = {}
    if AUTO in regions and preview_face_analyzer is not None:
        extra["preview_face_analyzer"] = preview_face_analyzer
    people = [Person(**person, region=region)
              for (person, _), region in zip(split, regions, strict=True)]
    options = shared_options([options for _, options in split])
    result = bf(**call, **setup.options, **options, **extra, people=people,
                return_fusion_maps=True)
    fusion = _fusion(result.fusion_lines, result.fusion_steps)
    bounds = [mask_bounds(r) for r in (result.regions or [None] * len(people))]
    record: dict[str, Any] = {"regions": [list(b) if b else None for b in bounds]}
    if "auto_faces" in result.diagnostics:
        record["auto_faces"] = _plain(result.diagnostics["auto_faces"])
    return MadeImage(result.images[0], result.diagnostics, fusion, result.regions, record)
