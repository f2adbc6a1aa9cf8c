"""VRAM management on the Wan 2.1 1.3B DiT: weight bytes on the compute side and time per forward.

Configurations: no offload (weights on the compute device, no hooks), managed without a limit
(every layer resident: the hooks' cost), full offload (the budget is the working set: every layer
streamed), a limit halfway between, and float8 storage with full offload; on CUDA the streamed
ones run with and without prefetch. The DiT is stored on the CPU (pinned on CUDA).

On a GPU: the full 1.3B config (30 blocks) in bfloat16, 480P latents of ``--frames`` frames; the
"peak alloc" column is ``torch.cuda.max_memory_allocated`` during the timed forwards (weights and
activations) above the inputs. On the CPU: ``--layers`` blocks (default 4) in
float32 on small latents; storage and compute are the same device, so transfers are no-ops and
the table shows the accounting and the cost of the hooks and of the float8 upcast.

    python benchmarks/offload.py [--layers N] [--frames 81] [--height 480 --width 832] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wan_models import MODELS, WanDiT
from wan_runtime.memory import Accountant, Transfer, VramManager, format_bytes
from wan_runtime.memory.offload import build_units, working_set


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_dit(layers: int, dtype: torch.dtype) -> WanDiT:
    """The 1.3B DiT with ``layers`` blocks and random weights, on the CPU."""
    config = MODELS["Wan2.1-T2V-1.3B"].config.replace(num_layers=layers)
    with torch.device("meta"):
        dit = WanDiT(config)
    dit.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in dit.parameters():
            param.data = (torch.randn(param.shape, generator=gen) * 0.02).to(dtype)
    return dit.eval()


def inputs(dit: WanDiT, frames: int, height: int, width: int, device: torch.device,
           dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    c = dit.config
    x = torch.randn(1, c.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8, device=device, dtype=dtype)
    context = torch.randn(1, c.text_len, c.text_dim, device=device, dtype=dtype)
    return x, torch.tensor([500.0], device=device), context


def timed(dit: WanDiT, args: tuple[torch.Tensor, ...], device: torch.device, repeats: int,
          base: int) -> tuple[float, int]:
    """Median seconds per forward after one warm-up (which also teaches prefetch the layer order),
    and the CUDA allocation peak above ``base`` (the inputs) during the timed forwards (0 on CPU)."""
    with torch.no_grad():
        dit(*args)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dit(*args)
            sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="DiT blocks (default: 30 on CUDA, 4 on CPU)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: 81 on CUDA, 5 on CPU)")
    parser.add_argument("--height", type=int, default=None, help="default: 480 on CUDA, 128 on CPU")
    parser.add_argument("--width", type=int, default=None, help="default: 832 on CUDA, 128 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = args.layers or (30 if cuda else 4)
    frames, height, width = args.frames or (81 if cuda else 5), args.height or (480 if cuda else 128), \
        args.width or (832 if cuda else 128)
    dit = random_dit(layers, dtype)
    x = inputs(dit, frames, height, width, device, dtype)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    total = sum(p.numel() * p.element_size() for p in dit.parameters())
    label = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"# 1.3B DiT, {layers} blocks ({format_bytes(total)} in {str(dtype)[6:]}), {frames} frames at "
          f"{height}x{width}, on {label}; median of {args.repeats} forwards after one warm-up")
    header = (f"{'configuration':<36}{'storage':>9}{'budget':>11}{'resident':>11}{'peak weights':>14}"
              f"{'peak alloc':>12}{'s/forward':>11}{'prefetch hit/miss':>19}")
    print(header)
    print("-" * len(header))

    def row(name: str, storage: str, budget: str, resident: str, weights: str, seconds: float, peak: int,
            prefetch: str = "-") -> None:
        alloc = format_bytes(peak) if cuda else "-"
        print(f"{name:<36}{storage:>9}{budget:>11}{resident:>11}{weights:>14}{alloc:>12}{seconds:>11.3f}{prefetch:>19}")

    if cuda:
        dit.to(device)
        seconds, peak = timed(dit, x, device, args.repeats, base)
        row("no offload", "device", "-", format_bytes(total), format_bytes(total), seconds, peak)
        dit.to("cpu")
    else:
        seconds, peak = timed(dit, x, device, args.repeats, base)
        row("no offload", "cpu", "-", format_bytes(total), format_bytes(total), seconds, peak)

    def managed(name: str, budget_of: str, prefetch: bool) -> None:
        _, units = build_units(dit, Transfer(device, dtype).compute_dtype)
        working = working_set(units, prefetch)
        weights = sum(u.nbytes for u in units)
        budget = {"none": None, "working set": working, "halfway": (weights + working) // 2}[budget_of]
        accountant = Accountant()
        manager = VramManager(device, dtype, budget, accountant, prefetch=prefetch)
        network = manager.manage("dit", dit)
        seconds, peak = timed(dit, x, device, args.repeats, base)
        stats = network.stats
        hits = f"{stats['prefetch_hits']}/{stats['prefetch_misses']}" if prefetch else "-"
        storage = str(next(dit.blocks.parameters()).dtype)[6:].replace("float8_e4m3fn", "fp8")
        row(name + (" +prefetch" if prefetch else ""), storage, "-" if budget is None else format_bytes(budget),
            format_bytes(network.resident_bytes), format_bytes(accountant.peak), seconds, peak, hits)
        manager.disable()

    managed("managed, no limit", "none", False)
    for prefetch in ([False, True] if cuda else [False]):
        managed("full offload", "working set", prefetch)
        managed("halfway", "halfway", prefetch)
    for param in dit.parameters():  # float8 storage, in place: one copy of the weights at a time
        param.data = param.data.to(torch.float8_e4m3fn)
    for prefetch in ([False, True] if cuda else [False]):
        managed("fp8 storage, full offload", "working set", prefetch)


if __name__ == "__main__":
    main()
