"""The tiny-model recipe's VAE gate (tools/train_tiny_model.py): the held-out score tells a VAE that
keeps colour and motion through noisy latents from one that does not, and the recipe trains again
with fresh seeds until an attempt passes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from wan_models import load_model
from wan_models.vae import VAEConfig, WanVAE
from wan_runtime.assets import default_model_dir

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import train_tiny_model as recipe  # noqa: E402
from tools.shapes import sample_specs  # noqa: E402
from tools.shapes.dataset import metadata_row  # noqa: E402
from tools.shapes.render import render_array  # noqa: E402


@pytest.fixture(scope="module")
def held_out() -> tuple[list[dict[str, str]], torch.Tensor]:
    """12 clips the shipped VAE never saw (another seed than the recipe's dataset), as uint8 ``[N, 3, T, H, W]``."""
    specs = sample_specs(12, seed=99)
    clips = torch.from_numpy(np.stack([render_array(spec) for spec in specs])).permute(0, 4, 1, 2, 3)
    return [metadata_row(spec, f"{i}.mp4") for i, spec in enumerate(specs)], clips.contiguous()


def test_score_passes_the_shipped_vae_and_fails_an_untrained_one(held_out) -> None:
    rows, clips = held_out
    shipped = load_model(default_model_dir() / "Wan2.1_VAE.pth", network="vae", dtype=torch.float32).eval()
    assert recipe.score_vae(shipped, clips, rows) >= recipe.VAE_PASS
    torch.manual_seed(0)
    untrained = WanVAE(VAEConfig(dim=8)).eval()
    assert recipe.score_vae(untrained, clips, rows) < 0.5


def test_score_is_the_worst_rate_over_noise_levels(held_out) -> None:
    """Noise of 3 latent stds drowns what a VAE codes: the score with that level falls, with 0 alone it does not."""
    rows, clips = held_out
    shipped = load_model(default_model_dir() / "Wan2.1_VAE.pth", network="vae", dtype=torch.float32).eval()
    assert recipe.score_vae(shipped, clips, rows, noise_levels=(0.0,)) >= recipe.VAE_PASS
    assert recipe.score_vae(shipped, clips, rows, noise_levels=(0.0, 3.0)) < 0.5


def test_pick_vae_trains_again_until_an_attempt_passes(caplog) -> None:
    scores = {"a0": 0.95, "a1": 0.99, "a2": 1.0}
    trained = []

    def train(attempt: int) -> Path:
        trained.append(attempt)
        return Path(f"a{attempt}")

    with caplog.at_level(logging.INFO, logger="train_tiny_model"):
        assert recipe.pick_vae(train, lambda path: scores[path.name], attempts=3, threshold=0.98) == Path("a1")
    assert trained == [0, 1]
    assert "VAE attempt 0: held-out score 0.950 (below 0.98)" in caplog.text


def test_pick_vae_keeps_the_best_and_warns_when_none_passes(caplog) -> None:
    scores = {"a0": 0.9, "a1": 0.96, "a2": 0.93}
    with caplog.at_level(logging.INFO, logger="train_tiny_model"):
        best = recipe.pick_vae(lambda attempt: Path(f"a{attempt}"), lambda path: scores[path.name], attempts=3,
                               threshold=0.98)
    assert best == Path("a1")
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "no VAE attempt of 3 reached 0.98; keeping the best, a1 (score 0.960)" in warning[0].message
