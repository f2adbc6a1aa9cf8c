"""Re-make the embedded tiny-shapes model (``wan_runtime/assets/tiny-shapes``) from scratch on a CPU.

Stages (each one command, seeded; run them all or pick with ``--stages``), everything under WORK:

1. ``data``: 3000 procedural shape clips (17 frames, 64x64) with ``tools/shapes_dataset.py``.
2. ``vae``: a ``VAEConfig(dim=8)`` Wan-VAE trained for reconstruction (``python -m wan_train.vae``),
   on single frames first, then on whole clips; kept only if held-out clips keep their colour and
   direction through it, also with noise on the latents (else trained again with the next seeds).
3. ``init``: the starting release: random-but-fixed tiny umT5, a tokenizer trained on the captions,
   the trained VAE, a freshly initialised tiny DiT (``config.json`` included).
4. ``check_vae``: round-trip held-out clips through the VAE and measure them (logged).
5. ``cache``: ``python -m wan_train --cache_latents`` (VAE latents + T5 contexts of 2000 clips, once).
6. ``dit``: ``python -m wan_train --use_cached`` full training of the DiT (flow matching, uniform
   timestep weights, a moving average of the weights).
7. ``ship``: the last DiT checkpoint (the average) in bfloat16 + the other files into the asset folder.

    python tools/train_tiny_model.py /tmp/tiny [--stages data,vae,...] [--dit_epochs 36]

See ``docs/tiny_model.md`` for the numbers of the shipped run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from wan_models import WanDiT, load_model
from wan_models.configs import T5_FILE, T5_TOKENIZER, VAE_FILE
from wan_models.t5 import T5Config
from wan_models.vae import WanVAE
from wan_runtime import tiny_release
from wan_train.vae_training import first_frame_mismatch, load_clips, still_spread, to_video

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.shapes import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, measure_clip, prompt_for  # noqa: E402

logger = logging.getLogger("train_tiny_model")

ASSET = REPO / "packages/wan-runtime/src/wan_runtime/assets/tiny-shapes"
STAGES = ("data", "vae", "init", "check_vae", "cache", "dit", "ship")
CLIPS, SEED, FRAMES, SIZE = 3000, 0, 17, 64
VAE_DIM, VAE_STEPS = 8, (1500, 250)  # picture steps, video steps
VAE_LATENT_NOISE = 0.1  # training noise on the latents: a decoder that tolerates the DiT's imprecise latents
VAE_ATTEMPTS, VAE_PASS = 3, 0.98  # tries with fresh seeds; the held-out hit rate a VAE must reach
VAE_CHECK_NOISE = (0.0, 0.3)  # latent noise (in latent stds) of the held-out round trips
HELD_OUT = 120  # the last clips of the dataset: used by neither the VAE nor the DiT
T5_SIZES = dict(vocab=256, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2, num_buckets=32)
DIT_SIZES = dict(dim=192, ffn_dim=768, num_heads=3, num_layers=6, freq_dim=256)
DIT_LR, DIT_BATCH, DIT_EMA = 1e-3, 16, 0.999
DIT_EMPTY_PROMPT = 0.1  # unconditional samples, for classifier-free guidance
DIT_FOREGROUND_WEIGHT = 5.0  # the moving shape's latent cells count 5x in the flow-matching loss
DIT_CLIPS = 2000


def run(*command: str, env: dict[str, str] | None = None) -> None:
    """Run one stage's command (logged with its extra environment, so the log holds the exact commands)."""
    logger.info("$ %s%s", "".join(f"{k}={v} " for k, v in (env or {}).items()), " ".join(command))
    bars = {} if sys.stderr.isatty() else {"TQDM_MININTERVAL": "30"}  # a log file: a bar line per 30 s
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, **bars, **(env or {})})


def stage_data(work: Path) -> None:
    """The training clips."""
    run(sys.executable, "tools/shapes_dataset.py", str(work / "data"), "--count", str(CLIPS), "--seed", str(SEED),
        "--frames", str(FRAMES), "--size", str(SIZE))


def stage_vae(work: Path) -> None:
    """Train the VAE until an attempt passes :func:`score_vae` (at most ``VAE_ATTEMPTS``, each with
    fresh seeds; the best is kept if none passes): one attempt from a seed can land in a VAE whose
    decoder turns slightly-off latents into off colours, which the DiT then cannot repair."""
    rows, clips = held_out(work)

    def score(path: Path) -> float:
        return score_vae(load_model(path, network="vae", dtype=torch.float32).eval(), clips, rows)

    best = pick_vae(lambda attempt: train_vae_attempt(work, attempt), score)
    shutil.copy(best, work / "vae/Wan2.1_VAE.pth")


def train_vae_attempt(work: Path, attempt: int) -> Path:
    """One VAE (seeds ``2 * attempt`` and ``2 * attempt + 1`` for its two phases), identity-initialised,
    coding video frame by frame at the start, object pixels weighted x10, on random 32x32 crops:
    single random frames first (pictures: the causal VAE's one-frame first chunk, cheap, and the code
    every frame starts from), then whole 17-frame clips at a lower rate, which teach the temporal taps
    the motion inside each 4-frame chunk, with frame 0's latent statistics held to the later frames'."""
    common = ["--dataset_base_path", str(work / "data"), "--dataset_metadata_path", str(work / "data/metadata.csv"),
              "--max_clips", "1500", "--dim", str(VAE_DIM), "--num_frames", str(FRAMES), "--crop", "32",
              "--fg_weight", "10", "--latent_noise", str(VAE_LATENT_NOISE), "--save_steps", "100"]
    vae = [sys.executable, "-m", "wan_train.vae", *common]
    folder = work / f"vae/attempt-{attempt}"
    pictures, seed = folder / "pictures.pth", SEED + 2 * attempt
    run(*vae, "--pictures", "--seed", str(seed), "--batch_size", "16", "--learning_rate", "2e-3",
        "--steps", str(VAE_STEPS[0]), "--output", str(pictures))
    run(*vae, "--seed", str(seed + 1), "--batch_size", "4", "--learning_rate", "3e-4", "--first_frame_match", "1",
        "--steps", str(VAE_STEPS[1]), "--resume", str(pictures), "--output", str(folder / "Wan2.1_VAE.pth"))
    return folder / "Wan2.1_VAE.pth"


def pick_vae(train: Callable[[int], Path], score: Callable[[Path], float],
             attempts: int = VAE_ATTEMPTS, threshold: float = VAE_PASS) -> Path:
    """Train attempts ``0, 1, ...`` until one scores ``threshold`` or more; the best one if none does."""
    scored: list[tuple[float, Path]] = []
    for attempt in range(attempts):
        path = train(attempt)
        scored.append((score(path), path))
        logger.info("VAE attempt %d: held-out score %.3f (%s %.2f)", attempt, scored[-1][0],
                    "passes" if scored[-1][0] >= threshold else "below", threshold)
        if scored[-1][0] >= threshold:
            return path
    best = max(scored, key=lambda item: item[0])
    logger.warning("no VAE attempt of %d reached %.2f; keeping the best, %s (score %.3f)", attempts, threshold,
                   best[1], best[0])
    return best[1]


def held_out(work: Path) -> tuple[list[dict[str, str]], torch.Tensor]:
    """The last ``HELD_OUT`` dataset rows and their clips (uint8 ``[N, 3, T, H, W]``), listed in ``check.csv``."""
    with open(work / "data/metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))[-HELD_OUT:]
    meta = work / "check.csv"
    with open(meta, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows, load_clips(work / "data", meta, FRAMES, SIZE, SIZE)


def decoded_frames(video: torch.Tensor) -> np.ndarray:
    """A decoded ``[B, 3, T, H, W]`` video in [-1, 1] as uint8 frames ``[B, T, H, W, 3]``."""
    return ((video + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 4, 1).numpy()


def score_vae(vae: WanVAE, clips: torch.Tensor, rows: Sequence[dict[str, str]],
              noise_levels: Sequence[float] = VAE_CHECK_NOISE) -> float:
    """The worst hit rate, over colour and direction and each latent noise level, of the uint8 ``clips``
    (labels in ``rows``) coded and decoded by ``vae``: Gaussian noise of that many latent stds stands in
    for the error of the latents a DiT generates."""
    rates = []
    with torch.no_grad():
        z = vae.encode(to_video(clips))
        for level in noise_levels:
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(SEED))
            found = [measure_clip(list(clip)) for clip in decoded_frames(vae.decode(z + level * noise))]
            for attribute in ("color", "direction"):
                rates.append(sum(getattr(m, attribute) == row[attribute] for m, row in zip(found, rows)) / len(rows))
    return min(rates)


def captions() -> list[str]:
    """Every caption the shapes world can produce."""
    return [prompt_for(*c) for c in itertools.product(SHAPES, COLORS, DIRECTIONS, BACKGROUNDS)]


def stage_init(work: Path) -> None:
    """The release to train from: fixed random T5, caption tokenizer, trained VAE, new DiT."""
    release = work / "release"
    t5 = T5Config(**T5_SIZES)
    tiny_release.write_t5(release / T5_FILE, t5, seed=SEED)
    tiny_release.write_tokenizer(release / T5_TOKENIZER, vocab_size=T5_SIZES["vocab"], seed=SEED,
                                 texts=captions() * 4)
    shutil.copy(work / "vae/Wan2.1_VAE.pth", release / VAE_FILE)
    config = tiny_release.tiny_dit_config("Wan2.1-T2V-1.3B", t5).replace(**DIT_SIZES)
    torch.manual_seed(SEED)
    dit = WanDiT(config)  # PyTorch's layer initialisation, plus the official init of what it leaves empty:
    weights = dit.state_dict()  # modulation ~ N(0, 1/dim), the output head at zero
    for key, value in weights.items():
        if key.endswith("modulation"):
            weights[key] = torch.randn(value.shape) / config.dim ** 0.5
        elif key.startswith("head.head."):
            weights[key] = torch.zeros_like(value)
    release.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()},
              str(release / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (release / "config.json").write_text(json.dumps(tiny_release.official_config_json(config), indent=2))
    logger.info("DiT %.2f M parameters, T5 %s", sum(p.numel() for p in dit.parameters()) / 1e6, T5_SIZES)


def stage_check_vae(work: Path) -> None:
    """Round-trip the held-out clips through the VAE and measure them per background: colour/direction
    must survive, and frame 0 (coded alone) must come back as well as the others (its L1 is logged
    apart, as an average over all frames hides it)."""
    vae = load_model(work / "vae/Wan2.1_VAE.pth", network="vae", dtype=torch.float32).eval()
    rows, raw = held_out(work)
    clips = to_video(raw)
    with torch.no_grad():
        z = vae.encode(clips)
        video = vae.decode(z)
        spread = still_spread(vae, clips, torch.Generator().manual_seed(SEED))
    error = (video - clips).abs().mean(dim=(1, 3, 4))  # [clip, frame]
    groups: dict[str, list[tuple[bool, bool, float, float]]] = defaultdict(list)
    for row, clip, err in zip(rows, decoded_frames(video), error):
        m = measure_clip(list(clip))
        groups[row["background"]].append((m.color == row["color"], m.direction == row["direction"],
                                          err[0].item(), err[1:].mean().item()))
    for name, group in [("all", [g for gs in groups.values() for g in gs]), *sorted(groups.items())]:
        n = len(group)
        logger.info("VAE round trip, %s backgrounds (%d held-out clips): colour %d/%d, direction %d/%d, "
                    "L1 frame 0 %.3f, frames 1.. %.3f", name, n, sum(g[0] for g in group), n,
                    sum(g[1] for g in group), n, sum(g[2] for g in group) / n, sum(g[3] for g in group) / n)
    logger.info("held-out score with latent noise %s: %.3f", VAE_CHECK_NOISE, score_vae(vae, raw, rows))
    logger.info("normalised latents: mean %.2f std %.2f, frame 0 std %.2f (statistics mismatch %.3f); still-clip "
                "latent spread %.4f", z.mean().item(), z.std().item(), z[:, :, 0].std().item(),
                first_frame_mismatch(z).item(), spread.item())


def _train_flags(work: Path) -> list[str]:
    return ["--dataset_base_path", str(work / "data"), "--dataset_metadata_path", str(work / "data/train.csv"),
            "--height", str(SIZE), "--width", str(SIZE), "--num_frames", str(FRAMES),
            "--torch_dtype", "float32", "--dataset_num_workers", "0", "--seed", str(SEED)]


def stage_cache(work: Path) -> None:
    """VAE latents and T5 contexts of the first DIT_CLIPS clips, once: two one-thread processes, each
    encoding every other clip (a clip's small convolutions barely use a second thread)."""
    lines = (work / "data/metadata.csv").read_text().splitlines(keepends=True)
    (work / "data/train.csv").write_text("".join(lines[:DIT_CLIPS + 1]))
    release = work / "release"
    paths = [str(release / "diffusion_pytorch_model.safetensors"), str(release / "models_t5_umt5-xxl-enc-bf16.pth"),
             str(release / "Wan2.1_VAE.pth")]
    run(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "-m", "wan_train", *_train_flags(work), "--model_paths", json.dumps(paths), "--cache_latents",
        str(work / "cache"), env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})


def stage_dit(work: Path, epochs: int, resume: bool) -> None:
    """Full flow-matching training of the DiT on the cache."""
    release = work / "release"
    run(sys.executable, "-m", "wan_train", *_train_flags(work),
        "--model_paths", json.dumps([str(release / "diffusion_pytorch_model.safetensors")]),
        "--use_cached", str(work / "cache"), "--trainable_models", "dit", "--learning_rate", str(DIT_LR),
        "--batch_size", str(DIT_BATCH), "--foreground_weight", str(DIT_FOREGROUND_WEIGHT),
        "--ema_decay", str(DIT_EMA), "--timestep_weighting", "uniform",
        "--num_epochs", str(epochs), "--empty_prompt_ratio", str(DIT_EMPTY_PROMPT),
        "--output_path", str(work / "dit"), "--remove_prefix_in_ckpt", "pipe.dit.",
        "--save_steps", "500", "--no_gradient_checkpointing", *(["--resume"] if resume else []))


def latest_checkpoint(folder: Path) -> Path:
    """The newest ``epoch-N``/``step-N`` safetensors of a training run."""
    found = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no checkpoint in {folder}")
    return found[-1]


def stage_ship(work: Path, checkpoint: Path | None) -> None:
    """The asset folder: trained DiT in bfloat16 + config.json, T5, VAE, tokenizer."""
    checkpoint = checkpoint or latest_checkpoint(work / "dit")
    release = work / "release"
    if ASSET.exists():
        shutil.rmtree(ASSET)
    ASSET.mkdir(parents=True)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(checkpoint)).items()}
    save_file(weights, str(ASSET / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        shutil.copy(release / name, ASSET / name)
    shutil.copytree(release / "google", ASSET / "google")
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    logger.info("shipped %s (%.1f MB) from %s", ASSET, size / 1e6, checkpoint)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen stages."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="work folder (dataset, cache, checkpoints; not the repository)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--dit_epochs", type=int, default=36)
    parser.add_argument("--resume", action="store_true", help="dit: continue the last run's state")
    parser.add_argument("--checkpoint", type=Path, default=None, help="ship: this DiT checkpoint (default newest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for stage in args.stages.split(","):
        start = time.perf_counter()
        if stage == "dit":
            stage_dit(args.work, args.dit_epochs, args.resume)
        elif stage == "ship":
            stage_ship(args.work, args.checkpoint)
        elif stage in STAGES:
            globals()[f"stage_{stage}"](args.work)
        else:
            raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        logger.info("stage %s: %.0f s", stage, time.perf_counter() - start)


if __name__ == "__main__":
    main()
