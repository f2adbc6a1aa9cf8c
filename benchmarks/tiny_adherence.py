"""Prompt adherence of a tiny shapes model: does "a red circle moving left" come out red and moving left?

For every prompt of a grid (colours x shapes x directions, on one background) and several seeds the
model generates a clip, and :mod:`tools.shapes.measure` reads off its colour and motion direction
(shape too, reported but not a target). Prints hit rates overall, per colour and per direction,
against the targets for the embedded model: colour >= 90 %, direction >= 80 %.

``--check-measure N`` first validates the measurement itself on N ground-truth dataset clips (all
backgrounds, through an mp4 round trip): it should read them ~100 % right, or the model table
means little.

    python benchmarks/tiny_adherence.py [--model PATH] [--small] [--seeds 3] [--steps 20]
                                        [--check-measure 100] [--measure-only] [--save DIR]

The model folder holds ``diffusion_pytorch_model*.safetensors``, ``models_t5_umt5-xxl-enc-bf16.pth``,
``Wan2.1_VAE.pth`` and the tokenizer folder ``google/umt5-xxl/``; the default is the embedded
model, ``wan_runtime/assets/tiny-shapes``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tools.shapes

from tools.shapes import (  # noqa: E402
    BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, measure_clip, prompt_for, render_clip, sample_specs)

if TYPE_CHECKING:
    from PIL import Image

    from wan_runtime import WanVideoPipeline

DEFAULT_MODEL = REPO / "packages/wan-runtime/src/wan_runtime/assets/tiny-shapes"
SMALL_GRID = (("red", "blue"), ("circle", "square"), ("left", "right"))
TARGETS = {"color": 0.90, "direction": 0.80}
CHECK_SEED = 12345  # dataset seed of the --check-measure clips


def check_model_folder(folder: Path) -> None:
    """Fail with a clear message unless ``folder`` holds a loadable text-to-video model."""
    from wan_models.configs import DIT_FILES, T5_FILE, T5_TOKENIZER, VAE_FILE

    if not folder.is_dir():
        hint = (" (the embedded tiny-shapes model has not been added to the repository yet)"
                if folder == DEFAULT_MODEL else "")
        raise SystemExit(f"error: no model folder at {folder}{hint}; pass --model PATH to a folder with "
                         f"{DIT_FILES}, {T5_FILE}, {VAE_FILE} and {T5_TOKENIZER}")
    missing = [p for p in (DIT_FILES, T5_FILE, VAE_FILE) if not any(folder.glob(p))]
    missing += [] if (folder / T5_TOKENIZER).is_dir() else [T5_TOKENIZER]
    if missing:
        raise SystemExit(f"error: model folder {folder} lacks {', '.join(missing)}")


def load_pipeline(folder: Path, device: str, dtype: str) -> "WanVideoPipeline":
    """``WanVideoPipeline`` from the DiT, T5 and VAE files of ``folder`` and its umT5 tokenizer folder."""
    import torch

    from wan_models.configs import DIT_FILES, T5_FILE, T5_TOKENIZER, VAE_FILE
    from wan_runtime import ModelConfig, WanVideoPipeline

    configs = [ModelConfig(path=[str(p) for p in sorted(folder.glob(pattern))])
               for pattern in (DIT_FILES, T5_FILE, VAE_FILE)]
    return WanVideoPipeline.from_pretrained(torch_dtype=getattr(torch, dtype), device=device, model_configs=configs,
                                            tokenizer_config=ModelConfig(path=str(folder / T5_TOKENIZER)))


def rate(hits: int, total: int) -> str:
    """``hits / total`` as a table cell ("-" for an empty group)."""
    return f"{hits / total:6.3f}" if total else "     -"


def print_hit_table(title: str, results: Sequence[dict], attributes: Iterable[str],
                    targets: dict[str, float]) -> None:
    """Overall hit rate of each attribute (expected ``x`` vs measured ``measured_x``) against ``targets``."""
    print(f"\n{title}")
    print(f"{'attribute':<18} {'hits':>5} {'total':>5} {'rate':>6}  target")
    for name in attributes:
        hits = sum(r[name] == r[f"measured_{name}"] for r in results)
        target = targets.get(name)
        met = bool(results) and target is not None and hits / len(results) >= target
        verdict = "" if target is None else f">= {target:.2f} {'met' if met else 'NOT met'}"
        print(f"{name:<18} {hits:>5} {len(results):>5} {rate(hits, len(results))}  {verdict}")
    both = sum(r["color"] == r["measured_color"] and r["direction"] == r["measured_direction"] for r in results)
    print(f"{'color+direction':<18} {both:>5} {len(results):>5} {rate(both, len(results))}")
    blobless = sum(r["measured_color"] is None for r in results)
    print(f"{'no blob found':<18} {blobless:>5} {len(results):>5} {rate(blobless, len(results))}")


def print_breakdown(results: Sequence[dict], key: str) -> None:
    """Hit rates of colour, direction and shape for each value of ``key`` (e.g. per colour)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r[key]].append(r)
    print(f"\nper {key:<13} {'n':>4} {'color':>6} {'direction':>9} {'shape':>6}   "
          "most often measured (color / direction)")
    for value, group in groups.items():
        cells = [rate(sum(r[a] == r[f"measured_{a}"] for r in group), len(group))
                 for a in ("color", "direction", "shape")]
        common = [Counter(str(r[f"measured_{a}"]) for r in group).most_common(1)[0][0]
                  for a in ("color", "direction")]
        print(f"  {value:<15} {len(group):>4} {cells[0]} {cells[1]:>9} {cells[2]}   {common[0]} / {common[1]}")


def measured(row: dict, frames: Sequence["Image.Image"]) -> dict:
    """``row`` plus the measured colour, direction, shape and displacement of ``frames``."""
    m = measure_clip(frames)
    return {**row, "measured_color": m.color, "measured_direction": m.direction, "measured_shape": m.shape,
            "dx": round(m.dx, 2), "dy": round(m.dy, 2)}


def check_measure(count: int, frames: int, size: int) -> None:
    """Measure ``count`` ground-truth dataset clips after an mp4 round trip and print the hit rates."""
    from wan_runtime.video_io import load_video, save_video

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(sample_specs(count, seed=CHECK_SEED, frames=frames, size=size)):
            path = save_video(render_clip(spec), Path(tmp) / f"{i}.mp4", fps=16, quality=9)
            row = {"color": spec.color, "direction": spec.direction, "shape": spec.shape, "background": spec.background}
            results.append(measured(row, load_video(path)))
    print_hit_table(f"measurement check: {count} dataset clips (all backgrounds, mp4 round trip)",
                            results, ("color", "direction", "shape"), {"color": 1.0, "direction": 1.0})
    print_breakdown(results, "background")


def run_grid(args: argparse.Namespace) -> list[dict]:
    """Generate and measure every prompt of the grid for every seed; returns one row per clip."""
    pipe = load_pipeline(args.model, args.device, args.dtype)
    colors, shapes, directions = SMALL_GRID if args.small else (tuple(COLORS), SHAPES, DIRECTIONS)
    grid = list(itertools.product(colors, shapes, directions))
    print(f"model {args.model}: {len(colors)} colours x {len(shapes)} shapes x {len(directions)} directions "
          f"on {args.background}, seeds 0..{args.seeds - 1} ({len(grid) * args.seeds} clips, "
          f"{args.width}x{args.height}x{args.frames}, {args.steps} steps, cfg {args.cfg_scale}, shift {args.shift})")
    results = []
    start = time.perf_counter()
    for (color, shape, direction), seed in itertools.product(grid, range(args.seeds)):
        prompt = prompt_for(shape, color, direction, args.background)
        frames = pipe(prompt=prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_frames=args.frames, num_inference_steps=args.steps, cfg_scale=args.cfg_scale,
                      sigma_shift=args.shift, seed=seed, progress_bar_cmd=lambda steps: steps)
        row = {"prompt": prompt, "seed": seed, "color": color, "shape": shape, "direction": direction}
        results.append(measured(row, frames))
        if args.save is not None:
            from wan_runtime.video_io import save_video

            save_video(frames, args.save / f"{color}_{shape}_{direction}_s{seed}.mp4", fps=16, quality=9)
    seconds = time.perf_counter() - start
    print(f"generated in {seconds:.1f} s ({seconds / max(len(results), 1):.2f} s per clip)")
    if args.save is not None:
        with (args.save / "measurements.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    return results


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the measurement check and/or the model grid, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder (default: the embedded one)")
    parser.add_argument("--small", action="store_true", help="2 colours x 2 shapes x 2 directions")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per prompt (default 3)")
    parser.add_argument("--background", default="white", choices=list(BACKGROUNDS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=3.0,
                        help="default: the embedded model's (DEFAULT_MODEL_SETTINGS)")
    parser.add_argument("--shift", type=float, default=5.0, help="sigma shift of the sampler (default 5)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--check-measure", type=int, default=0, metavar="N",
                        help="first measure N ground-truth dataset clips (validates the measurement)")
    parser.add_argument("--measure-only", action="store_true", help="only the --check-measure part (no model)")
    parser.add_argument("--save", type=Path, default=None,
                        help="also write each generated clip and measurements.csv here")
    args = parser.parse_args(argv)
    if args.measure_only and args.check_measure < 1:
        parser.error("--measure-only needs --check-measure N")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if not args.measure_only:
        check_model_folder(args.model)
    if args.check_measure:
        check_measure(args.check_measure, args.frames, min(args.height, args.width))
    if args.measure_only:
        return
    results = run_grid(args)
    print_hit_table("adherence", results, ("color", "direction", "shape"), TARGETS)
    print_breakdown(results, "color")
    print_breakdown(results, "direction")


if __name__ == "__main__":
    main()
