"""What the benchmark runs: settings, identities, prompt sets, and the grid of work items.

A *scenario* is one backend under one setting (the method off, the method on, or an
ablation). A *work item* is a scenario applied to one identity, one prompt and one seed:
exactly one image. The ``multi`` scenario's items (``benchmarks.multi``) apply one of its
settings to a pair of identities instead. Items are ordered so that items sharing a pipeline are adjacent, and
each has a stable id that names its files, so a rerun finds what is already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bf_core.config import BFConfig, IdAFConfig, IdAPConfig
from bf_core.errors import ConfigError

PROMPT_DIR = Path(__file__).parent / "prompts"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IDENTITY_FILE = "identity.json"
#: the backend name of the FID reference images: the base model alone, no identity method
REFERENCE_BACKEND = "base"
REFERENCE_SETTING = "reference"
#: reference seeds start here, far from the benchmark's own seeds
REFERENCE_SEED_OFFSET = 100_000


# -- settings ---------------------------------------------------------------------------------
def _config(**fields: Any) -> BFConfig:
    from bf_core.config import RefineConfig

    idaf = fields.pop("idaf", {})
    idap = fields.pop("idap", {})
    refine = fields.pop("refine", {})
    return BFConfig(idaf=IdAFConfig(**idaf), idap=IdAPConfig(**idap),
                    refine=RefineConfig(**refine), **fields)


#: name -> BFConfig fields; "baseline" is the backend's own single-line method
SETTING_FIELDS: dict[str, dict[str, Any]] = {
    "baseline": {"enabled": False},
    "full": {},
    "no_idaf": {"use_idaf": False},
    "no_idap": {"use_idap": False},
    "lambda_weight": {"idaf": {"lambda_mode": "weight"}},
    "saliency_cfg_delta": {"idaf": {"saliency": "cfg_delta"}},
    "thresholds_early": {"idaf_start": 0.1, "idap_start": 0.2},
    "thresholds_late": {"idaf_start": 0.3, "idap_start": 0.4},
    # the face-refine pass after the full method (paired with "full": its images are the
    # same calls' images before the pass), its identity-off ablation and a strength sweep
    "refine": {"refine_faces": True},
    "refine_identity_off": {"refine_faces": True, "refine": {"identity": "off"}},
    "refine_strength_030": {"refine_faces": True, "refine": {"strength": 0.3}},
    "refine_strength_060": {"refine_faces": True, "refine": {"strength": 0.6}},
}
DEFAULT_SETTINGS = tuple(SETTING_FIELDS)
TINY_SETTINGS = ("baseline", "full")


@dataclass(frozen=True)
class Setting:
    """One column of the comparison: a name and the BFConfig it runs."""

    name: str
    config: BFConfig
    refine_faces: bool = False  # the call also runs the face-refine pass (docs/refine.md)

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "/\\ .") or self.name == REFERENCE_SETTING:
            raise ConfigError(f"setting name {self.name!r} must be non-empty, without '/', '\\', "
                              f"spaces or dots, and not {REFERENCE_SETTING!r} (it names folders)")

    @classmethod
    def named(cls, name: str, fields: dict[str, Any] | None = None) -> Setting:
        """A built-in setting by name, or a custom one from BFConfig fields."""
        if fields is None:
            if name not in SETTING_FIELDS:
                raise ConfigError(f"unknown setting {name!r}; built-in settings: "
                                  f"{', '.join(SETTING_FIELDS)} (or define it in a settings file)")
            fields = SETTING_FIELDS[name]
        try:
            fields = json.loads(json.dumps(fields))
            refine_faces = bool(fields.pop("refine_faces", False))
            return cls(name, _config(**fields), refine_faces)
        except TypeError as exc:
            raise ConfigError(f"setting {name!r}: {exc}; fields are BFConfig's, with 'idaf', "
                              "'idap' and 'refine' as nested objects (and 'refine_faces': "
                              "true for the face-refine pass)") from exc


def setting_record(setting: Setting) -> dict[str, Any]:
    """What a setting runs, for fingerprints and run.json: its BFConfig, and the refine
    pass when it has one."""
    record = dataclasses.asdict(setting.config)
    if setting.refine_faces:
        record["refine_faces"] = True
    return record


def load_settings(names: Sequence[str], settings_file: str | Path | None = None) -> list[Setting]:
    """Settings by name; a JSON file ``{name: {BFConfig fields}}`` adds custom ones."""
    custom: dict[str, dict[str, Any]] = {}
    if settings_file is not None:
        custom = json.loads(Path(settings_file).read_text())
        if not isinstance(custom, dict):
            raise ConfigError(f"{settings_file}: expected a JSON object {{name: BFConfig fields}}")
    names = list(names) or list(custom) or list(DEFAULT_SETTINGS)
    return [Setting.named(n, custom.get(n)) for n in names]


# -- prompts and identities -------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """A prompt set shipped in ``benchmarks/prompts/`` by name, or a JSON/text file.

    JSON: ``{"name": ..., "prompts": [...]}``; text: one prompt a line (name = file stem).
    """
    path = Path(name_or_path)
    if not path.exists():
        path = PROMPT_DIR / f"{name_or_path}.json"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.json")))
        raise ConfigError(f"no prompt set {name_or_path!r}: give a JSON or text file, or one of "
                          f"the shipped sets: {shipped}")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        name, prompts = data.get("name", path.stem), data["prompts"]
    else:
        name = path.stem
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt set {path} holds no prompts")
    return PromptSet(name, tuple(prompts))


@dataclass(frozen=True)
class BenchIdentity:
    """One person: a folder of reference photos, plus optional per-backend settings.

    The folder may hold ``identity.json``: ``{"id_prompt": "...", "backends": {"<backend>":
    {"checkpoint": "...", "id_prompt": "..."}}}`` (e.g. a DreamBooth LoRA per person).
    """

    name: str
    images: tuple[Path, ...]
    id_prompt: str | None = None
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False,
                                                       compare=False)

    def option(self, backend: str, key: str, default: Any = None) -> Any:
        return self.backend_options.get(backend, {}).get(key, default)

    def load_images(self) -> list:
        from bf_core.images import load_image

        return [load_image(p) for p in self.images]


def load_identity(folder: str | Path) -> BenchIdentity:
    folder = Path(folder)
    images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    if not images:
        raise ConfigError(f"identity folder {folder} holds no reference photos "
                          f"({', '.join(IMAGE_SUFFIXES)}); put one or more photos of the person there")
    meta: dict[str, Any] = {}
    if (folder / IDENTITY_FILE).exists():
        meta = json.loads((folder / IDENTITY_FILE).read_text())
    return BenchIdentity(folder.name, images, meta.get("id_prompt"), meta.get("backends", {}))


def load_identities(paths: Iterable[str | Path]) -> list[BenchIdentity]:
    """Identity folders; a folder without photos but with sub-folders is a set of them."""
    found: list[BenchIdentity] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(f"identity path {path} is not a folder of reference photos")
        subfolders = sorted(p for p in path.iterdir() if p.is_dir())
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        found += [load_identity(path)] if has_images or not subfolders else \
            [load_identity(p) for p in subfolders]
    names = [i.name for i in found]
    if len(set(names)) != len(names):
        raise ConfigError(f"identity names must be unique (folder names): {names}")
    return found


# -- the grid ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One backend under one setting."""

    backend: str
    setting: Setting


@dataclass(frozen=True)
class GenerationParams:
    """What every item of a run shares: the sampler and the image size."""

    steps: int = 50
    guidance_scale: float = 5.0
    height: int = 1024
    width: int = 1024
    negative_prompt: str | None = None


@dataclass(frozen=True)
class WorkItem:
    """One image: a scenario x identity x prompt x seed (or a base-model reference image)."""

    backend: str
    setting: str
    identity: str
    prompt_set: str
    prompt_index: int
    prompt: str
    seed: int
    checkpoint: str | None = None
    fingerprint: str = ""  # hash of everything that decides the pixels
    #: the persons of a multi item (several people in one image), in order; () otherwise.
    #: ``identity`` then names them all, joined by "+".
    people: tuple[str, ...] = ()

    @property
    def item_id(self) -> str:
        """Stable, readable, filesystem-safe: ``backend/setting/identity/set-NN/sSEED``,
        under ``multi/`` for a multi item (its settings are not the grid's)."""
        item = (f"{self.backend}/{self.setting}/{self.identity}/"
                f"{self.prompt_set}-{self.prompt_index:02d}/s{self.seed}")
        return f"multi/{item}" if self.is_multi else item

    @property
    def is_multi(self) -> bool:
        return bool(self.people)

    @property
    def is_reference(self) -> bool:
        return self.setting == REFERENCE_SETTING

    @property
    def pipeline_key(self) -> tuple[str, str | None]:
        return (self.backend, self.checkpoint)


@dataclass
class MadeImage:
    """What generating one work item made.

    image: the PIL image; diagnostics: the wrapper's (``model_rows``, ``model_calls``, ...);
    fusion: the fusion maps (S, N, 1, h, w) and their step indices, drawn as the item's
    fusion strip, or None; regions: ``result.regions``, outlined on that strip, or None;
    record: further fields the manifest keeps with the image (a multi item's regions).
    """

    image: Any
    diagnostics: dict[str, Any] = field(default_factory=dict)
    fusion: tuple[Any, Any] | None = None
    regions: list[Any] | None = None
    record: dict[str, Any] = field(default_factory=dict)


def fingerprint(*parts: Any) -> str:
    """A short content hash of JSON-serialisable parts (configs, parameters, inputs)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def identity_inputs(identity: BenchIdentity, backend: str) -> list[Any]:
    """What of a person decides a backend's pixels: its ID prompts and its photos' contents,
    not their paths, so that a moved run folder keeps its finished items."""
    return [file_hash(p) for p in identity.images] + [identity.id_prompt,
                                                      identity.option(backend, "id_prompt")]


def build_grid(backends: Sequence[str], settings: Sequence[Setting],
               identities: Sequence[BenchIdentity], prompt_sets: Sequence[PromptSet],
               seeds: Sequence[int], params: GenerationParams,
               checkpoints: dict[str, str | None] | None = None,
               base_model: str | None = None) -> list[WorkItem]:
    """Every backend x setting x identity x prompt x seed, pipeline-major order."""
    checkpoints = checkpoints or {}
    items = []
    for backend in backends:
        for identity in identities:
            checkpoint = identity.option(backend, "checkpoint", checkpoints.get(backend))
            inputs = identity_inputs(identity, backend)
            for setting in settings:
                for prompt_set in prompt_sets:
                    for index, prompt in enumerate(prompt_set.prompts):
                        for seed in seeds:
                            items.append(WorkItem(
                                backend, setting.name, identity.name, prompt_set.name, index,
                                prompt, int(seed), checkpoint,
                                fingerprint(setting_record(setting),
                                            dataclasses.asdict(params), base_model, checkpoint,
                                            inputs, prompt, seed)))
    # Items that share a pipeline (backend, checkpoint) run back to back: one load each.
    order = {key: n for n, key in enumerate(dict.fromkeys(i.pipeline_key for i in items))}
    return sorted(items, key=lambda i: order[i.pipeline_key])


def reference_grid(prompt_set: PromptSet, count_per_prompt: int, params: GenerationParams,
                   base_model: str | None = None) -> list[WorkItem]:
    """The FID reference set: the base model alone, ``count_per_prompt`` seeds per prompt."""
    items = []
    for index, prompt in enumerate(prompt_set.prompts):
        for k in range(count_per_prompt):
            seed = REFERENCE_SEED_OFFSET + k
            items.append(WorkItem(REFERENCE_BACKEND, REFERENCE_SETTING, "none", prompt_set.name,
                                  index, prompt, seed, None,
                                  fingerprint(dataclasses.asdict(params), base_model, prompt, seed)))
    return items


def shard(items: Sequence[WorkItem], rank: int, world_size: int) -> list[WorkItem]:
    """This rank's share: every ``world_size``-th item from ``rank`` (balanced, disjoint)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size})")
    return list(items[rank::world_size])
