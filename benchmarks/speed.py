"""Speed and memory: each backend's baseline against the wrapped pipeline, on the same device.

Two sizes:
- ``--size real``: a real-size SDXL architecture (UNet, both CLIP text encoders, VAE) built
  from its published config with random weights (nothing is downloaded), fp16 on CUDA;
- ``--size tiny``: the tiny offline pipeline, anywhere (CPU), for the wrapper's own overhead.

``--backends`` picks the identity methods (default ``dreambooth``): any installed backend
whose ``BackendExtras`` give a ``speed_setup``. Each one gets its ID modules at the size of
the pipeline, with random weights; the built-in ones:

- ``dreambooth``: a random rank-64 character LoRA on the UNet's attention;
- ``ipadapter``: an IP-Adapter plus-face (16-token resampler, ``to_k_ip``/``to_v_ip`` on every
  cross-attention), loaded with diffusers' ``load_ip_adapter``, fed precomputed
  ``ip_adapter_image_embeds`` (no image encoder);
- ``photomaker``: PhotoMaker V2 (its ID encoder and a rank-64 LoRA on every attention
  projection) through ``load_photomaker``, with precomputed ``id_embeds`` (no face analyzer);
- ``instantid``: IdentityNet (a ControlNet from the published config) and the 16-token ID
  attention, with precomputed ``face_embeds`` and fixed keypoints (no face analyzer);
- ``pulid``: PuLID v1.1 (ID encoder and ID attention) with random face features of the real
  encoders' shapes in place of the face pipeline.

One pipeline is alive at a time: each backend's is freed before the next is built. For each
mode (eager, and ``torch.compile`` of the UNet with ``--compile``) it times "stock" (the
stock pipeline for DreamBooth; for the other backends the method's own single-line
algorithm, ``BFConfig(enabled=False)`` through ``bf_core.wrap``), the wrapped call with
BeyondFacial's defaults (50 steps, M1 = 10, M2 = 15) with both lines in one row-masked UNet
call and with one call per line, and reports ratios, peak memory, UNet time and the per-step
IdAF time.

    python -m benchmarks.speed --size real --device cuda --compile --out speed-results \
        --backends dreambooth,ipadapter,photomaker,instantid,pulid
    python -m benchmarks.speed --size tiny --device cpu --out speed-results
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bf_core.extras import SpeedSetup

PROMPT = "a person is kneeling by a small lake, touching the water gently"
BUILTIN_BACKENDS = ("dreambooth", "ipadapter", "photomaker", "instantid", "pulid")
VARIANTS = ("stock", "wrapped (one call per step)", "wrapped (one call per line)")
MODES = ("eager", "compiled")

def real_size_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    """A real-size SDXL pipeline with random weights (tiny tokenizers: the text encoders'
    cost does not depend on the vocabulary)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bf_core.hosts.sdxl import sdxl_unet_config
    from bf_core.testing.tiny import make_scheduler, tiny_tokenizers

    tokenizer, tokenizer_2 = tiny_tokenizers()

    def text_config(tok, hidden, layers, heads, projection):
        return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads,
                              projection_dim=projection, hidden_act="gelu",
                              max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config())
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                            scaling_factor=0.13025, force_upcast=True)
        text_encoder = CLIPTextModel(text_config(tokenizer, 768, 12, 12, 768))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 1280, 32, 20, 1280))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=make_scheduler("ddim"), add_watermarker=False)
    return pipe.to(device=device, dtype=dtype)


def tiny_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    from bf_core.testing.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=seed).to(device=device, dtype=dtype)


def real_size_flux_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    """A real-size FLUX.1-dev pipeline with random weights: the 12 B transformer, CLIP-L,
    T5-XXL and the 16-channel VAE from their published configs (tiny tokenizers: the
    encoders' cost does not depend on the vocabulary). Built in ``dtype`` on ``device``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bf_core.hosts.flux import flux_dev_transformer_config
    from bf_core.testing.tiny import tiny_tokenizers
    from bf_core.testing.tiny_flux import flux_dev_scheduler_config, tiny_t5_tokenizer

    clip_tokenizer, _ = tiny_tokenizers()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # 12 B parameters: never materialise them in float32
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**flux_dev_transformer_config())
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, projection_dim=768, max_position_embeddings=77,
                hidden_act="quick_gelu", bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id))
            text_encoder_2 = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    finally:
        torch.set_default_dtype(previous)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**flux_dev_scheduler_config()),
                        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tiny_t5_tokenizer(),
                        transformer=transformer)


def tiny_flux_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    from bf_core.testing.tiny_flux import tiny_flux_pipeline as build

    return build(seed=seed).to(device=device, dtype=dtype)


#: (host, size) -> the pipeline builder
PIPELINES = {("sdxl", "real"): real_size_pipeline, ("sdxl", "tiny"): tiny_pipeline,
             ("flux", "real"): real_size_flux_pipeline, ("flux", "tiny"): tiny_flux_pipeline}


def denoiser_name(pipe: Any) -> str:
    """The pipeline's denoising network: ``unet`` (SDXL) or ``transformer`` (FLUX)."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def speed_setup(name: str, pipe: Any, real: bool, resolution: int, lora_rank: int,
                seed: int = 0) -> SpeedSetup:
    """Backend ``name``'s ID modules on ``pipe`` at its size (random weights), from the
    ``speed_setup`` of the backend's extras."""
    from bf_core.plugins import get_registry

    extras = get_registry().extras(name)
    if extras is None or extras.speed_setup is None:
        raise ValueError(f"backend {name!r} gives no speed_setup in its BackendExtras")
    return extras.speed_setup(pipe, real, resolution, seed=seed, lora_rank=lora_rank)


class UNetTimer:
    """Wall time spent inside the UNet's forward, summed over a run (synchronised)."""

    def __init__(self, unet, device: str):
        self.device, self.total, self._start = device, 0.0, 0.0
        self.handles = [unet.register_forward_pre_hook(self._before),
                        unet.register_forward_hook(self._after)]

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _before(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self._sync()
        self.total += time.perf_counter() - self._start

    def close(self):
        for handle in self.handles:
            handle.remove()


@dataclass
class Measurement:
    backend: str  # a backend with a speed set-up
    mode: str  # eager | compiled
    variant: str  # stock | wrapped (batched) | wrapped (per line)
    seconds: float
    unet_seconds: float
    peak_memory_gib: float | None
    model_rows: int | None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(run, device: str, unet, repeats: int) -> tuple[float, float, float | None, object]:
    """Best-of-``repeats`` wall time, its UNet time, peak memory (GiB, CUDA), the last output."""
    best, best_unet, output = float("inf"), 0.0, None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        timer = UNetTimer(unet, device)
        _sync(device)
        start = time.perf_counter()
        output = run()
        _sync(device)
        elapsed = time.perf_counter() - start
        timer.close()
        if elapsed < best:
            best, best_unet = elapsed, timer.total
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return best, best_unet, peak, output


def idaf_milliseconds(device: str, dtype: torch.dtype, shape: tuple[int, ...], iterations: int) -> float:
    """Mean time of one IdAF call on guided noises of ``shape``."""
    from bf_core.fusion import idaf

    eps_id, eps_sem = torch.randn(shape, device=device, dtype=dtype), torch.randn(
        shape, device=device, dtype=dtype)
    for _ in range(5):
        idaf(eps_id, eps_sem)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        idaf(eps_id, eps_sem)
    _sync(device)
    return (time.perf_counter() - start) / iterations * 1000


def speed_backends() -> list[str]:
    """The installed backends whose extras give a speed set-up."""
    from bf_core.plugins import get_registry

    registry = get_registry()
    return [name for name in sorted(registry.backends())
            if (extras := registry.extras(name)) is not None and extras.speed_setup is not None]


def parse_backends(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    available = speed_backends()
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(available)}, comma-separated")
    return names


def _free(device: str) -> None:
    """Release the last backend's pipeline and compiled graphs before building the next."""
    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_backend(name: str, setup: SpeedSetup, args, call: dict, modes: list[str],
                    progress, record) -> None:
    """Time the three variants of one backend in each mode, passing each measurement to
    ``record`` as soon as it is taken (so a failure in a later mode keeps the earlier ones)."""
    import bf_core

    pipe = setup.pipe
    pipe.set_progress_bar_config(disable=True)
    call = dict(call, prompt=setup.prompt or PROMPT)

    def generator():
        return torch.Generator(device="cpu").manual_seed(0)

    def wrapped(config):
        wrapper = bf_core.wrap(pipe, backend=name, config=config)
        return lambda: wrapper(**call, **setup.identity, generator=generator())

    if setup.stock_is_pipeline:
        def stock():
            return pipe(**call, generator=generator())
    else:
        stock = wrapped(bf_core.BFConfig(enabled=False))
    runs = dict(zip(VARIANTS, (stock, wrapped(bf_core.BFConfig()),
                               wrapped(bf_core.BFConfig(batch_lines=False))), strict=True))
    network = denoiser_name(pipe)
    stock_rows = args.steps * (2 if network == "unet" else 1)  # SDXL's CFG doubles the rows
    for mode in modes:
        if mode == "compiled":
            # One specialised graph per shape (batch 2, batch 4, masked context): the
            # warm-up run compiles each, none is timed, and none runs slower for being
            # generic over the batch size, the stock graph included.
            setattr(pipe, network, torch.compile(getattr(pipe, network), dynamic=False))
        for variant, run in runs.items():
            run()  # warm-up (and compilation)
            seconds, unet_seconds, peak, output = time_call(run, args.device,
                                                            getattr(pipe, network), args.repeats)
            model_rows = getattr(output, "diagnostics", {}).get("model_rows", stock_rows)
            record(Measurement(name, mode, variant, seconds, unet_seconds, peak, model_rows))
            progress.update()


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown or text!r}; pick from "
                                         f"{','.join(MODES)}")
    return modes


def measure(args, save=None) -> dict:
    """Time every backend of ``args``; ``save(result)`` is called after each measurement, so
    a run stopped part-way (a time limit on a lent GPU) keeps what it measured."""
    from tqdm.auto import tqdm

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    build = PIPELINES[args.host, args.size]
    resolution = args.resolution or (1024 if args.size == "real" else 128)
    call = dict(num_inference_steps=args.steps, height=resolution, width=resolution,
                output_type="latent")
    modes = list(args.modes) + (["compiled"] if args.compile and "compiled" not in args.modes else [])
    # IdAF's grid: SDXL's 4 channels at 1/8 (the tiny VAE too); FLUX's 16 at 1/8 (1/2 tiny)
    channels, factor = (4, 8) if args.host == "sdxl" else (16, 8 if args.size == "real" else 2)
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "host": args.host, "size": args.size, "dtype": args.dtype,
        "steps": args.steps,
        "resolution": resolution, "lora_rank": args.lora_rank, "backends": list(args.backends),
        "modes": modes,
        "idaf_ms": idaf_milliseconds(args.device, dtype,
                                     (1, channels, resolution // factor, resolution // factor),
                                     args.idaf_iterations),
        "measurements": [],
        "errors": {},
    }

    def record(measurement: Measurement | None = None) -> None:
        if measurement is not None:
            result["measurements"].append(asdict(measurement))
        if save is not None:
            save(result)

    progress = tqdm(total=len(args.backends) * len(modes) * len(VARIANTS), desc="speed",
                    disable=args.no_progress)
    for name in args.backends:
        # One pipeline at a time: a fresh one per backend (its ID modules change the UNet).
        setup = None
        try:
            setup = speed_setup(name, build(args.device, dtype), args.size == "real",
                                resolution, args.lora_rank)
            measure_backend(name, setup, args, call, modes, progress, record)
        except Exception as exc:  # keep the other backends' numbers; report this one
            traceback.print_exc()
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            record()
        finally:
            del setup
            _free(args.device)
    progress.close()
    return result


def wrapper_overhead(measurement: dict, stock: dict) -> float:
    """The wrapper's own time outside the UNet, beyond the stock pipeline's, as a share of
    the wrapped run: (non-UNet seconds - stock non-UNet seconds) / seconds."""
    extra = ((measurement["seconds"] - measurement["unet_seconds"])
             - (stock["seconds"] - stock["unet_seconds"]))
    return extra / measurement["seconds"]


def to_markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; torch {result['torch']}; "
             f"{result.get('host', 'sdxl').upper()} {result['size']} size, "
             f"{result['dtype']}, {result['resolution']} px, {result['steps']} steps; "
             f"IdAF {result['idaf_ms']:.3f} ms per step.", "",
             "| backend | mode | variant | seconds | x stock | UNet seconds | non-UNet share | wrapper overhead | peak GiB | x stock memory | UNet rows |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    stock = {(m["backend"], m["mode"]): m for m in result["measurements"]
             if m["variant"] == "stock"}
    for m in result["measurements"]:
        base = stock[m["backend"], m["mode"]]
        memory = f"{m['peak_memory_gib']:.2f}" if m["peak_memory_gib"] is not None else "n/a"
        memory_ratio = (f"{m['peak_memory_gib'] / base['peak_memory_gib']:.2f}"
                        if m["peak_memory_gib"] and base["peak_memory_gib"] else "n/a")
        share = 1 - m["unet_seconds"] / m["seconds"]
        lines.append(f"| {m['backend']} | {m['mode']} | {m['variant']} | {m['seconds']:.3f} | "
                     f"{m['seconds'] / base['seconds']:.2f} | {m['unet_seconds']:.3f} | "
                     f"{share:.1%} | {wrapper_overhead(m, base):.1%} | {memory} | "
                     f"{memory_ratio} | {m['model_rows']} |")
    if result.get("errors"):
        lines += ["", "Failed:"] + [f"- {name}: {error}" for name, error in result["errors"].items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--host", choices=("sdxl", "flux"), default="sdxl",
                        help="the base model: SDXL, or FLUX.1-dev (with --steps 28 --dtype "
                             "bfloat16 for its defaults)")
    parser.add_argument("--size", choices=("real", "tiny"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--backends", type=parse_backends, default=["dreambooth"],
                        help="comma-separated installed backends with a speed set-up, e.g. "
                             f"{','.join(BUILTIN_BACKENDS)} (default dreambooth)")
    parser.add_argument("--lora-rank", type=int, default=64,
                        help="rank of the DreamBooth identity LoRA")
    parser.add_argument("--modes", type=parse_modes, default=["eager"],
                        help="comma-separated, from eager,compiled (default eager)")
    parser.add_argument("--compile", action="store_true",
                        help="also time a torch.compile'd UNet (adds 'compiled' to --modes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idaf-iterations", type=int, default=200)
    parser.add_argument("--out", default=None, help="folder for speed.json and speed.md")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dtype is None:
        cuda = args.device.startswith("cuda")
        args.dtype = ("bfloat16" if args.host == "flux" else "float16") if cuda else "float32"
    save = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)

        def save(result: dict) -> None:
            (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
            (out / "speed.md").write_text(to_markdown(result))

    result = measure(args, save)
    print(to_markdown(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
