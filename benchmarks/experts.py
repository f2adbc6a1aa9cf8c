"""An A14B-size expert pair (Wan2.2-T2V-A14B) stepping through its boundary under VRAM management.

Two DiTs with random weights at the released sizes, stored in CPU memory (pinned on CUDA), run under
``enable_vram_management(vram_limit=...)``: only the active expert's layers are on the GPU, and at
the boundary the high-noise expert is offloaded and the low-noise one comes over. Prints seconds
per step before and after the switch (medians; each expert's first step excluded: warm-up, and the
switch itself) and the switch's cost from ``pipe.vram.switches`` (bytes brought over, seconds).
Random text embeddings in place of umT5; nothing is decoded.

    python benchmarks/experts.py                                   # GPU: 480x832, 81 frames, 24 GB limit
    python benchmarks/experts.py --frames 21 --steps 6             # GPU, shorter
    python benchmarks/experts.py --layers 1 --height 64 --width 64 --frames 5 --vram-limit 1   # CPU-sized
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import sync  # noqa: E402

from wan_models import MODELS, WanDiT  # noqa: E402

MODEL = "Wan2.2-T2V-A14B"


def random_expert(config, device: torch.device, dtype: torch.dtype, seed: int) -> WanDiT:
    """A DiT of ``config`` with random weights (drawn on ``device``, fast on a GPU) stored in CPU memory."""
    with torch.device("meta"):
        dit = WanDiT(config)
    dit.to_empty(device="cpu")
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for param in dit.parameters():
            drawn = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
            param.data = drawn.to(dtype).cpu()
    return dit.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (the released shift and boundary)")
    parser.add_argument("--layers", type=int, default=None, help="fewer DiT layers per expert (CPU runs)")
    parser.add_argument("--vram-limit", type=float, default=24.0, help="GiB for weights and activations")
    parser.add_argument("--vram-buffer", type=float, default=0.5, help="GiB of the limit kept for activations")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from wan_runtime import WanVideoPipeline
    from wan_runtime.memory import format_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = MODELS[MODEL]
    config = spec.config if args.layers is None else spec.config.replace(num_layers=args.layers)
    began = time.perf_counter()
    pipe = WanVideoPipeline(device=device, torch_dtype=dtype)
    for seed in (0, 1):  # no identity: the order given decides, high-noise first
        pipe.add_model(random_expert(config, device, dtype, seed))
    vram = pipe.enable_vram_management(vram_limit=args.vram_limit, vram_buffer=args.vram_buffer)
    setup_s = time.perf_counter() - began
    gen = torch.Generator(device).manual_seed(0)
    embeds = [torch.randn(1, 512, config.text_dim, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    sampling = spec.sampling
    boundary = sampling.boundary
    experts: list[str] = []
    times: list[float] = []
    last = [0.0]

    def on_step(step: int, t: torch.Tensor, _latents: torch.Tensor) -> None:
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        experts.append("high" if float(t) >= boundary * 1000 else "low")
        last[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    last[0] = time.perf_counter()
    pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=args.height, width=args.width,
         num_frames=args.frames, num_inference_steps=args.steps, seed=0, output_type="latent",
         sampler="euler", sigma_shift=sampling.shift, cfg_scale=sampling.guidance[1],
         cfg_scale_2=sampling.guidance[0], switch_DiT_boundary=boundary, progress_bar_cmd=lambda x: x,
         step_callback=on_step)
    spatial, temporal = pipe.shape_multiples
    tokens = ((args.frames - 1) // temporal + 1) * (args.height // spatial) * (args.width // spatial)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    networks = {n: vram.networks[n] for n in ("dit", "dit2")}
    print(f"device: {name}, {MODEL} pair ({config.num_layers} layers each), {str(dtype).removeprefix('torch.')}, "
          f"{args.height}x{args.width}x{args.frames}: {tokens} tokens, CFG, {args.steps} steps "
          f"(shift {sampling.shift:g}, boundary {boundary}): {experts.count('high')} high-noise, "
          f"{experts.count('low')} low-noise; set-up {setup_s:.1f} s")
    print(f"vram limit {args.vram_limit:g} GiB (buffer {args.vram_buffer:g}); per expert: "
          + "; ".join(f"{n} resident {format_bytes(o.resident_bytes)} of "
                      f"{format_bytes(o.resident_bytes + sum(u.nbytes for u in o.units if not u.resident))}"
                      for n, o in networks.items())
          + (f"; peak allocated {format_bytes(torch.cuda.max_memory_allocated(device))}"
             if device.type == "cuda" else ""))
    print(f"{'phase':<22} {'steps':>5} {'s/step':>8}")
    for label, expert in (("before switch (high)", "high"), ("after switch (low)", "low")):
        own = [s for s, e in zip(times, experts) if e == expert][1:]  # first: warm-up / the switch
        median = f"{statistics.median(own):>8.3f}" if own else f"{'-':>8}"
        print(f"{label:<22} {len(own):>5} {median}")
    first_low = next((s for s, e in zip(times, experts) if e == "low"), None)
    if first_low is not None:
        print(f"{'first low step':<22} {1:>5} {first_low:>8.3f}   (includes the switch)")
    if not vram.switches:
        print("switch: none (all steps on one expert; more --steps or another boundary)")
    for switch in vram.switches:
        print(f"switch {switch.source} -> {switch.target}: {format_bytes(switch.nbytes)} brought over in "
              f"{switch.seconds:.3f} s ({switch.nbytes / max(switch.seconds, 1e-9) / 2**30:.1f} GiB/s)")


if __name__ == "__main__":
    main()
