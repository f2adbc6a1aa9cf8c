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
from dit_setup import add_size_flags, random_dit  # noqa: E402
from timing import sync  # noqa: E402

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
    add_size_flags(parser)
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--kernels", action="store_true", help="switch wan_kernels on (attention outside the graph)")
    args = parser.parse_args()
    bench = random_dit(args)
    dit, config, device, dtype, gen, gpu = bench.dit, bench.config, bench.device, bench.dtype, bench.generator, bench.gpu
    frames, height, width = bench.frames, bench.height, bench.width
    if args.kernels:
        from wan_runtime.acceleration import enable_kernels

        enable_kernels(None)
    torch._inductor.config.force_disable_caches = True  # a cold compile, whatever ran before
    compile_blocks(dit, mode=args.mode)
    shape, tokens = bench.latent_shape, bench.tokens

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
