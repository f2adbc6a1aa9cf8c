"""Peak memory of the 1.3B DiT: loading, one generation, one offloaded generation (fresh process each).

Writes a random bf16 checkpoint in the released layout (Wan2.1-T2V-1.3B sizes; ``--layers`` fewer
blocks on a CPU), then in a fresh process each:

* load: ``WanVideoPipeline.from_pretrained(model_configs=[ModelConfig(path=ckpt)])`` (DiT only);
* generate: load, then one generation of ``--steps`` steps with CFG (random text embeddings in
  place of umT5, ``output_type="latent"``: no VAE);
* offload: load with ``ModelConfig(path=ckpt, offload_device="cpu")``, ``pipe.enable_vram_management(
  num_persistent_param_in_dit=0)`` (every block streamed), the same generation.

Peak is the process's peak RSS (CPU: ``ru_maxrss``) or ``torch.cuda.max_memory_allocated`` (CUDA),
each with what the process held before loading. On a CPU the offload device and the compute device
are the same memory, so the offload row there shows only the hooks' overhead.

    python benchmarks/memory.py                                           # GPU: 30 blocks, 480x832x81, bf16
    python benchmarks/memory.py --layers 4 --frames 5 --height 128 --width 128   # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_checkpoint(path: Path, layers: int) -> None:
    from safetensors.torch import save_file

    from wan_models import MODELS, WanDiT

    with torch.device("meta"):
        model = WanDiT(MODELS["Wan2.1-T2V-1.3B"].config.replace(num_layers=layers))
    gen = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16)
               for k, v in model.state_dict().items()}, str(path))


def child(mode: str, path: str, args: argparse.Namespace) -> dict:
    from wan_runtime import ModelConfig, WanVideoPipeline

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    base = peak()
    start = time.perf_counter()
    config = ModelConfig(path=path, offload_device="cpu") if mode == "offload" else ModelConfig(path=path)
    pipe = WanVideoPipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=[config],
                                            skip_download=True, progress_bar_cmd=lambda x: x)
    loaded = peak()
    if mode == "offload":
        pipe.enable_vram_management(num_persistent_param_in_dit=0)
    if mode != "load":
        text_dim = pipe.dit.config.text_dim
        gen = torch.Generator(device).manual_seed(0)
        embeds = [torch.randn(1, 512, text_dim, generator=gen, device=device, dtype=dtype) for _ in range(2)]
        pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=args.height, width=args.width,
             num_frames=args.frames, num_inference_steps=args.steps, seed=0, output_type="latent",
             progress_bar_cmd=lambda x: x)
        if cuda:
            torch.cuda.synchronize()
    return {"base": base, "loaded": loaded, "peak": peak(), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--layers", type=int, default=30 if gpu else 4, help="DiT blocks (released: 30)")
    parser.add_argument("--frames", type=int, default=81 if gpu else 5)
    parser.add_argument("--height", type=int, default=480 if gpu else 128)
    parser.add_argument("--width", type=int, default=832 if gpu else 128)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the generation")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: temp)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return

    folder = args.dir or Path(tempfile.mkdtemp(prefix="wan-memory-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dit-{args.layers}-layers.safetensors"
    try:
        if not path.exists():
            write_checkpoint(path, args.layers)
        size = path.stat().st_size
        forwarded = [f"--layers={args.layers}", f"--frames={args.frames}", f"--height={args.height}",
                     f"--width={args.width}", f"--steps={args.steps}"]
        rows = []
        for mode in ("load", "generate", "offload"):
            done = subprocess.run([sys.executable, __file__, *forwarded, "--child", mode, str(path)],
                                  capture_output=True, text=True, check=True)
            rows.append((mode, json.loads(done.stdout.strip().splitlines()[-1])))
        where = torch.cuda.get_device_name() if gpu else "CPU"
        dtype = "bf16" if gpu else "float32 (bf16 file)"
        sizes = "" if gpu else " (CPU: reduced sizes)"
        print(f"# 1.3B DiT, {args.layers} blocks ({size / 2**30:.2f} GiB bf16 file), {dtype}, {where}; "
              f"{args.frames}x{args.height}x{args.width}, {args.steps} steps with CFG{sizes}")
        what = "peak VRAM GiB" if gpu else "peak RSS GiB"
        print(f"{'run':<22}{'before GiB':>11}{'after load GiB':>15}{what:>15}{'seconds':>9}")
        names = {"load": "load", "generate": "load + generate", "offload": "offloaded generate"}
        for mode, r in rows:
            print(f"{names[mode]:<22}{r['base'] / 2**30:>11.2f}{r['loaded'] / 2**30:>15.2f}"
                  f"{r['peak'] / 2**30:>15.2f}{r['seconds']:>9.1f}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
