"""Wan-VAE decode: ours vs diffusers' AutoencoderKLWan vs DiffSynth's WanVideoVAE, untiled and tiled.

``--family wan22``: the Wan2.2 VAE (``WanVAE22``) against diffusers' ``AutoencoderKLWan(is_residual=True)``
(the official keys renamed by ``wan_models.convert``); DiffSynth's row says why it does not run.

Same random weights in all three (the official keys for ours, ``wan_models.convert(..., to="diffusers")``
for diffusers, the official keys under DiffSynth's ``model.`` prefix for DiffSynth), loaded strictly.
Timing: fresh random normalised latents each round, the same latents for every implementation,
implementations interleaved (A B C A B C ...), round 0 a warm-up, medians. Each peer's video is
compared with ours in the same mode (max |peer - ours| / max |ours|); videos are clamped to [-1, 1]
by all three, so the script also prints how much of our video sits at the clamp.
Peak memory: each (implementation, mode) decodes once in a fresh subprocess; on CPU the peak RSS
(/proc VmHWM, reset just before the call where the kernel allows) minus the RSS before the call,
on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Tiling: ours and DiffSynth take tile size/stride in latent units (the DiffSynth pipeline's defaults
(30, 52)/(15, 26) are ours too); diffusers takes pixels (``enable_tiling(tile_sample_min_height=8*size,
..., tile_sample_stride_height=8*stride, ...)``, 16 for wan22) and tiles only frames larger than one tile.

    python benchmarks/vae_decode.py                     # GPU: 81 frames 480x832 bf16; CPU: 9x256x256 fp32
    python benchmarks/vae_decode.py --frames 5 --height 128 --width 128 --tile-size 8 8 --tile-stride 4 4
    python benchmarks/vae_decode.py --family wan22 --frames 5 --height 128 --width 128 --tile-size 4 4 --tile-stride 2 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from timing import sync  # noqa: E402
from wan_models.vae import VAEConfig, WanVAE  # noqa: E402
from wan_models.vae22 import VAE22Config, WanVAE22  # noqa: E402

IMPLS = ("ours", "diffusers", "diffsynth")
Decode = Callable[[torch.Tensor], torch.Tensor]  # normalised latents -> video in [-1, 1]

def _diffusers_vae_class() -> type:
    """diffusers' ``AutoencoderKLWan``, imported without this folder on ``sys.path``: its ``kernels.py``
    would shadow the ``kernels`` package that diffusers imports."""
    here = Path(__file__).parent.resolve()
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        from diffusers import AutoencoderKLWan
    finally:
        sys.path[:] = saved
    return AutoencoderKLWan


def build(name: str, state_dict: dict, config, device: torch.device, dtype: torch.dtype, tiled: bool,
          tile_size, tile_stride) -> Decode | str:
    """One implementation's decode at our weights, or why it cannot run."""
    wan22 = isinstance(config, VAE22Config)
    if name == "ours":
        model = (WanVAE22 if wan22 else WanVAE)(config)
        model.load_state_dict(state_dict, strict=True)
        model = model.to(device, dtype).eval()
        return lambda z: model.decode(z, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
    if name == "diffusers":
        try:
            AutoencoderKLWan = _diffusers_vae_class()
        except ImportError as e:
            return f"not installed ({e})"
        import wan_models
        from wan_models.formats import diffusers as diffusers_format

        kwargs = {k: v for k, v in diffusers_format.vae_config(config).items() if not k.startswith("_")}
        model = AutoencoderKLWan(**kwargs)  # for Wan 2.2: is_residual, 2x2 patchify, 4x16x16
        model.load_state_dict(wan_models.convert(state_dict, to="diffusers"), strict=True)
        model = model.to(device, dtype).eval()
        if tiled:
            f = config.spatial_factor
            model.enable_tiling(tile_sample_min_height=f * tile_size[0], tile_sample_min_width=f * tile_size[1],
                                tile_sample_stride_height=f * tile_stride[0],
                                tile_sample_stride_width=f * tile_stride[1])
        mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)
        # As WanPipeline does before vae.decode: undo the normalisation.
        return lambda z: model.decode((z.float() * std + mean).to(dtype), return_dict=False)[0]
    try:
        ds = peers.diffsynth_module("models.wan_video_vae")
    except ImportError as e:
        return f"not installed ({e})"
    if config.z_dim != 16:
        return f"WanVideoVAE is the z_dim 16 model only (got {config.z_dim})"
    model = ds.WanVideoVAE(z_dim=config.z_dim)
    if config.dim != 96:  # WanVideoVAE builds the released width; a narrower one for quick runs
        model.model = ds.VideoVAE_(dim=config.dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
                                   num_res_blocks=config.num_res_blocks, attn_scales=list(config.attn_scales),
                                   temperal_downsample=list(config.temperal_downsample)).eval()
    model.model.load_state_dict(state_dict, strict=True)  # == WanVideoVAE's "model." + official keys
    model = model.to(device, dtype).eval()
    # As WanVideoPipeline does: vae.decode(latents, device=..., tiled=..., tile_size=..., tile_stride=...).
    return lambda z: model.decode(z, device=device, tiled=tiled, tile_size=tuple(tile_size),
                                  tile_stride=tuple(tile_stride))


def random_state_dict(config) -> dict:
    torch.manual_seed(0)
    return (WanVAE22 if isinstance(config, VAE22Config) else WanVAE)(config).state_dict()  # own initialisation


def latent_shape(args, config) -> tuple[int, ...]:
    f = config.spatial_factor
    return (1, config.z_dim, 1 + (args.frames - 1) // 4, args.height // f, args.width // f)


def setup(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.family == "wan22":
        config = VAE22Config(dim=args.dim or 160, dec_dim=args.dec_dim or 256)
    else:
        config = VAEConfig(dim=args.dim or 96)
    return device, dtype, config


def child(args) -> None:
    """One decode in a fresh process; prints a JSON line with memory figures."""
    sys.path.insert(0, str(Path(__file__).parent))
    from vae_memory import _reset_peak, _status_kib

    name, tiled = args.child[0], args.child[1] == "1"
    device, dtype, config = setup(args)
    fn = build(name, random_state_dict(config), config, device, dtype, tiled, args.tile_size, args.tile_stride)
    if not callable(fn):
        print(json.dumps({"error": fn}))
        return
    z = torch.randn(latent_shape(args, config), generator=torch.Generator().manual_seed(1)).to(device, dtype)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        reset = True
    else:
        reset = _reset_peak()
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    with torch.no_grad():
        fn(z)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    print(json.dumps({"before": before, "peak": peak, "seconds": seconds, "reset": reset}))


def decode_flops(fn, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs of one decode (torch's counter: convolutions and matmuls), counted on the plain conv path."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), counter:
        fn(torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device, dtype))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("wan21", "wan22"), default="wan21", help="Wan 2.1 or Wan 2.2 VAE")
    parser.add_argument("--dim", type=int, default=None, help="VAE (encoder) base width (released: 96; wan22 160)")
    parser.add_argument("--dec-dim", type=int, default=None, help="wan22 decoder width (released: 256)")
    parser.add_argument("--frames", type=int, default=None, help="video frames, 1 + 4k (81 GPU, 9 CPU)")
    parser.add_argument("--height", type=int, default=None, help="480 GPU, 256 CPU")
    parser.add_argument("--width", type=int, default=None, help="832 GPU, 256 CPU")
    parser.add_argument("--tile-size", type=int, nargs=2, default=(30, 52), help="latent units")
    parser.add_argument("--tile-stride", type=int, nargs=2, default=(15, 26), help="latent units")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory runs")
    parser.add_argument("--modes", nargs="+", choices=("untiled", "tiled"), default=("untiled", "tiled"),
                        help="decode modes to run (the tiled CPU runs take 3x longer)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "TILED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    args.frames = args.frames or (81 if gpu else 9)
    args.height = args.height or (480 if gpu else 256)
    args.width = args.width or (832 if gpu else 256)
    if args.child:
        child(args)
        return

    device, dtype, config = setup(args)
    sd = random_state_dict(config)
    modes = tuple(m == "tiled" for m in dict.fromkeys(args.modes))
    impls = {(n, t): build(n, sd, config, device, dtype, t, args.tile_size, args.tile_stride)
             for t in modes for n in IMPLS}
    runnable = {k: v for k, v in impls.items() if callable(v)}
    flops = {t: decode_flops(impls[("ours", t)], latent_shape(args, config), device, dtype) for t in modes}
    times = {k: [] for k in runnable}
    diffs = {k: [] for k in runnable}
    clamped = []
    gen = torch.Generator().manual_seed(0)
    shape = latent_shape(args, config)
    with torch.no_grad():
        for round_ in range(args.rounds + 1):
            z = torch.randn(shape, generator=gen).to(device, dtype)
            for tiled in modes:
                outs = {}
                for (name, t), fn in runnable.items():
                    if t != tiled:
                        continue
                    sync(device)
                    start = time.perf_counter()
                    outs[name] = fn(z).float()
                    sync(device)
                    if round_:
                        times[(name, t)].append(time.perf_counter() - start)
                ref = outs["ours"]
                if not tiled:
                    clamped.append((ref.abs() >= 1).float().mean().item())
                for name, out in outs.items():
                    diffs[(name, tiled)].append(((out - ref).abs().max() / ref.abs().max()).item())

    memory = {}
    if not args.no_memory:
        forwarded = [f"--family={args.family}", f"--dim={config.dim}", f"--dec-dim={getattr(config, 'dec_dim', 0)}",
                     f"--frames={args.frames}", f"--height={args.height}",
                     f"--width={args.width}", "--tile-size", *map(str, args.tile_size),
                     "--tile-stride", *map(str, args.tile_stride)]
        for key in runnable:
            done = subprocess.run([sys.executable, __file__, *forwarded, "--child", key[0], str(int(key[1]))],
                                  capture_output=True, text=True, check=True)
            memory[key] = json.loads(done.stdout.strip().splitlines()[-1])

    where = torch.cuda.get_device_name() if gpu else "CPU"
    widths = f"dim {config.dim}" + (f", dec_dim {config.dec_dim}" if args.family == "wan22" else "")
    print(f"# {args.family} VAE decode, {widths}, random weights, {str(dtype)[6:]}, {where}; video "
          f"{args.frames}x{args.height}x{args.width} (latents {shape[2:]}); tiles {tuple(args.tile_size)} stride "
          f"{tuple(args.tile_stride)} latent units; median of {args.rounds} interleaved rounds")
    mem_name = "peak alloc MiB" if gpu else "call peak RSS MiB"
    print(f"{'impl':<11}{'mode':<9}{'ms':>10}{'GFLOP/s':>9}{'vs ours':>9}{mem_name:>19}{'max rel diff':>14}")
    for (name, tiled), fn in impls.items():
        mode = "tiled" if tiled else "untiled"
        if not callable(fn):
            print(f"{name:<11}{mode:<9}  {fn}")
            continue
        ms = statistics.median(times[(name, tiled)]) * 1e3
        base = statistics.median(times[("ours", tiled)]) * 1e3
        m = memory.get((name, tiled))
        mem = f"{(m['peak'] - m['before']) / 2**20:.0f}" if m else "-"
        rate = flops[tiled] / ms / 1e6
        print(f"{name:<11}{mode:<9}{ms:>10.0f}{rate:>9.1f}{ms / base:>9.2f}{mem:>19}{max(diffs[(name, tiled)]):>14.2e}")
    if memory and not all(m.get("reset", True) for m in memory.values()):
        print("note: peak RSS could not be reset before the call; the memory column includes set-up")
    counted = ", ".join(f"{flops[t] / 1e9:.0f} {'tiled' if t else 'untiled'}" for t in modes)
    at_clamp = f"{max(clamped):.1%}" if clamped else "-"
    print(f"# share of our untiled video at the [-1, 1] clamp: {at_clamp}; GFLOP/s: our decode's "
          f"convolution FLOPs ({counted}) over each time")
    from importlib.metadata import version

    versions = [f"{n} {version(n)}" for n in ("diffusers", "diffsynth") if any(callable(impls[(n, t)]) for t in modes)]
    if any(callable(impls[("diffsynth", t)]) for t in modes):
        versions.append(f"diffsynth import: {peers.DIFFSYNTH_IMPORT}")
    print("# " + "; ".join(versions + [f"torch {torch.__version__}"]))


if __name__ == "__main__":
    main()
