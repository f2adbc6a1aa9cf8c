"""Attention backends on the Wan DiT's real shapes: time and achieved TFLOP/s per backend.

Self-attention over the video tokens and cross-attention to the 512 text tokens, for the 1.3B
(12 heads x 128) and 14B (40 heads x 128) models at 480P (81 frames: 21x30x52 = 32760 tokens)
and 720P (21x45x80 = 75600 tokens), batch 1. On a GPU: bf16, full sizes. On CPU: float32 with
the token counts divided by ``--cpu-divisor`` (default 64) so that a run takes minutes, not
hours. Every available backend runs on the same fresh random inputs; the table shows the median
of ``--repeats`` timed runs after ``--warmup`` and the max |diff| against SDPA's output.

    python benchmarks/attention.py [--backends sdpa,flash2] [--repeats 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import median_seconds  # noqa: E402

from wan_kernels import available_backends
from wan_kernels.attention import get_backend

MODELS = {"1.3B": 12, "14B": 40}          # heads; head dim is 128 for both
RESOLUTIONS = {"480P": 32760, "720P": 75600}
HEAD_DIM, TEXT_TOKENS = 128, 512
MATH_SCORE_BYTES = 4 << 30                 # math materialises B*H*Lq*Lk float32 scores; skip above this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=None, help="comma-separated names (default: every available one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-divisor", type=int, default=64, help="token-count divisor on CPU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    divisor = 1 if device.type == "cuda" else args.cpu_divisor
    names = args.backends.split(",") if args.backends else available_backends()
    names = ["sdpa"] + [n for n in names if n != "sdpa"]  # SDPA first: the reference for max|diff|
    gen = torch.Generator(device).manual_seed(0)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# attention on {label}, {dtype}, tokens / {divisor}, median of {args.repeats} after {args.warmup} warm-up")
    header = f"{'model':<5} {'res':<5} {'kind':<5} {'q x k tokens':>13} {'backend':<8} {'ms':>10} {'TFLOP/s':>8}  max|diff| vs sdpa"
    print(header)
    print("-" * len(header))
    for model, heads in MODELS.items():
        for res, tokens in RESOLUTIONS.items():
            lq = tokens // divisor
            for kind, lk in (("self", lq), ("cross", TEXT_TOKENS)):
                q = torch.randn(1, lq, heads, HEAD_DIM, generator=gen, device=device, dtype=dtype)
                k = torch.randn(1, lk, heads, HEAD_DIM, generator=gen, device=device, dtype=dtype)
                v = torch.randn(1, lk, heads, HEAD_DIM, generator=gen, device=device, dtype=dtype)
                flops = 4 * heads * lq * lk * HEAD_DIM
                reference = None
                for name in names:
                    backend = get_backend(name)
                    ok, reason = backend.is_available()
                    if ok:
                        ok, reason = backend.supports(q, k, v)
                    if ok and name == "math" and heads * lq * lk * 4 > MATH_SCORE_BYTES:
                        ok, reason = False, "score matrix too large"
                    row = f"{model:<5} {res:<5} {kind:<5} {f'{lq}x{lk}':>13} {name:<8}"
                    if not ok:
                        print(f"{row} {'-':>10} {'-':>8}  skipped: {reason}")
                        continue
                    with torch.no_grad():
                        seconds = median_seconds(lambda: backend.fn(q, k, v), device, args.warmup, args.repeats)
                        out = backend.fn(q, k, v).float()
                    if reference is None:
                        reference = out
                    diff = (out - reference).abs().max().item()
                    print(f"{row} {seconds * 1e3:>10.2f} {flops / seconds / 1e12:>8.3g}  {diff:.2e}")
                    del out
                del q, k, v, reference
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
