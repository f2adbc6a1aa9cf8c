"""The random-weight DiT and latent shape that the DiT benchmarks share (real config, GPU/CPU defaults)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from wan_models import MODELS, WanDiT
from wan_models.dit_config import DiTConfig


@dataclass
class DiTBench:
    """A DiT with N(0, 0.02) weights in the benchmark's dtype, and what its inputs look like."""

    dit: WanDiT
    config: DiTConfig
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    frames: int
    height: int
    width: int

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, self.config.in_dim, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def tokens(self) -> int:
        _, _, f, h, w = self.latent_shape
        return f * h * w // 4


def add_size_flags(parser: argparse.ArgumentParser) -> None:
    """``--height --width --frames --layers --model --rounds``, defaults by device."""
    parser.add_argument("--height", type=int, default=None, help="480 on a GPU, 256 on a CPU")
    parser.add_argument("--width", type=int, default=None, help="832 on a GPU, 256 on a CPU")
    parser.add_argument("--frames", type=int, default=None, help="81 on a GPU, 9 on a CPU")
    parser.add_argument("--layers", type=int, default=None, help="blocks of the model (default: all)")
    parser.add_argument("--model", default="Wan2.1-T2V-1.3B")
    parser.add_argument("--rounds", type=int, default=5)


def random_dit(args: argparse.Namespace) -> DiTBench:
    """The model of ``--model`` (cut to ``--layers``): bf16 on a GPU, float32 on a CPU, fixed seed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    config = MODELS[args.model].config
    if args.layers:
        config = config.replace(num_layers=args.layers)
    with torch.device(device):
        dit = WanDiT(config)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, device=device) * 0.02)
    dtype = torch.bfloat16 if gpu else torch.float32
    return DiTBench(dit.to(dtype).eval(), config, device, dtype, generator, args.frames or (81 if gpu else 9),
                    args.height or (480 if gpu else 256), args.width or (832 if gpu else 256))
