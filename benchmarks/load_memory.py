"""Peak memory of loading a 1.3B-size DiT checkpoint: is the file ever held twice?

Writes a random bf16 checkpoint in the released layout (Wan2.1-T2V-1.3B sizes, ~2.8 GB), then
loads it in fresh processes with ``wan_models.load_model`` and prints peak RSS over file size.
Goal: at most 1.15x when loading in the file's dtype.

    python benchmarks/load_memory.py [--dir /tmp/wan-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def write_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from wan_models import MODELS, WanDiT

    with torch.device("meta"):
        model = WanDiT(MODELS["Wan2.1-T2V-1.3B"].config)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16)
               for k, v in model.state_dict().items()}
    save_file(tensors, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="wan-load-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "diffusion_pytorch_model.safetensors"
    try:
        if not path.exists():
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"from load_memory import write_checkpoint; from pathlib import Path; "
                            f"write_checkpoint(Path({str(path)!r}))"], check=True)
        size = path.stat().st_size
        print(f"checkpoint: {path} ({size / 1e9:.2f} GB, bf16, Wan2.1-T2V-1.3B sizes)")
        print(f"{'load dtype':<12}{'peak RSS GB':>12}{'RSS before GB':>15}{'peak / file':>13}{'seconds':>9}")
        for dtype in ("file", "bfloat16", "float32"):
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
