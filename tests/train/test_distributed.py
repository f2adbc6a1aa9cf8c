"""Multi-process training on the CPU, through the real launchers, against one in-process run.

* DDP: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m wan_train`` with
  one micro-batch per process equals one process accumulating two micro-batches (same global batch).
* DeepSpeed: the shipped ZeRO-2 (CPU optimizer offload) and ZeRO-3 configs under ``torchrun`` on gloo.
* A run killed with SIGKILL at an arbitrary step and resumed lands on the uninterrupted run's weights.

Measured here (lr 1e-3, 4 optimizer steps, weights move by about 1e-3): the largest weight difference
to the single process is 6e-8 for DDP, 5e-7 for ZeRO-2 (full) and 3e-8 for ZeRO-3 (LoRA); on other
data up to 3.4e-6, hence the tolerance. Without ``gradient_clipping: 0`` DeepSpeed clips at norm 1
and lands 4e-4 away.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from wan_train import parse_args, train
from wan_train.state import STATE_DIR

from train.support import (WEIGHT_TOLERANCE, free_port, launch, logged_losses, max_difference, sigkill_after_saves,
                           train_argv)

log = logging.getLogger(__name__)
FULL = ("--trainable_models", "dit", "--learning_rate", "1e-3", "--num_epochs", "2")
LORA = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-3", "--num_epochs", "2")


@pytest.fixture(scope="module")
def single(release: Path, dataset: Path, tmp_path_factory) -> dict[str, Path]:
    """In-process reference runs, one process with 2 micro-batches per step: full and LoRA."""
    out = {}
    for name, flags in (("full", FULL), ("lora", LORA)):
        folder = tmp_path_factory.mktemp(f"single-{name}")
        train(parse_args(train_argv(release, dataset, folder, *flags, "--gradient_accumulation_steps", "2")))
        out[name] = folder
    return out


def test_ddp_two_processes_equal_one(release: Path, dataset: Path, single: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "ddp"
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "wan_train",
            *train_argv(release, dataset, output, *FULL, "--dataset_num_workers", "1")],
           env={"ACCELERATE_USE_CPU": "true"})
    diff = max_difference(single["full"] / "epoch-1.safetensors", output / "epoch-1.safetensors")
    log.info("DDP 2 processes vs 1: max weight difference %.3g", diff)
    assert diff < WEIGHT_TOLERANCE, diff
    assert logged_losses(output) == pytest.approx(logged_losses(single["full"]), rel=1e-5)


@pytest.mark.parametrize("stage, kind", [("zero2", "full"), ("zero3", "lora")])
def test_deepspeed_under_torchrun(stage: str, kind: str, release: Path, dataset: Path, single: dict[str, Path],
                                  tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    output = tmp_path / stage
    flags = FULL if kind == "full" else LORA
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "wan_train", *train_argv(release, dataset, output, *flags, "--deepspeed", stage)], timeout=600)
    diff = max_difference(single[kind] / "epoch-1.safetensors", output / "epoch-1.safetensors")
    log.info("DeepSpeed %s (%s) 2 processes vs 1: max weight difference %.3g", stage, kind, diff)
    assert diff < WEIGHT_TOLERANCE, diff
    assert logged_losses(output) == pytest.approx(logged_losses(single[kind]), rel=1e-5)
    state = output / STATE_DIR / (output / STATE_DIR / "latest").read_text()
    assert (state / "deepspeed").is_dir()  # the engine's own (sharded) checkpoint


def test_killed_run_resumes_to_the_same_weights(release: Path, dataset: Path, tmp_path: Path) -> None:
    """SIGKILL once a few states are saved (whatever the run is doing then), resume: same weights."""
    flags = (*LORA, "--num_epochs", "1", "--dataset_repeat", "12", "--save_steps", "1")
    reference = train(parse_args(train_argv(release, dataset, tmp_path / "whole", *flags)))
    output = tmp_path / "killed"
    argv = train_argv(release, dataset, output, *flags)
    killed_at = sigkill_after_saves(argv, output, 5)
    log.info("killed with %s as the latest resume state", killed_at)
    launch([sys.executable, "-m", "wan_train", *argv, "--resume"])
    # The reference trains in this process, the resumed run in a fresh one: oneDNN/MKL float32 kernels are
    # not bit-reproducible across processes (buffer alignment); seen once in a full run: 1.6e-7.
    assert max_difference(reference.checkpoints[-1], output / "epoch-0.safetensors") <= 1e-6, killed_at
