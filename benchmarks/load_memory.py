"""Peak memory of loading a DiT checkpoint: is the file ever held twice?

Writes a random bf16 checkpoint in the released layout (``--model``: Wan2.1-T2V-1.3B sizes, ~2.8 GB,
or Wan2.2-TI2V-5B, ~10 GB; ``--layers N`` keeps only N blocks when the full size does not fit the
disk or RAM), then loads it in fresh processes with ``wan_models.load_model`` and prints peak RSS
over file size. Goal: at most 1.15x when loading in the file's dtype.

    python benchmarks/load_memory.py [--model Wan2.2-TI2V-5B] [--layers N] [--dir /tmp/wan-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
import wan_models
path, dtype = sys.argv[1], sys.argv[2]
def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak_bytes()
start = time.perf_counter()
model = wan_models.load_model(path, dtype=None if dtype == "file" else getattr(torch, dtype))
seconds = time.perf_counter() - start
touched = sum(float(p.float().abs().max()) for p in model.parameters())  # fault every page in
print(json.dumps({"peak": peak_bytes(), "base": base, "seconds": seconds,
                  "params": sum(p.numel() for p in model.parameters())}))
"""

DEFAULT_MODEL = "Wan2.1-T2V-1.3B"


def dit_config(model: str, layers: int | None):
    """The ``DiTConfig`` of registry entry ``model``, cut to ``layers`` blocks."""
    from wan_models import MODELS, DiTConfig

    if model not in MODELS:
        raise SystemExit(f"unknown --model {model!r}; known: {', '.join(MODELS)}")
    config = MODELS[model].config
    if not isinstance(config, DiTConfig):
        raise SystemExit(f"{model} is not a DiT")
    return config.replace(num_layers=layers) if layers else config


def write_checkpoint(path: Path, model: str = DEFAULT_MODEL, layers: int | None = None) -> None:
    """A random bf16 ``.safetensors`` of the DiT's official keys, written one tensor at a time (a
    10 GB file never sits in memory whole)."""
    import torch

    from wan_models import WanDiT

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(dit_config(model, layers)).state_dict().items()}
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            f.write(tensor.view(torch.int16).numpy().tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"DiT sizes to write (default {DEFAULT_MODEL})")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many blocks (scaled-down file)")
    parser.add_argument("--load-dtypes", nargs="+", default=["file", "bfloat16", "float32"],
                        help="load dtypes to measure ('file' = the file's own); float32 needs ~3x the file in RAM")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="wan-load-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    layers = f"-{args.layers}layers" if args.layers else ""
    path = folder / f"{args.model}{layers}.safetensors"
    try:
        if not path.exists():
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"from load_memory import write_checkpoint; from pathlib import Path; "
                            f"write_checkpoint(Path({str(path)!r}), {args.model!r}, {args.layers!r})"], check=True)
        size = path.stat().st_size
        what = f"{args.model} sizes" + (f", {args.layers} of its blocks" if args.layers else "")
        print(f"checkpoint: {path} ({size / 1e9:.2f} GB, bf16, {what})")
        print(f"{'load dtype':<12}{'peak RSS GB':>12}{'RSS before GB':>15}{'peak / file':>13}{'seconds':>9}")
        for dtype in args.load_dtypes:
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{dtype:<12}{r['peak'] / 1e9:>12.2f}{r['base'] / 1e9:>15.2f}"
                  f"{r['peak'] / size:>13.2f}{r['seconds']:>9.1f}")
        print("goal: peak / file <= 1.15 when loading in the file's dtype (float32 doubles the bytes by design)")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
