"""Write a training folder of procedural shape videos: ``OUT_DIR/videos/NNNNN.mp4`` + ``OUT_DIR/metadata.csv``.

Each clip is one anti-aliased circle, square or triangle in a named colour moving left, right, up
or down at constant speed (or standing still) over a white, black, gray or lightly textured
("noisy") background, captioned like "a red circle moving left on a white background". The csv has
the trainer's ``video,prompt`` columns plus ``shape,color,direction,background`` for evaluation.
The same seed gives the same folder.

    python tools/shapes_dataset.py OUT_DIR --count 5000 --seed 0 --frames 17 --size 64
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tools`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.shapes import BACKGROUNDS, write_dataset


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, write the folder, print where and how fast."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="dataset folder (created; same-named files are replaced)")
    parser.add_argument("--count", type=int, default=1000, help="number of clips (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (Wan wants 4k+1; default 17)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (Wan wants a multiple of 16; default 64)")
    parser.add_argument("--backgrounds", default=",".join(BACKGROUNDS),
                        help=f"comma-separated subset of {','.join(BACKGROUNDS)} (default all)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("wan_runtime").setLevel(logging.WARNING)  # not one line per saved clip
    start = time.perf_counter()
    metadata = write_dataset(args.out_dir, args.count, seed=args.seed, frames=args.frames, size=args.size,
                             backgrounds=[b for b in args.backgrounds.split(",") if b], workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"{args.count} clips in {seconds:.1f} s ({args.count / seconds:.0f} clips/s): {metadata}")


if __name__ == "__main__":
    main()
