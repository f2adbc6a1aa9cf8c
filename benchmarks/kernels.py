"""Fused Triton ops vs the torch ops of ``wan_models.ops``: time and effective GB/s.

Each op runs on the DiT's real activations: 1.3B at 480P (32760 tokens, width 1536, 12 heads)
and 14B at 720P (75600 tokens, width 5120, 40 heads), batch 1, in the dtypes the DiT uses
(linear outputs bf16 on GPU, float32 residual stream and modulation; on CPU the linear outputs
are float32 too). GB/s counts each input read once and the output written once, the least
traffic the op needs. On CPU the latent frame count is cut to ``--cpu-frames`` (default 1: 1560
and 3600 tokens) and only the torch rows are printed: the fused kernels need a CUDA GPU (Triton's CPU interpreter is for tests).

A second table times one DiT linear (the FFN's first projection, 1.3B: 1536->8960, 14B:
5120->13824) on the same tokens: the plain layer, ``FP8Linear`` dequantising per call, and on
sm89+/sm90 GPUs ``FP8Linear(scaled_mm=True)``; relative L2 error against the plain layer.

    python benchmarks/kernels.py [--repeats 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

from torch import nn

from wan_kernels import FP8Linear
from wan_models import ops
from wan_models.rope import rope_tables

SHAPES = {"1.3B-480P": (1536, 12, (21, 30, 52)), "14B-720P": (5120, 40, (21, 45, 80))}  # width, heads, grid
FFN_DIM = {1536: 8960, 5120: 13824}
HEAD_DIM = 128


def op_inputs(name: str, tokens: int, dim: int, heads: int, grid: tuple[int, int, int],
              device: torch.device, linear_dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """Fresh random arguments for op ``name`` in the DiT's layout and dtypes."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    modulation = randn(1, 6, dim).unsqueeze(2).unbind(1)  # strided [1, 1, C] views, as in the DiT
    if name == "rms_norm":
        return randn(1, tokens, dim, dtype=linear_dtype), 1 + 0.1 * randn(dim, dtype=linear_dtype), 1e-6
    if name == "apply_rope":
        cos, sin = rope_tables(HEAD_DIM, grid, device)
        return (randn(1, tokens, heads, HEAD_DIM, dtype=linear_dtype), cos, sin)
    if name == "modulate":
        return randn(1, tokens, dim), modulation[0], modulation[1], 1e-6
    return randn(1, tokens, dim), randn(1, tokens, dim, dtype=linear_dtype), modulation[2]


def traffic_bytes(args: tuple, out: torch.Tensor) -> int:
    """Bytes of every tensor argument (each read once) plus the output (written once)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) + out.numel() * out.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu-frames", type=int, default=1, help="latent frames on CPU (21 on GPU)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused: dict[str, Callable] = {}
    note = ""
    if device.type == "cuda":
        from wan_kernels import triton as triton_ops

        ok, reason = triton_ops.status()
        fused = triton_ops.fused_ops() if ok else {}
        note = "" if ok else f"fused rows skipped: {reason}"
    else:
        note = "no CUDA GPU: torch rows only (the fused kernels need a GPU; Triton's interpreter is for tests)"
    linear_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# fused ops on {label}, median of {args.repeats} after {args.warmup} warm-up")
    if note:
        print(f"# {note}")
    header = f"{'shape':<10} {'tokens':>6} {'op':<15} {'impl':<7} {'ms':>9} {'GB/s':>8}  max|diff| vs torch"
    print(header)
    print("-" * len(header))
    for shape, (dim, heads, grid) in SHAPES.items():
        if device.type != "cuda":
            grid = (args.cpu_frames, *grid[1:])
        tokens = grid[0] * grid[1] * grid[2]
        for name in ops.DEFAULTS:
            call_args = op_inputs(name, tokens, dim, heads, grid, device, linear_dtype, gen)
            reference = ops.DEFAULTS[name](*call_args)
            moved = traffic_bytes(call_args, reference)
            impls = {"torch": ops.DEFAULTS[name]}
            if name in fused:
                impls["triton"] = fused[name]
            for impl, fn in impls.items():
                with torch.no_grad():
                    seconds = median_seconds(lambda: fn(*call_args), device, args.warmup, args.repeats)
                    diff = (fn(*call_args).float() - reference.float()).abs().max().item()
                print(f"{shape:<10} {tokens:>6} {name:<15} {impl:<7} {seconds * 1e3:>9.3f} {moved / seconds / 1e9:>8.1f}  {diff:.2e}")
            del call_args, reference
    linear_table(device, linear_dtype, gen, args)


def linear_table(device: torch.device, dtype: torch.dtype, gen: torch.Generator, args: argparse.Namespace) -> None:
    """One FFN projection per model size: plain vs FP8 storage (dequantise, and _scaled_mm on GPU)."""
    header = f"{'shape':<10} {'tokens':>6} {'linear':<20} {'ms':>9} {'TFLOP/s':>8}  rel. L2 vs plain"
    print()
    print(header)
    print("-" * len(header))
    for shape, (dim, _, grid) in SHAPES.items():
        if device.type != "cuda":
            grid = (args.cpu_frames, *grid[1:])
        tokens = grid[0] * grid[1] * grid[2]
        plain = nn.Linear(dim, FFN_DIM[dim], device=device, dtype=dtype)
        layers = {"plain": plain, "fp8 dequantise": FP8Linear.from_linear(plain)}
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
            layers["fp8 scaled_mm"] = FP8Linear.from_linear(plain, scaled_mm=True)
        x = torch.randn(1, tokens, dim, generator=gen, device=device, dtype=dtype)
        with torch.no_grad():
            reference = plain(x).float()
            for label, layer in layers.items():
                seconds = median_seconds(lambda: layer(x), device, args.warmup, args.repeats)
                out = layer(x).float()
                error = ((out - reference).norm() / reference.norm()).item()
                flops = 2 * tokens * dim * FFN_DIM[dim]
                print(f"{shape:<10} {tokens:>6} {label:<20} {seconds * 1e3:>9.3f} {flops / seconds / 1e12:>8.3g}  {error:.2e}")
        del layers, plain, x, reference


if __name__ == "__main__":
    main()
