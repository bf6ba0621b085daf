"""Command line of the benchmark: ``beyondfacial bench ...`` (or ``python -m benchmarks ...``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

TINY_STEPS = 3
TINY_SIZE = 64
TINY_PROMPTS = 2  # per prompt set
TINY_IDENTITIES = 2
TINY_THREADS = 1  # tiny models gain nothing from more, and idle OpenMP threads spin
SCENARIOS = ("single", "multi")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyondfacial bench",
        description="Cross-method benchmark: every installed backend with and without "
                    "BeyondFacial, the paper's Table 1 metrics and the close-up measures. "
                    "Resumable (rerun the same command); shards under `accelerate launch`.")
    parser.add_argument("--out", required=True, help="run folder (images, metrics, report)")
    parser.add_argument("--tiny", action="store_true",
                        help="offline tiny setup: random tiny pipelines and metric models, "
                             "2 identities x 2 prompts per set x 1 seed, 64 px, 3 steps")
    parser.add_argument("--backends", help="comma-separated; default: every installed backend")
    parser.add_argument("--settings", help="comma-separated setting names; default: all built-in "
                                           "(tiny: baseline,full)")
    parser.add_argument("--settings-file", help="JSON {name: BFConfig fields} of custom settings")
    parser.add_argument("--identities", action="append",
                        help="folder of reference photos, or a folder of such folders (repeatable)")
    parser.add_argument("--prompt-sets", default="action,expression",
                        help="shipped set names or JSON/text files, comma-separated")
    parser.add_argument("--scenarios", default="single",
                        help="comma-separated: 'single' (one person per image, the paper's "
                             "grid) and/or 'multi' (two people per image); default single")
    parser.add_argument("--multi-prompts", default="two_person",
                        help="multi: prompt set (shipped name or JSON/text file)")
    parser.add_argument("--multi-pairs", choices=("consecutive", "all"), default="consecutive",
                        help="multi: pairs of identities, k with k+1 (wrapping) or every pair")
    parser.add_argument("--multi-max-pairs", type=int, default=None,
                        help="multi: use the first N pairs")
    parser.add_argument("--multi-regions", choices=("halves", "auto"), default="halves",
                        help="multi: person 1 left half and person 2 right half, or 'auto' "
                             "(around the faces of the step-M1 preview)")
    parser.add_argument("--multi-match-threshold", type=float, default=None,
                        help="multi: ArcFace cosine (percent) from which a face is the "
                             "person's (default 30)")
    parser.add_argument("--prompts-per-set", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--seeds", default=None, help="comma list or a count N (0..N-1); "
                                                      "default 20 (tiny: 1)")
    parser.add_argument("--steps", type=int, default=None, help="default 50 (tiny: 3)")
    parser.add_argument("--size", type=int, default=None, help="square side; default 1024 (tiny: 64)")
    parser.add_argument("--host", choices=("sdxl", "flux"), default=None,
                        help="the base-model family; default: FLUX when --base-model is a FLUX "
                             "model, else SDXL (tiny: the tiny pipelines of that family)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="default 5.0 on SDXL, 3.5 (distilled guidance) on FLUX")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--base-model", help="diffusers SDXL folder or hub id")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="BACKEND=PATH, the identity method's checkpoint (repeatable)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; tiny: 1)")
    parser.add_argument("--metrics", help="comma-separated metric names; default: all installed")
    parser.add_argument("--dino", default="facebook/dino-vits16")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14")
    parser.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (FID)")
    parser.add_argument("--face-model", default="buffalo_l", help="insightface pack name or folder")
    parser.add_argument("--face-root", default=None)
    parser.add_argument("--fid-reference", help="folder of reference images for FID instead of "
                                                "base-model images generated by the run")
    parser.add_argument("--fid-reference-per-prompt", type=int, default=0,
                        help="base-model reference images per action prompt (default: #seeds)")
    parser.add_argument("--contact-sheet-seeds", type=int, default=1)
    parser.add_argument("--wait-timeout", type=float, default=None,
                        help="rank 0: seconds to wait for the other ranks (default: no limit)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _seeds(text: str | None, tiny: bool) -> list[int]:
    if text is None:
        return [0] if tiny else list(range(20))
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def _scenarios(text: str) -> tuple[bool, bool]:
    """(run the single-person grid, run the multi scenario) from ``--scenarios``."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(SCENARIOS)
    if unknown or not names:
        raise SystemExit(f"error: --scenarios takes {' and/or '.join(SCENARIOS)}, got {text!r}")
    return "single" in names, "multi" in names


def _tiny_identities(folder: Path) -> list[Path]:
    """Reference-photo folders for the tiny run: a few random pictures per person."""
    import numpy as np
    from PIL import Image

    from benchmarks.storage import atomic_write_bytes, atomic_write_image

    paths = []
    for number in range(TINY_IDENTITIES):
        person = folder / f"person{number}"
        if not (person / "identity.json").exists():  # written last: its presence means done
            rng = np.random.default_rng(number)
            for k in range(2):
                pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
                atomic_write_image(person / f"ref{k}.png", Image.fromarray(pixels))
            # The trigger word is DreamBooth's alone; other backends use their own ID prompt.
            trigger = ["sks", "zwx"][number % 2]
            meta = {"backends": {"dreambooth": {"id_prompt": f"a photo of {trigger} person"}}}
            atomic_write_bytes(person / "identity.json", (json.dumps(meta) + "\n").encode())
        paths.append(person)
    return paths


def rank_device(device: str | None) -> str:
    """The device this process uses: ``--device`` as given, except that a bare ``cuda`` (or
    no choice, with CUDA present) under a multi-process launch means this rank's own GPU,
    ``cuda:<LOCAL_RANK>``; otherwise every rank would crowd onto GPU 0. A launch that
    shows each process one GPU (CUDA_VISIBLE_DEVICES) keeps plain ``cuda``."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ and torch.cuda.device_count() > 1:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def spec_from_args(args: argparse.Namespace):
    from benchmarks.metrics import MetricModels
    from benchmarks.metrics.multi import MATCH_THRESHOLD
    from benchmarks.multi import MultiOptions
    from benchmarks.runner import BenchSpec
    from benchmarks.scenarios import (
        TINY_SETTINGS,
        GenerationParams,
        PromptSet,
        load_identities,
        load_prompt_set,
        load_settings,
    )

    out = Path(args.out)
    tiny = args.tiny
    setting_names = args.settings.split(",") if args.settings else (
        list(TINY_SETTINGS) if tiny and not args.settings_file else [])
    settings = load_settings(setting_names, args.settings_file)
    prompt_sets = [load_prompt_set(name) for name in args.prompt_sets.split(",")]
    per_set = args.prompts_per_set or (TINY_PROMPTS if tiny else None)
    if per_set:
        prompt_sets = [PromptSet(p.name, p.prompts[:per_set]) for p in prompt_sets]
    single, with_multi = _scenarios(args.scenarios)
    multi = None
    if with_multi:
        multi_prompts = load_prompt_set(args.multi_prompts)
        if per_set:
            multi_prompts = PromptSet(multi_prompts.name, multi_prompts.prompts[:per_set])
        threshold = (MATCH_THRESHOLD if args.multi_match_threshold is None
                     else args.multi_match_threshold)
        multi = MultiOptions(multi_prompts, pairs=args.multi_pairs,
                             max_pairs=args.multi_max_pairs, regions=args.multi_regions,
                             match_threshold=threshold)
    identity_paths = args.identities or (_tiny_identities(out / "tiny-identities") if tiny else None)
    if not identity_paths:
        raise SystemExit("error: --identities is required (folders of reference photos), "
                         "or pass --tiny")
    size = args.size or (TINY_SIZE if tiny else 1024)
    host = args.host or ("flux" if args.base_model and _is_flux(args.base_model) else "sdxl")
    guidance = args.guidance_scale if args.guidance_scale is not None else (
        3.5 if host == "flux" else 5.0)
    device = args.device
    if device is not None or not tiny:  # tiny pipelines stay where they are built: the CPU
        device = rank_device(device)
    checkpoints = {}
    for entry in args.checkpoint:
        backend, _, path = entry.partition("=")
        if not path:
            raise SystemExit(f"error: --checkpoint takes BACKEND=PATH, got {entry!r}")
        checkpoints[backend] = path
    models = MetricModels(dino=args.dino, clip=args.clip, inception=args.inception_weights,
                          face_model=args.face_model, face_root=args.face_root,
                          device=device or "cpu", tiny=tiny, cache_dir=out / "tiny-models")
    return BenchSpec(
        out=out, settings=settings, identities=load_identities(identity_paths),
        prompt_sets=prompt_sets, seeds=_seeds(args.seeds, tiny),
        params=GenerationParams(steps=args.steps or (TINY_STEPS if tiny else 50),
                                guidance_scale=guidance, height=size, width=size,
                                negative_prompt=args.negative_prompt),
        backends=args.backends.split(",") if args.backends else None, tiny=tiny,
        base_model=args.base_model, checkpoints=checkpoints, torch_dtype=args.dtype,
        device=device, metrics=args.metrics.split(",") if args.metrics else None, models=models,
        fid_reference_per_prompt=args.fid_reference_per_prompt,
        fid_reference_dir=Path(args.fid_reference) if args.fid_reference else None,
        contact_sheet_seeds=args.contact_sheet_seeds, progress=not args.no_progress,
        threads=args.threads or (TINY_THREADS if tiny else None), single=single, multi=multi,
        host=host)


def _is_flux(base_model: str) -> bool:
    from bf_core.hosts.flux import is_flux_model

    return is_flux_model(base_model)


def lone_cpu_launch() -> bool:
    """True under ``accelerate launch --cpu --num_processes N`` (N > 1), which starts one
    process: accelerate's CPU launcher spawns several only through MPI. It sets the
    rendezvous address for N > 1 but no ``WORLD_SIZE``, which is how this is recognised."""
    env = os.environ
    return (env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
            and "MASTER_ADDR" in env and "WORLD_SIZE" not in env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--speed" in argv:  # `beyondfacial bench --speed ...`: the speed benchmark's own options
        from benchmarks import speed

        return speed.main([a for a in argv if a != "--speed"])
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if args.tiny:
        # The tiny run is offline by definition: never let a library reach for a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Random-weight face detectors "find" many faces in any picture; saying so for every
        # image would bury the run's own output.
        from bf_core.faces import MultipleFacesWarning

        warnings.filterwarnings("ignore", category=MultipleFacesWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")
    if lone_cpu_launch():
        print("note: `accelerate launch --cpu` started this one process only (its CPU launcher "
              "needs MPI for more); for N processes without GPUs use `accelerate launch "
              "--multi_gpu --num_processes N ...` (torchrun; no GPU is needed) or set RANK and "
              "WORLD_SIZE per process. Running the whole grid here.", file=sys.stderr)
    from benchmarks.runner import run_benchmark

    result = run_benchmark(spec_from_args(args), wait_timeout=args.wait_timeout)
    for name, why in result.skipped_backends.items():
        print(f"note: backend {name!r} left out: it {why}", file=sys.stderr)
    print(f"rank {result.rank}/{result.world_size}: generated {result.generated} image(s), "
          f"scored {result.scored}")
    if result.report_dir is not None:
        print(f"report: {result.report_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
