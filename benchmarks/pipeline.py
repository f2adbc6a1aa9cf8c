"""Seconds per denoising step (with CFG) of a released DiT (Wan2.1-T2V-1.3B, or Wan2.2-TI2V-5B), against
the bf16 FLOP floor.

Random weights at the released sizes (no download), random text embeddings in place of umT5.
The floor is the step's matrix FLOPs (linear layers and attention of that model's sizes, both CFG
branches) over the matmul rate measured on the same device in the same run; the table prints the
measured time as "x times the floor". TI2V-5B runs as its pipeline does: 48 latent channels under
the 16x Wan2.2-VAE (a meta-device stand-in gives the pipeline its strides; nothing is decoded) and
per-token timesteps (their time embedding is outside the floor).

    python benchmarks/pipeline.py                      # GPU: 480x832, 81 frames, bf16
    python benchmarks/pipeline.py --model Wan2.2-TI2V-5B   # GPU: 704x1280, 121 frames
    python benchmarks/pipeline.py --height 128 --width 128 --frames 9 --layers 2   # CPU-sized
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import sync  # noqa: E402

from wan_models import MODELS, WanDiT  # noqa: E402

# Benchmarked models and their default (height, width, frames): the released 480P / 720P settings.
SIZES = {"Wan2.1-T2V-1.3B": (480, 832, 81), "Wan2.2-TI2V-5B": (704, 1280, 121)}


def step_flops(config, tokens: int, text_tokens: int = 512, branches: int = 2) -> float:
    """Matrix FLOPs of one DiT forward per CFG branch times ``branches`` (multiply-add = 2 FLOPs)."""
    d, f = config.dim, config.ffn_dim
    linear = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * text_tokens * 2 * d * d
    attention = 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * text_tokens * d
    return branches * config.num_layers * (linear + attention)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured FLOP/s of a square matrix product (median of 10 after warm-up, random data)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SIZES), default="Wan2.1-T2V-1.3B")
    parser.add_argument("--height", type=int, default=None, help="default: the model's released size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--layers", type=int, default=None, help="fewer DiT layers (CPU runs)")
    parser.add_argument("--attention", default=None, help="wan_kernels backend (default: best available)")
    parser.add_argument("--no-kernels", action="store_true", help="plain torch: SDPA, no fused ops")
    args = parser.parse_args()
    height, width, frames = (given or default for given, default in
                             zip((args.height, args.width, args.frames), SIZES[args.model]))

    from wan_runtime import WanVideoPipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = MODELS[args.model].config
    if args.layers:
        config = config.replace(num_layers=args.layers)
    with torch.device(device):
        dit = WanDiT(config).to(dtype)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02))
    pipe = WanVideoPipeline(device=device, torch_dtype=dtype)
    pipe.add_model(dit.eval())
    if config.fuses_image_latents:  # TI2V: the Wan2.2-VAE's strides and channels, no weights (nothing decoded)
        from wan_models.vae22 import WanVAE22

        with torch.device("meta"):
            pipe.add_model(WanVAE22())
    backend = "sdpa (plain torch)"
    if not args.no_kernels:
        from wan_runtime.acceleration import enable_kernels

        backend = enable_kernels(args.attention)
    embeds = [torch.randn(1, 512, config.text_dim, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, _t, _latents) -> None:
        sync(device)
        now = time.perf_counter()
        if step > 0:  # step 0 includes warm-up (kernel compilation, allocator growth)
            times.append(now - last[0])
        last[0] = now

    pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=height, width=width,
         num_frames=frames, num_inference_steps=args.steps + 1, seed=0, output_type="latent",
         progress_bar_cmd=lambda x: x, step_callback=on_step)
    spatial, temporal = pipe.shape_multiples  # pixels per token along H and W, frames per latent frame
    tokens = ((frames - 1) // temporal + 1) * (height // spatial) * (width // spatial)
    flops = step_flops(config, tokens)
    rate = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 2048)
    step = statistics.median(times)
    floor = flops / rate
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, {args.model} ({config.variant}), {str(dtype).removeprefix('torch.')}, attention: "
          f"{backend}, layers {config.num_layers}, {height}x{width}x{frames}: {tokens} tokens, CFG (2 branches)"
          + (", per-token timesteps" if config.per_token_timesteps else ""))
    print(f"{'s/step':>8} {'TFLOP/step':>11} {'matmul TFLOP/s':>15} {'achieved TFLOP/s':>17} {'floor s':>8} {'x floor':>8}")
    print(f"{step:>8.3f} {flops / 1e12:>11.2f} {rate / 1e12:>15.1f} {flops / step / 1e12:>17.1f} "
          f"{floor:>8.3f} {step / floor:>8.2f}")
    print(f"50 steps: {50 * step:.1f} s (+ VAE decode); floor {50 * floor:.1f} s")


if __name__ == "__main__":
    main()
