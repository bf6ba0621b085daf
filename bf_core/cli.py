"""The ``beyondfacial`` command: generate, backends, env, demo, app, bench.

Only the standard library is imported at module level, so ``beyondfacial --help`` answers
at once; torch and diffusers load inside the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

REAL_WEIGHTS_HINT = (
    "To run with real weights: beyondfacial generate --backend photomaker "
    "--base-model stabilityai/stable-diffusion-xl-base-1.0 --checkpoint photomaker-v2.bin "
    "--id-image me.jpg --prompt \"a person img kneeling by a lake\" (README.md, 'Real weights').")


# -- argument helpers -------------------------------------------------------------------------
def _threshold(text: str) -> int | float:
    """'10' is a step index, '0.2' a fraction of the step count."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an int step index or a fraction, got {text!r}") from exc


def _temperature(text: str) -> float | str:
    return text if text == "sqrt_d" else float(text)


def add_refine_request_arguments(parser: argparse.ArgumentParser) -> None:
    """``generate``'s face-refine request (the pass's knobs are in the settings group)."""
    parser.add_argument("--refine-faces", action="store_true",
                        help="a second pass over each small face with the identity machinery "
                             "on (docs/refine.md); the image before it is written as "
                             "*_unrefined")
    parser.add_argument("--refine-box", action="append", type=_refine_box,
                        metavar="X0,Y0,X1,Y1",
                        help="a face to refine, in fractions of the image (repeatable; "
                             "default: the faces found by the face analysis)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Every knob of BFConfig, IdAFConfig and IdAPConfig as an option (defaults: the paper's)."""
    group = parser.add_argument_group("BeyondFacial settings (defaults: the paper's)")
    group.add_argument("--disable", action="store_true", help="method off: the backend's stock algorithm")
    group.add_argument("--idaf-start", type=_threshold, default=0.2, help="M1: step index or fraction")
    group.add_argument("--idap-start", type=_threshold, default=0.3, help="M2: step index or fraction")
    group.add_argument("--no-idaf", action="store_true", help="ablation: never run the ID line")
    group.add_argument("--no-idap", action="store_true", help="ablation: never prepend ID tokens")
    group.add_argument("--lambda-id", type=float, default=5.0)
    group.add_argument("--lambda-sem", type=float, default=1.0)
    group.add_argument("--lambda-mode", choices=("temperature", "weight"), default="temperature")
    group.add_argument("--smoothing", choices=("avgpool", "downup", "none"), default="avgpool")
    group.add_argument("--smooth-kernel", type=int, default=4)
    group.add_argument("--saliency", choices=("guided", "cfg_delta", "x0"), default="guided")
    group.add_argument("--idap-tokens", type=int, default=8, help="K")
    group.add_argument("--idap-seed", type=int, default=0)
    group.add_argument("--idap-temperature", type=_temperature, default=None)
    group.add_argument("--idap-negative", choices=("aggregate", "zeros"), default="aggregate")
    group.add_argument("--idap-query-file", default=None)
    group.add_argument("--semantic-adapters", choices=("off", "on"), default="off")
    group.add_argument("--share-negative", action="store_true")
    group.add_argument("--no-batch-lines", action="store_true",
                       help="one UNet call per line instead of one row-masked call for both")
    group.add_argument("--idap-people", choices=("all", "none"), default="all",
                       help="several people: prepend every person's IdAP tokens, or none")
    group.add_argument("--auto-region-scale", type=float, default=2.5,
                       help="box=auto: the face found in the preview, scaled by this")
    group.add_argument("--auto-region-fallback", choices=("bands", "error"), default="bands",
                       help="box=auto with too few faces: vertical bands, or an error")
    refine = parser.add_argument_group("face refine (with --refine-faces; docs/refine.md)")
    refine.add_argument("--refine-strength", type=float, default=0.45)
    refine.add_argument("--refine-steps", type=int, default=20,
                        help="about this many steps really run in the pass")
    refine.add_argument("--refine-max-face-px", type=int, default=256,
                        help="refine only faces whose short side is below this")
    refine.add_argument("--refine-max-faces", type=int, default=1, help="per person")
    refine.add_argument("--refine-work-size", type=int, default=None,
                        help="the crop's side in the pass (default: the model's native size)")
    refine.add_argument("--refine-identity", choices=("on", "off"), default="on",
                        help="off: the ablation without the identity machinery in the pass")


def config_from_args(args: argparse.Namespace):
    from bf_core.config import BFConfig, IdAFConfig, IdAPConfig, RefineConfig

    refine = RefineConfig(strength=args.refine_strength, effective_steps=args.refine_steps,
                          max_face_px=args.refine_max_face_px, max_faces=args.refine_max_faces,
                          work_size=args.refine_work_size, identity=args.refine_identity)
    return BFConfig(
        enabled=not args.disable, idaf_start=args.idaf_start, idap_start=args.idap_start,
        use_idaf=not args.no_idaf, use_idap=not args.no_idap,
        idaf=IdAFConfig(lambda_id=args.lambda_id, lambda_sem=args.lambda_sem,
                        lambda_mode=args.lambda_mode, smoothing=args.smoothing,
                        smooth_kernel=args.smooth_kernel, saliency=args.saliency),
        idap=IdAPConfig(num_tokens=args.idap_tokens, seed=args.idap_seed,
                        temperature=args.idap_temperature, negative=args.idap_negative,
                        query_file=args.idap_query_file),
        semantic_adapters=args.semantic_adapters, share_negative=args.share_negative,
        batch_lines=not args.no_batch_lines, idap_people=args.idap_people,
        auto_region_scale=args.auto_region_scale,
        auto_region_fallback=args.auto_region_fallback, refine=refine)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    names = ("beyondfacial", "torch", "diffusers", "transformers", "peft", "accelerate",
             "safetensors", "pluggy", "insightface", "onnxruntime", "onnxruntime-gpu")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise SystemExit(f"error: would overwrite {', '.join(existing)}; choose another --out "
                         "folder or pass --overwrite")


def _save_image(image, path: Path) -> None:
    """Write via a temporary file so an interrupted run never leaves a half-written image."""
    tmp = path.with_name(path.name + ".partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# -- commands ---------------------------------------------------------------------------------
def cmd_backends(args: argparse.Namespace) -> int:
    """From metadata, importing no plugin (bf_core.inventory); ``--check`` loads every plugin,
    and a process that has loaded them already answers from its registry."""
    from bf_core import plugins

    check = getattr(args, "check", False)
    registry = plugins.get_registry() if check else plugins.loaded_registry()
    if registry is None:
        from bf_core.inventory import backend_listing

        listing = backend_listing()
    else:
        listing = registry_listing(registry)
    print(json.dumps(listing, indent=2))
    return 0


def registry_listing(registry) -> list[dict[str, Any]]:
    """The loaded plugins as ``backends --check`` lists them: what each registered, or why not."""
    listing = []
    for name, backend in sorted(registry.backends().items()):
        plugin = registry.backend_plugin(name)
        record = next((p for p in registry.plugins if p.name == plugin), None)
        listing.append({
            "name": name, "kind": "backend", "status": "loaded", "plugin": plugin,
            "package": record.distribution if record else None,
            "version": record.version if record else None,
            "hosts": list(backend.hosts), "priority": backend.priority,
            "recognizes": backend.recognizes_description,
            "default_id_prompt": backend.default_id_prompt,
        })
    for name, host in sorted(registry.hosts().items()):
        listing.append({"name": name, "kind": "host", "status": "loaded",
                        "recognizes": host.recognizes_description})
    for record in registry.plugins:
        if record.status != "loaded":
            listing.append({"name": record.name, "kind": "plugin", "status": record.status,
                            "plugin": record.name, "package": record.distribution,
                            "version": record.version, "hook": record.hook,
                            "error": record.error})
    return listing


def cmd_env(args: argparse.Namespace) -> int:
    """Versions from metadata and the devices as far as files tell; ``--check`` imports torch
    for its own answers."""
    from bf_core.inventory import device_probe

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "versions": _versions(), "devices": device_probe()}
    if getattr(args, "check", False):
        info["devices"].update(torch_devices())
    print(json.dumps(info, indent=2))
    return 0


def torch_devices() -> dict[str, Any]:
    """torch's own view of the devices (imports torch, seconds of CPU: ``env --check``)."""
    try:
        import torch
    except ImportError as exc:
        return {"checked": True, "error": f"torch cannot be imported: {exc}"}
    return {
        "checked": True,
        "cuda_available": torch.cuda.is_available(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": bool(getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()),
        "cpu_threads": torch.get_num_threads(),
    }


PERSON_FORM = "'prompt=...;box=x0,y0,x1,y1|auto;mask=path;image=path'"


def parse_person(spec: str):
    """``--person``: 'prompt=...;box=x0,y0,x1,y1 (or box=auto);mask=path;image=path' as a
    ``bf_core.Person``; a mask is an image file, read when the person is used."""
    from bf_core.records import Person

    fields: dict[str, Any] = {"id_images": []}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("prompt", "box", "mask", "image"):
            raise argparse.ArgumentTypeError(f"{part!r}: a person is {PERSON_FORM}")
        if "region" in fields and key in ("box", "mask"):
            raise argparse.ArgumentTypeError(f"{spec!r}: give one box= or mask= per person")
        if key == "prompt":
            fields["id_prompt"] = value.strip()
        elif key == "image":
            fields["id_images"].append(value.strip())
        elif key == "mask":
            fields["region"] = _mask_file(value.strip())
        elif value.strip() == "auto":
            fields["region"] = "auto"
        else:
            try:
                box = tuple(float(v) for v in value.split(","))
            except ValueError:
                box = ()
            if len(box) != 4:
                raise argparse.ArgumentTypeError(f"box={value!r}: four numbers x0,y0,x1,y1")
            fields["region"] = box
    fields["id_images"] = fields["id_images"] or None
    return Person(**fields)


def _refine_box(text: str) -> tuple[float, float, float, float]:
    """``--refine-box``: four fractions x0,y0,x1,y1."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: four numbers x0,y0,x1,y1 in fractions")
    return box


def _mask_file(path: str):
    """A region mask read from an image file (greyscale; white is inside)."""
    from bf_core.images import load_image

    try:
        return load_image(path).convert("L")
    except Exception as exc:  # noqa: BLE001 - argparse shows one line naming the file
        raise argparse.ArgumentTypeError(f"mask={path!r}: {exc}") from exc


def _person_settings(person) -> dict[str, Any]:
    region = person.region
    if hasattr(region, "size") and hasattr(region, "convert"):
        region = f"mask {region.size[0]}x{region.size[1]}"
    return {"id_prompt": person.id_prompt, "region": region,
            "id_images": [str(p) for p in person.id_images or []]}


def save_result(result, out: Path, stem: str, seed: int) -> list[Path]:
    """One seed's images and, with fusion maps, their strips, named as ``generate`` names
    them (the web app writes the same files)."""
    from bf_core.visualize import render_fusion_strip

    written = []
    for index, image in enumerate(result.images):
        path = out / f"{stem}_seed{seed}_{index}.png"
        _save_image(image, path)
        written.append(path)
        if result.fusion_maps is not None:
            strip = render_fusion_strip(result.fusion_lines, result.fusion_steps,
                                        sample=index, image=image, regions=result.regions)
            strip_path = out / f"{stem}_seed{seed}_{index}_fusion.png"
            _save_image(strip, strip_path)
            written.append(strip_path)
        if getattr(result, "unrefined_images", None) is not None:  # --refine-faces
            before = out / f"{stem}_seed{seed}_{index}_unrefined.png"
            _save_image(result.unrefined_images[index], before)
            written.append(before)
    return written


def settings_record(bf, config, call_kwargs: dict[str, Any], seeds: list[int],
                    files: list[Path]) -> dict[str, Any]:
    """The exact settings of a run, as ``generate`` writes them to ``<stem>_settings.json``
    (the web app offers the same record for download)."""
    import dataclasses

    from bf_core.protocols import idap_applicable

    record = {"backend": bf.backend.name, "host": bf.host.name, "seeds": seeds,
              "config": dataclasses.asdict(config),
              "call": {k: v for k, v in call_kwargs.items() if k not in ("id_images", "people")},
              "people": [_person_settings(p) for p in call_kwargs.get("people") or []],
              "id_images": [str(p) for p in call_kwargs.get("id_images") or []],
              "versions": _versions(), "files": [p.name for p in files]}
    if config.enabled and config.use_idap and not idap_applicable(bf.backend):
        record["idap"] = "not applicable"  # the backend's T_id is not text (PuLID-FLUX)
    return record


def _run_and_save(bf, config, out: Path, call_kwargs: dict[str, Any], seeds: list[int],
                  stem: str) -> list[Path]:
    import torch

    written = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        result = bf(**call_kwargs, generator=generator, return_fusion_maps=config.enabled,
                    output_type="pil")
        written += save_result(result, out, stem, seed)
    settings_path = out / f"{stem}_settings.json"
    _write_json(settings_record(bf, config, call_kwargs, seeds, written), settings_path)
    written.append(settings_path)
    return written


def backend_extras(name: str):
    """The backend's ``BackendExtras`` (tiny pipeline, loading from files), or a clear exit."""
    from bf_core.plugins import get_registry

    registry = get_registry()
    registry.get_backend(name)  # a named error for an unknown backend
    extras = registry.extras(name)
    if extras is None:
        raise SystemExit(f"error: backend {name!r} gives no extras (tiny pipeline, loading from "
                         "files); wrap your own pipeline from Python with bf_core.wrap(pipe)")
    return extras


def _pipeline_for(args: argparse.Namespace, extras):
    """The pipeline set-up of ``generate``: the tiny one, or the backend's from files."""
    if args.tiny:
        return extras.tiny_setup(seed=0, host=tiny_host(args))
    if not args.base_model:
        raise SystemExit("error: --base-model is required (a local diffusers SDXL or FLUX.1 "
                         "folder or a hub id), or pass --tiny for the offline tiny pipeline")
    if extras.load_pipeline is None:
        raise SystemExit(f"error: backend {args.backend!r} cannot build pipelines from paths; "
                         "wrap your own pipeline from Python with bf_core.wrap(pipe)")
    import torch

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    return extras.load_pipeline(args.base_model, args.checkpoint, torch_dtype=dtype,
                                device=args.device)


HOST_LABELS = {"sdxl": "SDXL", "flux": "FLUX.1"}


def tiny_host(args: argparse.Namespace) -> str:
    """The base-model family of a tiny run: ``--host``, else the backend's first (SDXL for
    the backends that serve both)."""
    from bf_core.plugins import get_registry

    hosts = tuple(get_registry().get_backend(args.backend).hosts)
    host = getattr(args, "host", None) or hosts[0]
    if host not in hosts:
        raise SystemExit(f"error: backend {args.backend!r} serves {', '.join(hosts)} pipelines, "
                         f"not {host}")
    return host


def generate_call_kwargs(args: argparse.Namespace, setup) -> dict[str, Any]:
    """The call keywords of ``generate`` (the web app calls with the same): the tiny
    set-up's identity unless images or P_id are given, or several people."""
    identity = setup.identity if args.tiny else {}
    call_kwargs = dict(setup.options, prompt=args.prompt, negative_prompt=args.negative_prompt,
                       id_prompt=args.id_prompt or identity.get("id_prompt"),
                       id_images=args.id_image or identity.get("id_images"),
                       num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                       height=args.height, width=args.width,
                       num_images_per_prompt=args.num_images)
    if call_kwargs["guidance_scale"] is None:  # the pipeline's own default (SDXL 5, FLUX 3.5)
        call_kwargs.pop("guidance_scale")
    if args.person:  # several people: each brings its own prompt, images and region
        if args.id_prompt or args.id_image:
            raise SystemExit("error: give --person (repeatable) or --id-prompt/--id-image, "
                             "not both")
        call_kwargs.pop("id_prompt")
        call_kwargs.pop("id_images")
        call_kwargs["people"] = args.person
    if getattr(args, "refine_faces", False):
        call_kwargs["refine_faces"] = True
        if args.refine_box:
            call_kwargs["refine_boxes"] = args.refine_box
    elif getattr(args, "refine_box", None):
        raise SystemExit("error: --refine-box takes effect with --refine-faces; add it")
    return call_kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    import bf_core

    config = config_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name
    _refuse_overwrite([out / f"{stem}_seed{s}_0.png" for s in args.seed]
                      + [out / f"{stem}_settings.json"], args.overwrite)
    setup = _pipeline_for(args, backend_extras(args.backend))
    setup.pipe.set_progress_bar_config(disable=False)
    bf = bf_core.wrap(setup.pipe, backend=args.backend, config=config)
    written = _run_and_save(bf, config, out, generate_call_kwargs(args, setup), args.seed, stem)
    print("\n".join(str(p) for p in written))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import bf_core

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _refuse_overwrite([out / f"demo_seed{args.seed}_0.png", out / "demo_settings.json"],
                      args.overwrite)
    host = tiny_host(args)
    print(f"beyondfacial demo ({args.backend}): a TINY {HOST_LABELS[host]} pipeline with RANDOM "
          "weights, built offline. The pictures are noise-like by design; they show the "
          "machinery (two lines, fusion maps), not quality.")
    # A random-weight face detector "finds" dozens of faces in any photo; saying so on every
    # call would only bury the demo's output. main() restores the filters when it returns.
    from bf_core.faces import MultipleFacesWarning

    if not getattr(args, "verbose", False):
        warnings.filterwarnings("ignore", category=MultipleFacesWarning)
    extras = backend_extras(args.backend)
    setup = extras.tiny_setup(seed=0, host=host)
    setup.pipe.set_progress_bar_config(disable=False, desc="beyondfacial demo")
    config = bf_core.BFConfig()
    bf = bf_core.wrap(setup.pipe, backend=args.backend, config=config)
    call_kwargs = dict(setup.options, **setup.identity, prompt=extras.prompt,
                       num_inference_steps=args.steps, height=args.size, width=args.size)
    written = _run_and_save(bf, config, out, call_kwargs, [args.seed], "demo")
    written.append(_demo_comparison(bf, call_kwargs, args.seed, out))
    print("wrote:\n  " + "\n  ".join(str(p) for p in written))
    print(REAL_WEIGHTS_HINT)
    return 0


def _demo_comparison(bf, call_kwargs: dict[str, Any], seed: int, out: Path) -> Path:
    """The demo's baseline (the method off, same seed) beside its image, as one sheet."""
    import torch
    from PIL import Image

    from bf_core.visualize import contact_sheet

    baseline = bf.with_config(enabled=False)(**call_kwargs, output_type="pil",
                                             generator=torch.Generator().manual_seed(seed))
    method_image = Image.open(out / f"demo_seed{seed}_0.png")
    sheet = contact_sheet([baseline.images[0], method_image], ["baseline", "BeyondFacial"],
                          columns=2, cell=256)
    comparison = out / "demo_comparison.png"
    _save_image(sheet, comparison)
    return comparison


BENCH_UNAVAILABLE = (
    "error: `beyondfacial bench` is the benchmark package (benchmarks/) of the beyondfacial "
    "distribution, and it is not installed here. Install beyondfacial from its repository "
    "with pip install -e '.[bench,faces]' (or run python -m benchmarks in the checkout).")


def command(name: str):
    """A subcommand another package of the project provides, by its entry point in the group
    ``beyondfacial.commands`` (``bench`` is the benchmark's ``main``), or None."""
    from importlib import metadata

    found = [ep for ep in metadata.entry_points(group="beyondfacial.commands") if ep.name == name]
    return found[0].load() if found else None


def cmd_bench(argv: list[str]) -> int:
    main = command("bench")
    if main is None:
        raise SystemExit(BENCH_UNAVAILABLE)
    return main(argv)


def add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate images with a backend and write them with "
                                          "their fusion maps and exact settings")
    gen.add_argument("--backend", default="dreambooth", help="see `beyondfacial backends`")
    gen.add_argument("--base-model", help="diffusers SDXL or FLUX.1 folder or hub id (a FLUX "
                     "model, e.g. black-forest-labs/FLUX.1-dev, runs on the FLUX host)")
    gen.add_argument("--host", choices=("sdxl", "flux"), default=None,
                     help="with --tiny: the tiny pipeline's family (default: the backend's "
                          "first); with --base-model the model decides")
    gen.add_argument("--checkpoint", help="the identity method's checkpoint (path or id); for "
                     "InstantID a folder with ip-adapter.bin and ControlNetModel/, for PuLID its "
                     "file with the face models beside it (docs/benchmark.md)")
    gen.add_argument("--tiny", action="store_true", help="use the offline tiny random pipeline")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--id-prompt", default=None, help="P_id; default: the backend's")
    gen.add_argument("--id-image", action="append", help="reference image (repeatable)")
    gen.add_argument("--person", action="append", type=parse_person, metavar="SPEC",
                     help="one of several people (repeatable), as 'prompt=a photo of sks "
                          "woman;box=0,0,0.5,1;image=ana.jpg' (each part optional, image "
                          "repeatable; box in fractions of the image, or box=auto: around "
                          "a face found in the preview; or mask=file.png)")
    gen.add_argument("--seed", type=int, action="append", help="repeatable; default 0")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=None,
                     help="default: the pipeline's (5.0 on SDXL, distilled 3.5 on FLUX.1)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt and seed")
    gen.add_argument("--device", default=None, help="cuda, cpu, mps (default: where it loads)")
    gen.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    gen.add_argument("--out", default="outputs")
    gen.add_argument("--name", default="image", help="file-name stem")
    gen.add_argument("--overwrite", action="store_true")
    add_refine_request_arguments(gen)
    add_config_arguments(gen)
    gen.set_defaults(func=cmd_generate)


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="a tiny offline run: image, fusion maps, comparison")
    demo.add_argument("--backend", default="photomaker",
                      help="a backend with a tiny offline setup (default: photomaker, the paper's host)")
    demo.add_argument("--host", choices=("sdxl", "flux"), default=None,
                      help="the tiny pipeline's family (default: the backend's first)")
    demo.add_argument("--out", default="beyondfacial-demo")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=cmd_demo)


def cmd_app(args: argparse.Namespace) -> int:
    """The web app, found by its entry point (``bf_core.app:serve_command``, as ``bench``
    is: the app builds on this module, never the other way round); without gradio, one
    line naming the extra to install."""
    serve = command("app")
    if serve is None:
        raise SystemExit("error: the web app's entry point is missing; reinstall beyondfacial "
                         "(pip install -e '.[app]' in the checkout)")
    return serve(host=args.host, port=args.port, out=args.out)


def add_app_parser(sub) -> None:
    web = sub.add_parser("app", help="a web page over generate: the method beside its baseline, "
                                     "fusion maps, settings, the CLI command (extra: app)")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--out", default="beyondfacial-app", help="folder of the runs' files")
    web.set_defaults(func=cmd_app)


def add_inventory_parsers(sub) -> None:
    """``backends`` and ``env``: answered from package metadata, importing nothing heavy;
    ``--check`` loads every plugin (or torch) for what only loading can tell."""
    backends = sub.add_parser("backends", help="list installed backends, hosts and plugins as "
                                               "JSON, from package metadata")
    backends.add_argument("--check", action="store_true",
                          help="load every plugin: what each registers, its description, and "
                               "any that fails to load (imports torch and diffusers)")
    backends.set_defaults(func=cmd_backends)
    env = sub.add_parser("env", help="library versions and devices as JSON")
    env.add_argument("--check", action="store_true",
                     help="import torch for its own view of the devices")
    env.set_defaults(func=cmd_env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyondfacial",
        description="Identity-preserving SDXL generation of whole people in whole scenes "
                    "(Dual-Line Inference with IdAF and IdAP).")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's messages, and the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_inventory_parsers(sub)
    add_demo_parser(sub)
    add_app_parser(sub)
    # Listed for --help only: main() hands everything after "bench" to the benchmark's parser.
    sub.add_parser("bench", add_help=False,
                   help="cross-method benchmark (beyondfacial bench --help; e.g. --tiny --out DIR)")
    return parser


VERBOSE_HINT = "run it again with --verbose to see the traceback"


def report_error(exc: BaseException) -> int:
    """One readable line (and a hint) for any exception; exit status 2 for ours, 1 else."""
    from bf_core.errors import BeyondFacialError

    message = " ".join(str(exc).split()) or type(exc).__name__
    ours = isinstance(exc, BeyondFacialError)
    kind = "" if ours else f"{type(exc).__name__}: "
    print(f"error: {kind}{message}\n({VERBOSE_HINT})", file=sys.stderr)
    return 2 if ours else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]
    from bf_core.quiet import quiet_third_party

    try:
        # Other libraries' known noise is dropped while the command runs, and only then.
        with quiet_third_party(enabled=not verbose):
            if argv and argv[0] == "bench":
                return cmd_bench(argv[1:])
            args = build_parser().parse_args(argv)
            args.verbose = verbose
            if getattr(args, "seed", None) is None and args.command == "generate":
                args.seed = [0]
            return args.func(args)
    except Exception as exc:  # SystemExit and KeyboardInterrupt are not Exceptions: they pass
        if verbose:
            raise
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(main())
