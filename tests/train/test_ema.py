"""--ema_decay: the checkpoints hold the moving average of the weights the plain run goes through
(recomputed here from that run's per-step checkpoints), a resumed run continues the same average,
and impossible settings are refused before any step."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from wan_train import TrainingError, parse_args, train
from wan_train.state import EMA_FILE, STATE_DIR
from wan_train.trainer import _moving_average

from train.support import train_argv, train_until_killed

DECAY = 0.8
FLAGS = ("--trainable_models", "dit", "--learning_rate", "5e-3", "--num_epochs", "2", "--save_steps", "1")


def hand_average(start: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]],
                 decay: float) -> dict[str, torch.Tensor]:
    """The warmed-up moving average, written out: after step k, ``avg = d * avg + (1 - d) * w_k``
    with ``d = min(decay, (1 + k) / (10 + k))``, starting from the weights before step 1."""
    average = {k: v.double() for k, v in start.items()}
    for k, weights in enumerate(steps, start=1):
        d = min(decay, (1 + k) / (10 + k))
        average = {name: d * average[name] + (1 - d) * weights[name].double() for name in average}
    return average


def test_checkpoints_hold_the_moving_average(release: Path, dataset: Path, tmp_path: Path) -> None:
    plain = train(parse_args(train_argv(release, dataset, tmp_path / "plain", *FLAGS)))
    averaged = train(parse_args(train_argv(release, dataset, tmp_path / "ema", *FLAGS, "--ema_decay", str(DECAY))))
    assert averaged.losses == pytest.approx(plain.losses, rel=1e-5)  # the average does not change training
    steps = [load_file(tmp_path / "plain" / f"step-{k}.safetensors") for k in range(1, len(plain.losses) + 1)]
    start = load_file(release / "diffusion_pytorch_model.safetensors")
    expected = hand_average(start, steps, DECAY)
    saved = load_file(tmp_path / "ema" / f"step-{len(plain.losses)}.safetensors")
    assert set(saved) == set(start)
    assert max((saved[k].double() - expected[k]).abs().max().item() for k in saved) < 1e-6
    # ... and it is not the last weights: the average lags behind them.
    last = steps[-1]
    assert max((saved[k] - last[k]).abs().max().item() for k in saved) > 1e-4
    state = tmp_path / "ema" / STATE_DIR / (tmp_path / "ema" / STATE_DIR / "latest").read_text()
    raw = load_file(state / "weights.safetensors")  # the resume state keeps the raw weights too
    assert max((raw[f"pipe.dit.{k}"] - last[k]).abs().max().item() for k in last) < 1e-6
    assert (state / EMA_FILE).is_file()


def test_resume_continues_the_average(release: Path, dataset: Path, tmp_path: Path) -> None:
    flags = (*FLAGS, "--ema_decay", str(DECAY))
    whole = train(parse_args(train_argv(release, dataset, tmp_path / "whole", *flags)))

    train_until_killed(parse_args(train_argv(release, dataset, tmp_path / "cut", *flags)), 3)
    resumed = train(parse_args(train_argv(release, dataset, tmp_path / "cut", *flags, "--resume")))
    assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-5)  # the state of step 3 was saved
    a, b = load_file(whole.checkpoints[-1]), load_file(resumed.checkpoints[-1])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_resume_of_a_run_without_average_is_refused(release: Path, dataset: Path, tmp_path: Path) -> None:
    train(parse_args(train_argv(release, dataset, tmp_path, *FLAGS[:-4], "--num_epochs", "1")))
    with pytest.raises(TrainingError, match="holds no moving average"):
        train(parse_args(train_argv(release, dataset, tmp_path, *FLAGS, "--ema_decay", "0.9", "--resume")))


@pytest.mark.parametrize("decay", ["0", "1", "1.5", "-0.1"])
def test_decay_outside_the_open_unit_interval_is_refused(decay: str, release: Path, dataset: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=f"--ema_decay must be in \\(0, 1\\), got {float(decay)}"):
        parse_args(train_argv(release, dataset, tmp_path, *FLAGS, "--ema_decay", decay))


def test_zero3_is_refused() -> None:
    """ZeRO-3 shards the weights over the processes: no process could average them whole."""
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(TrainingError, match="ZeRO-3 shards them"):
        _moving_average(accelerator, torch.nn.Linear(2, 2), 0.99)
    plugin.deepspeed_config["zero_optimization"]["stage"] = 2
    assert _moving_average(accelerator, torch.nn.Linear(2, 2), 0.99) is not None
