"""Speed and memory: the stock pipeline against the wrapped one, on the same device.

Two sizes:
- ``--size real``: a real-size SDXL architecture (UNet, both CLIP text encoders, VAE) built
  from its published config with random weights (nothing is downloaded), fp16 on CUDA;
- ``--size tiny``: the tiny offline pipeline, anywhere (CPU), for the wrapper's own overhead.

For each mode (eager, and ``torch.compile`` of the UNet with ``--compile``) it times the
stock call and the wrapped call with BeyondFacial's defaults (50 steps, M1 = 10, M2 = 15),
the wrapped call with both lines in one row-masked UNet call and with one call per line,
and reports ratios, peak memory, UNet time and the per-step IdAF time. Identity: a random
rank-64 character LoRA on the UNet's attention (the DreamBooth backend), the one identity
method whose per-line switch needs no checkpoint.

    python -m benchmarks.speed --size real --device cuda --compile --out speed-results
    python -m benchmarks.speed --size tiny --device cpu --out speed-results
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROMPT = "a person is kneeling by a small lake, touching the water gently"
ID_PROMPT = "a photo of sks person"


def real_size_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    """A real-size SDXL pipeline with random weights (tiny tokenizers: the text encoders'
    cost does not depend on the vocabulary)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bf_core.sdxl import sdxl_unet_config
    from bf_core.tiny import make_scheduler, tiny_tokenizers

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
    from bf_core.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=seed).to(device=device, dtype=dtype)


def add_identity_lora(pipe, rank: int, seed: int = 0) -> None:
    """A random character LoRA on the UNet's attention projections (DreamBooth-style)."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                            target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        pipe.unet.add_adapter(config, adapter_name="identity")
    pipe.unet.to(dtype=pipe.unet.dtype)


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
    mode: str  # eager | compiled
    variant: str  # stock | wrapped (batched) | wrapped (per line)
    seconds: float
    unet_seconds: float
    peak_memory_gib: float | None
    unet_rows: int | None


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


def measure(args) -> dict:
    import bf_core

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    build = real_size_pipeline if args.size == "real" else tiny_pipeline
    pipe = build(args.device, dtype)
    add_identity_lora(pipe, rank=args.lora_rank)
    pipe.set_progress_bar_config(disable=True)
    resolution = args.resolution or (1024 if args.size == "real" else 128)
    call = dict(prompt=PROMPT, num_inference_steps=args.steps, height=resolution, width=resolution,
                output_type="latent")

    def generator():
        return torch.Generator(device="cpu").manual_seed(0)

    variants = {
        "stock": lambda: pipe(**call, generator=generator()),
        "wrapped (one call per step)": lambda: bf_core.wrap(pipe, config=bf_core.BFConfig())(
            **call, id_prompt=ID_PROMPT, generator=generator()),
        "wrapped (one call per line)": lambda: bf_core.wrap(
            pipe, config=bf_core.BFConfig(batch_lines=False))(**call, id_prompt=ID_PROMPT,
                                                              generator=generator()),
    }
    modes = ["eager"] + (["compiled"] if args.compile else [])
    rows: list[Measurement] = []
    from tqdm.auto import tqdm

    progress = tqdm(total=len(modes) * len(variants), desc="speed", disable=args.no_progress)
    for mode in modes:
        if mode == "compiled":
            pipe.unet = torch.compile(pipe.unet, dynamic=True)
        for name, run in variants.items():
            run()  # warm-up (and compilation)
            seconds, unet_seconds, peak, output = time_call(run, args.device, pipe.unet, args.repeats)
            unet_rows = getattr(output, "diagnostics", {}).get("unet_rows", 2 * args.steps)
            rows.append(Measurement(mode, name, seconds, unet_seconds, peak, unet_rows))
            progress.update()
    progress.close()
    latent = resolution // pipe.vae_scale_factor
    return {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "size": args.size, "dtype": args.dtype, "steps": args.steps,
        "resolution": resolution, "lora_rank": args.lora_rank,
        "idaf_ms": idaf_milliseconds(args.device, dtype, (1, 4, latent, latent), args.idaf_iterations),
        "measurements": [asdict(r) for r in rows],
    }


def wrapper_overhead(measurement: dict, stock: dict) -> float:
    """The wrapper's own time outside the UNet, beyond the stock pipeline's, as a share of
    the wrapped run: (non-UNet seconds - stock non-UNet seconds) / seconds."""
    extra = ((measurement["seconds"] - measurement["unet_seconds"])
             - (stock["seconds"] - stock["unet_seconds"]))
    return extra / measurement["seconds"]


def to_markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; torch {result['torch']}; {result['size']} size, "
             f"{result['dtype']}, {result['resolution']} px, {result['steps']} steps; "
             f"IdAF {result['idaf_ms']:.3f} ms per step.", "",
             "| mode | variant | seconds | x stock | UNet seconds | non-UNet share | wrapper overhead | peak GiB | x stock memory | UNet rows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    stock = {m["mode"]: m for m in result["measurements"] if m["variant"] == "stock"}
    for m in result["measurements"]:
        base = stock[m["mode"]]
        memory = f"{m['peak_memory_gib']:.2f}" if m["peak_memory_gib"] is not None else "n/a"
        memory_ratio = (f"{m['peak_memory_gib'] / base['peak_memory_gib']:.2f}"
                        if m["peak_memory_gib"] and base["peak_memory_gib"] else "n/a")
        share = 1 - m["unet_seconds"] / m["seconds"]
        lines.append(f"| {m['mode']} | {m['variant']} | {m['seconds']:.3f} | "
                     f"{m['seconds'] / base['seconds']:.2f} | {m['unet_seconds']:.3f} | "
                     f"{share:.1%} | {wrapper_overhead(m, base):.1%} | {memory} | "
                     f"{memory_ratio} | {m['unet_rows']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("real", "tiny"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idaf-iterations", type=int, default=200)
    parser.add_argument("--out", default=None, help="folder for speed.json and speed.md")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dtype is None:
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    result = measure(args)
    table = to_markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "speed.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
