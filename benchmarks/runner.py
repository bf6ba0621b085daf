"""The one runner: generate every image of the grid, score it, and merge into the report.

Resumable and loss-free: an item whose image (or metric row) is recorded in the manifest
with an intact file is never redone; anything else is (re)made, so a crashed or killed
run picks up where it stopped. Each image depends only on its own (backend, setting,
identity, prompt, seed) and the run's parameters: the seed drives a fresh CPU generator.
Metrics are computed from the PNG read back from disk, so a resumed item and a fresh one
give the same numbers.

Distributed: with ``RANK``/``WORLD_SIZE`` in the environment (``accelerate launch``,
``torchrun``) each rank takes every WORLD_SIZE-th item; rank 0 waits until the manifests
hold the whole grid, then writes the one merged report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.metrics import (
    MetricContext,
    MetricModels,
    Sample,
    installed_metrics,
    select_metrics,
)
from benchmarks.metrics.multi import MultiPeopleMetric
from benchmarks.multi import MultiOptions, build_multi_grid, make_multi_image
from benchmarks.scenarios import (
    BenchIdentity,
    GenerationParams,
    MadeImage,
    PromptSet,
    Setting,
    WorkItem,
    build_grid,
    fingerprint,
    reference_grid,
    setting_record,
    shard,
)
from benchmarks.storage import (
    Manifest,
    atomic_write_array,
    atomic_write_image,
    atomic_write_json,
    load_array,
    sha256_file,
)
from benchmarks.targets import BackendTarget, base_pipeline, installed_target
from bf_core.extras import PipelineSetup

#: testing hook: SIGKILL this process after this many images were generated and recorded
EXIT_AFTER_ENV = "BEYONDFACIAL_BENCH_EXIT_AFTER"
_SIGKILL = getattr(signal, "SIGKILL", None)  # absent on Windows: a hard exit stands in
#: the exit status of a run killed by that hook, as ``subprocess`` reports it
KILLED_EXIT_CODE = -_SIGKILL if _SIGKILL is not None else 86
#: fields of MetricModels that do not change a metric's value (where, and the loaded cache)
_MODEL_FIELDS_IGNORED = ("_cache", "device", "cache_dir")
FID_PROMPT_SET = "action"


@dataclass
class BenchSpec:
    """One benchmark run. ``out`` holds images, metrics, manifests and the report."""

    out: Path
    settings: list[Setting]
    identities: list[BenchIdentity]
    prompt_sets: list[PromptSet]
    seeds: list[int]
    params: GenerationParams = field(default_factory=GenerationParams)
    backends: list[str] | None = None  # None: every installed backend that can run here
    tiny: bool = False
    base_model: str | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    torch_dtype: str = "float16"
    device: str | None = None
    metrics: list[str] | None = None  # None: every installed metric
    models: MetricModels = field(default_factory=MetricModels)
    fid_reference_per_prompt: int = 0  # base-model images per FID prompt; 0: as many as seeds
    fid_reference_dir: Path | None = None  # a user folder instead of generated references
    contact_sheet_seeds: int = 1
    progress: bool = True
    threads: int | None = None  # torch CPU threads during the run; None: leave torch's setting
    single: bool = True  # the single-person grid (the paper's protocol)
    multi: MultiOptions | None = None  # the multi scenario (several people); None: not run
    host: str = "sdxl"  # the base-model family: "sdxl" or "flux"

    @property
    def model_key(self) -> str | None:
        """What names the base model in each item's fingerprint: the base model, or for a
        tiny FLUX run "tiny-flux" (so a run folder never mixes it with tiny SDXL images)."""
        if self.base_model or self.host == "sdxl":
            return self.base_model
        return f"tiny-{self.host}"


@dataclass
class RunResult:
    rank: int
    world_size: int
    generated: int
    scored: int
    skipped_backends: dict[str, str]
    report_dir: Path | None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    return (rank, world) if world > 1 else (0, 1)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch CPU threads and put the previous number back afterwards.

    Tiny models gain nothing from several threads, and idle OpenMP workers spin: on a
    busy machine two threads burn many times the CPU time of one for the same result.
    """
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _select_cuda_device(device: str | None) -> None:
    """Make ``cuda:<k>`` the current device, so that the peak-memory counters (which read
    the current device) and any allocation without an explicit device follow this rank."""
    if device and device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(torch.device(device))


def _kill_self() -> None:
    """Die as ``kill -9`` would: no cleanup, no flushing; only what is on disk survives."""
    if _SIGKILL is None:
        os._exit(KILLED_EXIT_CODE)
    os.kill(os.getpid(), _SIGKILL)  # the kernel ends the process before this returns


def _dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _progress(iterable, spec: BenchSpec, desc: str, rank: int):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"[rank {rank}] {desc}" if rank else desc,
                disable=not spec.progress, position=rank, leave=True, file=sys.stderr)


class _PipelineCache:
    """Holds one pipeline set-up at a time (items are ordered pipeline-major)."""

    def __init__(self):
        self.key: Any = None
        self.setup: PipelineSetup | None = None

    def get(self, key: Any, build) -> PipelineSetup:
        if key != self.key:
            self.setup = None
            gc.collect()
            _empty_cuda_cache()
            self.setup, self.key = build(), key
        return self.setup


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_memory_mb(device: Any) -> tuple[float | None, str]:
    """(peak MB, what it measures): CUDA allocations of this item, or the process RSS peak."""
    import torch

    if torch.cuda.is_available() and str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    try:
        import resource
    except ImportError:  # not on POSIX
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "process_rss"


class Runner:
    """Runs one rank's share of a ``BenchSpec``; ``run()`` does everything."""

    def __init__(self, spec: BenchSpec, rank: int | None = None, world_size: int | None = None):
        self.spec = spec
        detected = rank_and_world()
        self.rank = detected[0] if rank is None else rank
        self.world_size = detected[1] if world_size is None else world_size
        self.out = Path(spec.out)
        self.manifest = Manifest(self.out, self.rank)
        self.events = self.out / f"events-rank{self.rank:05d}.jsonl"
        self.skipped: dict[str, str] = {}
        self.targets: dict[str, BackendTarget] = self._targets()
        self.metric_list = select_metrics(installed_metrics(), spec.metrics)
        #: the multi scenario's rows without images, (backend, setting) -> why; its notes
        self.multi_left_out: dict[tuple[str, str], str] = {}
        self.multi_notes: list[str] = []
        self.multi_metric = (MultiPeopleMetric(spec.multi.match_threshold)
                             if spec.multi is not None else None)
        self.grid = self._grid()
        self._identities = {i.name: i for i in spec.identities}
        self._identity_images: dict[str, list] = {}
        self._exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
        self.generated = 0
        self.scored = 0

    # -- the grid -----------------------------------------------------------------------------
    def _targets(self) -> dict[str, BackendTarget]:
        from bf_core.plugins import get_registry

        installed = get_registry().backends()
        host = self.spec.host
        names = self.spec.backends or sorted(n for n, b in installed.items() if host in b.hosts)
        unknown = [n for n in names if n not in installed]
        if unknown:
            raise ValueError(f"backend(s) {unknown} are not installed; installed: "
                             f"{', '.join(sorted(installed))} (see `beyondfacial backends`)")
        targets = {}
        for name in names:
            if host not in installed[name].hosts:
                self.skipped[name] = (f"serves {', '.join(installed[name].hosts)} pipelines, "
                                      f"not {host}")
                continue
            target = installed_target(name, tiny=self.spec.tiny, base_model=self.spec.base_model,
                                      host=host,
                                      torch_dtype=None if self.spec.tiny else _dtype(self.spec.torch_dtype),
                                      device=self.spec.device)
            if isinstance(target, str):
                self.skipped[name] = target
            else:
                targets[name] = target
        if not targets:
            raise ValueError("no backend can run here: " + "; ".join(
                f"{k} {v}" for k, v in self.skipped.items()))
        return targets

    def _grid(self) -> list[WorkItem]:
        spec = self.spec
        items = build_grid(list(self.targets), spec.settings, spec.identities, spec.prompt_sets,
                           spec.seeds, spec.params, spec.checkpoints,
                           spec.model_key) if spec.single else []
        if spec.multi is not None:
            from bf_core.plugins import get_registry
            from bf_core.protocols import max_people

            registry = get_registry()
            plan = build_multi_grid({name: max_people(registry.get_backend(name))
                                     for name in self.targets}, spec.multi, spec.identities,
                                    spec.seeds, spec.params, spec.checkpoints, spec.model_key)
            self.multi_left_out, self.multi_notes = plan.left_out, plan.notes
            # A backend's multi items join its single-person ones: one pipeline load each.
            order = {key: n for n, key in enumerate(dict.fromkeys(
                i.pipeline_key for i in items + plan.items))}
            items = sorted(items + plan.items, key=lambda i: order[i.pipeline_key])
        if self.needs_generated_reference:
            fid_set = next(p for p in spec.prompt_sets if p.name == FID_PROMPT_SET)
            count = spec.fid_reference_per_prompt or len(spec.seeds)
            items += reference_grid(fid_set, count, spec.params, spec.model_key)
        return items

    @property
    def needs_generated_reference(self) -> bool:
        return (self.spec.single and any(m.kind == "set" for m in self.metric_list)
                and self.spec.fid_reference_dir is None
                and any(p.name == FID_PROMPT_SET for p in self.spec.prompt_sets))

    @property
    def my_items(self) -> list[WorkItem]:
        return shard(self.grid, self.rank, self.world_size)

    # -- helpers ------------------------------------------------------------------------------
    def image_path(self, item: WorkItem) -> str:
        return f"images/{item.item_id}.png"

    def _log(self, event: str, item: WorkItem) -> None:
        with open(self.events, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": event, "item": item.item_id, "pid": os.getpid()}) + "\n")

    def identity_images(self, name: str) -> list:
        if name not in self._identity_images:
            self._identity_images[name] = self._identities[name].load_images()
        return self._identity_images[name]

    def _size(self) -> tuple[int, int]:
        return (self.spec.params.width, self.spec.params.height)

    # -- phase 1: images ----------------------------------------------------------------------
    def generate_all(self) -> None:
        pipes = _PipelineCache()
        for item in _progress(self.my_items, self.spec, "generating", self.rank):
            if self.manifest.verified("image", item.item_id, item.fingerprint, self._size()):
                continue
            self.generate(item, pipes)
            self.generated += 1
            if self._exit_after and self.generated >= self._exit_after:
                _kill_self()  # the kill-and-resume test's SIGKILL, at a known point
        pipes.setup = None

    def _build(self, item: WorkItem) -> PipelineSetup:
        spec = self.spec
        if item.is_reference:
            dtype = None if spec.tiny else _dtype(spec.torch_dtype)
            setup = PipelineSetup(base_pipeline(tiny=spec.tiny, base_model=spec.base_model,
                                                torch_dtype=dtype, device=spec.device,
                                                host=spec.host))
        else:
            setup = self.targets[item.backend].build_pipeline(item.checkpoint)
        setup.pipe.set_progress_bar_config(disable=True)
        return setup

    def generate(self, item: WorkItem, pipes: _PipelineCache) -> None:
        import torch

        import bf_core

        setup = pipes.get(item.pipeline_key, lambda: self._build(item))
        pipe = setup.pipe
        params = self.spec.params
        # A backend may need its own wording of the scene prompt (PhotoMaker's trigger word);
        # metrics, file names and resume fingerprints keep the scene prompt itself.
        prompt = item.prompt if item.is_reference else self.targets[item.backend].prompt(item.prompt)
        call = dict(prompt=prompt, negative_prompt=params.negative_prompt,
                    num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
                    height=params.height, width=params.width, output_type="pil",
                    generator=torch.Generator(device="cpu").manual_seed(item.seed))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if item.is_reference:
            made = MadeImage(pipe(**call).images[0])
        elif item.is_multi:
            made = self._multi_image(item, setup, call)
        else:
            setting = next(s for s in self.spec.settings if s.name == item.setting)
            identity = self._identities[item.identity]
            extra = {**setup.options, **self.targets[item.backend].call_kwargs(
                identity, self.identity_images(item.identity))}
            bf = bf_core.wrap(pipe, backend=item.backend, config=setting.config)
            if setting.refine_faces:
                # offline, the benchmark's random face pack stands in for the face analysis
                extra.update(refine_faces=True, refine_face_analyzer=(
                    self.spec.models.face_analyzer() if self.spec.tiny else None))
            result = bf(**call, **extra, return_fusion_maps=setting.config.enabled)
            fusion = None
            if result.fusion_maps is not None and len(result.fusion_steps):
                fusion = (result.fusion_maps, result.fusion_steps)
            made = MadeImage(result.images[0], result.diagnostics, fusion)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak, peak_kind = _peak_memory_mb(getattr(pipe, "device", "cpu"))
        image, diagnostics = made.image, made.diagnostics
        files = {"image": {"path": self.image_path(item),
                           "sha256": atomic_write_image(self.out / self.image_path(item), image)}}
        id_share = None
        if made.fusion is not None:
            from bf_core.visualize import render_fusion_strip

            maps, steps = made.fusion
            strip = render_fusion_strip(maps, steps, sample=0, image=image, regions=made.regions)
            path = f"fusion/{item.item_id}.png"
            files["fusion_strip"] = {"path": path,
                                     "sha256": atomic_write_image(self.out / path, strip)}
            # bool maps (one ID line) or line numbers (one per person): any ID line's share
            id_share = 100.0 * float((maps[-1, 0] > 0).float().mean())
        self.manifest.append({
            "kind": "image", "item": item.item_id, "fingerprint": item.fingerprint,
            "files": files, "seconds": seconds, "model_rows": diagnostics.get("model_rows"),
            "model_calls": diagnostics.get("model_calls"), "peak_memory_mb": peak,
            "peak_memory_kind": peak_kind, "id_region_final": id_share,
            "device": str(getattr(pipe, "device", "cpu")), "rank": self.rank, **made.record})
        self._log("generated", item)

    def _multi_image(self, item: WorkItem, setup: PipelineSetup, call: dict[str, Any]
                     ) -> MadeImage:
        target = self.targets[item.backend]
        keywords = [target.call_kwargs(self._identities[name], self.identity_images(name))
                    for name in item.people]
        photos = [self.identity_images(name) for name in item.people]
        # "auto" regions search the preview with the library's default analyser; the tiny
        # run has no real pack, so the benchmark's random one stands in.
        preview = self.spec.models.face_analyzer() if self.spec.tiny else None
        return make_multi_image(item, setup, keywords, photos, call, self.spec.multi.regions,
                                preview_face_analyzer=preview)

    # -- phase 2: metrics ---------------------------------------------------------------------
    def metrics_fingerprint(self, item: WorkItem, image_sha: str) -> str:
        # Read the fields directly: dataclasses.asdict would deep-copy the loaded models.
        models = {f.name: getattr(self.spec.models, f.name)
                  for f in dataclasses.fields(self.spec.models)
                  if f.name not in _MODEL_FIELDS_IGNORED}
        if item.is_multi:
            return fingerprint(item.fingerprint, image_sha, self.multi_metric.name,
                               self.multi_metric.threshold, models)
        return fingerprint(item.fingerprint, image_sha, [m.name for m in self.metric_list], models)

    def score_all(self) -> None:
        context = MetricContext(self.spec.models)
        for item in _progress(self.my_items, self.spec, "scoring", self.rank):
            record = self.manifest.get("image", item.item_id)
            if record is None:
                continue
            image_sha = record["files"]["image"]["sha256"]
            key = self.metrics_fingerprint(item, image_sha)
            if self.manifest.verified("metrics", item.item_id, key):
                continue
            self.score(item, image_sha, key, context)
            self.scored += 1

    def score(self, item: WorkItem, image_sha: str, key: str, context: MetricContext) -> None:
        from PIL import Image

        with Image.open(self.out / self.image_path(item)) as handle:
            image = handle.convert("RGB")
        if item.is_multi:
            self._score_multi(item, image, image_sha, key, context)
            return
        identity = None if item.is_reference else self._identities[item.identity]
        sample = Sample(image=image, prompt=item.prompt, identity=identity, item=item)
        values: dict[str, float | None] = {}
        files: dict[str, dict[str, str]] = {}
        for metric in self.metric_list:
            if metric.kind == "set":
                path = f"features/{metric.name}/{item.item_id}.npy"
                files[f"features:{metric.name}"] = {
                    "path": path,
                    "sha256": atomic_write_array(self.out / path, metric.features(sample, context))}
            elif not item.is_reference:
                values.update(metric.score(sample, context))
        row_path = f"metrics/{item.item_id}.json"
        row = {"item": item.item_id, "image_sha256": image_sha, "values": values}
        files["row"] = {"path": row_path, "sha256": atomic_write_json(self.out / row_path, row)}
        self.manifest.append({"kind": "metrics", "item": item.item_id, "fingerprint": key,
                              "files": files, "image_sha256": image_sha, "rank": self.rank})
        self._log("scored", item)

    def _score_multi(self, item: WorkItem, image: Any, image_sha: str, key: str,
                     context: MetricContext) -> None:
        """The multi metrics of one image; the row also keeps each person's matched face."""
        record = self.manifest.get("image", item.item_id) or {}
        regions = record.get("regions")
        sample = Sample(image=image, prompt=item.prompt, identity=None, item=item)
        values, matches = self.multi_metric.score(
            sample, [self._identities[name] for name in item.people],
            None if regions is None else [None if r is None else tuple(r) for r in regions],
            context)
        row_path = f"metrics/{item.item_id}.json"
        row = {"item": item.item_id, "image_sha256": image_sha, "values": values,
               "matches": matches}
        files = {"row": {"path": row_path, "sha256": atomic_write_json(self.out / row_path, row)}}
        self.manifest.append({"kind": "metrics", "item": item.item_id, "fingerprint": key,
                              "files": files, "image_sha256": image_sha, "rank": self.rank})
        self._log("scored", item)

    # -- phase 3: merge -----------------------------------------------------------------------
    def complete(self) -> list[WorkItem]:
        """Grid items still missing an intact image or metric row (reads every rank's manifest)."""
        self.manifest.reload()
        missing = []
        for item in self.grid:
            record = self.manifest.verified("image", item.item_id, item.fingerprint, self._size())
            if record is None or self.manifest.verified(
                    "metrics", item.item_id,
                    self.metrics_fingerprint(item, record["files"]["image"]["sha256"])) is None:
                missing.append(item)
        return missing

    def wait_for_other_ranks(self, timeout: float | None, poll: float = 2.0) -> list[WorkItem]:
        start = time.monotonic()
        missing = self.complete()
        while missing and self.world_size > 1:
            if timeout is not None and time.monotonic() - start > timeout:
                break
            time.sleep(poll)
            missing = self.complete()
        return missing

    def collect_rows(self) -> list[dict[str, Any]]:
        """One row per grid item: its keys, image record, metric values (and matches)."""
        rows = []
        for item in self.grid:
            image = self.manifest.get("image", item.item_id) or {}
            metrics = self.manifest.get("metrics", item.item_id)
            stored: dict[str, Any] = {}
            if metrics is not None:
                stored = json.loads((self.out / metrics["files"]["row"]["path"]).read_text())
            # "matches": a multi item's matched face per person (drawn on its contact sheet)
            rows.append({"item": item, "image": image, "values": stored.get("values", {}),
                         "matches": stored.get("matches"),
                         "features": {k.split(":", 1)[1]: v["path"]
                                      for k, v in (metrics or {}).get("files", {}).items()
                                      if k.startswith("features:")}})
        return rows

    def reference_features(self, metric: Any, rows: list[dict[str, Any]]):
        """(m, d) reference features of a set metric: generated base-model images or a folder."""
        import numpy as np

        if self.spec.fid_reference_dir is None:
            arrays = [load_array(self.out / r["features"][metric.name]) for r in rows
                      if r["item"].is_reference and metric.name in r["features"]]
            return np.stack(arrays) if arrays else np.zeros((0, 1))
        return self._folder_features(metric, Path(self.spec.fid_reference_dir))

    def _folder_features(self, metric: Any, folder: Path):
        import numpy as np
        from PIL import Image

        from benchmarks.scenarios import IMAGE_SUFFIXES

        context = MetricContext(self.spec.models)
        arrays = []
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in _progress(paths, self.spec, "reference features", self.rank):
            cache = self.out / "features" / metric.name / "reference-folder" / f"{sha256_file(path)}.npy"
            if cache.exists():
                try:
                    arrays.append(load_array(cache))
                    continue
                except (OSError, ValueError):
                    pass  # a damaged cache entry: compute it again
            with Image.open(path) as handle:
                sample = Sample(handle.convert("RGB"), "", None, None)
            feature = metric.features(sample, context)
            atomic_write_array(cache, feature)
            arrays.append(feature)
        return np.stack(arrays) if arrays else np.zeros((0, 1))

    def run(self, report: bool = True, wait_timeout: float | None = None) -> RunResult:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self._write_run_info()
        report_dir = None
        _select_cuda_device(self.spec.device)
        with torch_threads(self.spec.threads):
            self.generate_all()
            self.score_all()
            if report and self.rank == 0:
                from benchmarks.report import write_report

                missing = self.wait_for_other_ranks(wait_timeout)
                report_dir = write_report(self, missing)
        return RunResult(self.rank, self.world_size, self.generated, self.scored, self.skipped,
                         report_dir)

    def _write_run_info(self) -> None:
        spec = self.spec
        info = {"backends": list(self.targets), "skipped_backends": self.skipped,
                "settings": {s.name: setting_record(s) for s in spec.settings},
                "identities": {i.name: [str(p) for p in i.images] for i in spec.identities},
                "prompt_sets": {p.name: list(p.prompts) for p in spec.prompt_sets},
                "seeds": list(spec.seeds), "params": dataclasses.asdict(spec.params),
                "tiny": spec.tiny, "host": spec.host, "base_model": spec.base_model, "checkpoints": spec.checkpoints,
                "metrics": [m.name for m in self.metric_list], "world_size": self.world_size,
                "items": len(self.grid), "single": spec.single,
                "multi": None if spec.multi is None else {
                    **dataclasses.asdict(spec.multi),
                    "left_out": {f"{b}/{s}": why for (b, s), why in self.multi_left_out.items()},
                    "notes": self.multi_notes}}
        atomic_write_json(self.out / "run.json", info)


def run_benchmark(spec: BenchSpec, rank: int | None = None, world_size: int | None = None,
                  report: bool = True, wait_timeout: float | None = None) -> RunResult:
    """Run this process's share of ``spec`` and, on rank 0, write the merged report."""
    return Runner(spec, rank, world_size).run(report=report, wait_timeout=wait_timeout)
