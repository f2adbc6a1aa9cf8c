"""Regional torch.compile of the DiT blocks: compile cost, speed-up and output drift in one table.

The DiT's blocks are compiled in place (``wan_runtime.compile.compile_blocks``, as
``WanVideoPipeline.compile`` does); eager rounds run the same module under
``torch.compiler.set_stance("force_eager")``. Inductor's caches are off, so the compile time is a
cold compile: first compiled call minus the median compiled call. Eager and compiled rounds are
interleaved on fresh non-zero random inputs; medians are reported, with the max relative difference
of the compiled output from the eager one and how many graphs dynamo made (one per distinct block
code path, not per block).

    python benchmarks/compile.py                                     # GPU: 1.3B, 480x832x81, bf16
    python benchmarks/compile.py --layers 2                          # CPU: 9x256x256, float32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
from timing import sync  # noqa: E402

from wan_models import MODELS, WanDiT  # noqa: E402
from wan_runtime.compile import compile_blocks  # noqa: E402


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    """``fn()``'s output (float32) and its synchronised wall time in seconds."""
    sync(device)
    start = time.perf_counter()
    out = fn().float()
    sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="blocks of the model (default: all)")
    parser.add_argument("--model", default="Wan2.1-T2V-1.3B")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--kernels", action="store_true", help="switch wan_kernels on (attention outside the graph)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    height, width = args.height or (480 if gpu else 256), args.width or (832 if gpu else 256)
    frames = args.frames or (81 if gpu else 9)
    config = MODELS[args.model].config
    if args.layers:
        config = config.replace(num_layers=args.layers)
    with torch.device(device):
        dit = WanDiT(config)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
    dit = dit.to(dtype).eval()
    if args.kernels:
        from wan_runtime.acceleration import enable_kernels

        enable_kernels(None)
    torch._inductor.config.force_disable_caches = True  # a cold compile, whatever ran before
    compile_blocks(dit, mode=args.mode)
    shape = (1, config.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = shape[2] * shape[3] * shape[4] // 4

    def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(shape, generator=gen, device=device).to(dtype)
        t = torch.rand(1, generator=gen, device=device) * 1000
        return x, t, torch.randn(1, 512, config.text_dim, generator=gen, device=device).to(dtype)

    eager, compiled, diffs = [], [], []
    with torch.no_grad():
        x, t, ctx = inputs()
        _, first = timed(lambda: dit(x, t, ctx), device)
        for round_ in range(args.rounds + 1):  # round 0 warms the eager path up
            x, t, ctx = inputs()
            with torch.compiler.set_stance("force_eager"):
                ref, eager_s = timed(lambda: dit(x, t, ctx), device)
            out, compiled_s = timed(lambda: dit(x, t, ctx), device)
            if round_:
                eager.append(eager_s)
                compiled.append(compiled_s)
            diffs.append(((out - ref).abs().max() / ref.abs().max()).item())
    eager_ms, compiled_ms = statistics.median(eager) * 1e3, statistics.median(compiled) * 1e3
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {args.model} DiT ({config.num_layers} blocks), {tokens} tokens ({frames}x{height}x{width}), "
          f"{str(dtype).removeprefix('torch.')}, {where}, mode {args.mode}, kernels {args.kernels}; "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'compile s':>10}{'eager ms':>12}{'compiled ms':>13}{'speed-up':>10}{'max rel diff':>14}{'graphs':>8}")
    print(f"{first - statistics.median(compiled):>10.1f}{eager_ms:>12.1f}{compiled_ms:>13.1f}"
          f"{eager_ms / compiled_ms:>10.2f}{max(diffs):>14.2e}{counters['stats']['unique_graphs']:>8}")
    print(f"# torch {torch.__version__}")


if __name__ == "__main__":
    main()
