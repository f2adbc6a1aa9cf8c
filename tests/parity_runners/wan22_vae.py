"""Parity runners for the Wan2.2-VAE: official ``wan/modules/vae2_2.py::WanVAE_.encode/decode``, through the
Wan 2.1 runner's calling convention (same outputs; the case's 48-channel statistics come from its inputs)."""

from __future__ import annotations

import torch

from parity_runners.vae import build, decode, encode
from parity_support import ParityCase
from wan_models.vae22 import VAE22Config, WanVAE22


def vae_encode(case: ParityCase) -> dict[str, torch.Tensor]:
    return encode(build(case, WanVAE22, VAE22Config), case)


def vae_decode(case: ParityCase) -> dict[str, torch.Tensor]:
    return decode(build(case, WanVAE22, VAE22Config), case)


RUNNERS = {"wan22_vae_encode": vae_encode, "wan22_vae_decode": vae_decode}
