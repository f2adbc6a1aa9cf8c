"""Peak memory (RSS) of Wan-VAE encode and decode on CPU, untiled vs tiled, for the same video.

The VAE has the released width (dim 96, random weights) so activations have their real sizes;
the video is small so the whole table takes about a minute or two on 2 cores. Each measurement runs
in a fresh Python process: its peak RSS is reset (or, where the kernel refuses, taken from process
start) just before the call, so "call peak" is what the call itself added on top of the model and
inputs. Timings are printed for orientation only.

    python benchmarks/vae_memory.py [--dim 96] [--frames 9] [--height 128] [--width 192]
                                    [--tile-size 8 12] [--tile-stride 4 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Restarts VmHWM at the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(op: str, tiled: bool, args: argparse.Namespace) -> dict:
    """One encode or decode in this process; returns RSS figures (MiB) and seconds."""
    import torch

    from wan_models.vae import VAEConfig, WanVAE

    torch.manual_seed(0)
    model = WanVAE(VAEConfig(dim=args.dim)).eval()
    f = model.config.spatial_factor
    if op == "encode":
        x = torch.rand(1, 3, args.frames, args.height, args.width) * 2 - 1
    else:
        x = torch.randn(1, model.config.z_dim, 1 + (args.frames - 1) // 4, args.height // f, args.width // f)
    call = model.encode if op == "encode" else model.decode
    tiling = {"tiled": tiled, "tile_size": args.tile_size, "tile_stride": args.tile_stride}
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        out = call(x, **tiling)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"before": before / 1024, "peak": peak / 1024, "added": (peak - before) / 1024,
            "output": out.numel() * out.element_size() / MIB, "seconds": seconds, "peak_reset": reset,
            "input": tuple(x.shape), "result": tuple(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=96, help="VAE base width (released: 96)")
    parser.add_argument("--frames", type=int, default=9, help="video frames, 1 + 4k")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--tile-size", type=int, nargs=2, default=(8, 12), help="latent units")
    parser.add_argument("--tile-stride", type=int, nargs=2, default=(4, 6), help="latent units")
    parser.add_argument("--child", nargs=2, metavar=("OP", "TILED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one measurement, reported to the parent as a JSON line
        op, tiled = args.child
        print(json.dumps(measure(op, tiled == "1", args)))
        return

    forwarded = [f"--dim={args.dim}", f"--frames={args.frames}", f"--height={args.height}", f"--width={args.width}",
                 "--tile-size", *map(str, args.tile_size), "--tile-stride", *map(str, args.tile_stride)]
    rows = []
    for op in ("decode", "encode"):
        for tiled in (False, True):
            done = subprocess.run([sys.executable, __file__, *forwarded, "--child", op, str(int(tiled))],
                                  capture_output=True, text=True, check=True)
            rows.append((op, tiled, json.loads(done.stdout.strip().splitlines()[-1])))

    first = rows[0][2]
    print(f"Wan-VAE dim {args.dim}, random weights, float32 CPU; video {args.frames}x{args.height}x{args.width} "
          f"(latents {tuple(first['input'][2:])}); tiles {tuple(args.tile_size)} stride {tuple(args.tile_stride)} "
          "(latent units)")
    if not all(r[2]["peak_reset"] for r in rows):
        print("note: peak RSS could not be reset before the call; 'call peak' includes model set-up")
    header = f"{'op':<7} {'mode':<8} {'model+inputs MiB':>16} {'peak MiB':>9} {'call peak MiB':>13} " \
             f"{'output MiB':>10} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for op, tiled, r in rows:
        print(f"{op:<7} {'tiled' if tiled else 'untiled':<8} {r['before']:>16.0f} {r['peak']:>9.0f} "
              f"{r['added']:>13.0f} {r['output']:>10.1f} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
