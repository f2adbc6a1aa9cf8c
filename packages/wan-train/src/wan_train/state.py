"""Checkpoint files: trained weights, and the resume state of an interrupted run.

Every file is written under a temporary name and renamed into place, so a run killed at any moment
leaves complete files only. The resume state is a folder ``train_state/state-e<epoch>-b<batch>/``
with the trainable weights, optimizer, progress (which sets the learning rate) and each process's
RNG state, written as ``<name>.partial`` and renamed when complete (removed when a write fails); the
file ``train_state/latest`` names the newest complete one, and older ones are deleted after it.
Under DeepSpeed the weights and (sharded) optimizer go through the engine's own checkpoint.
A failed write (full disk, size limit) is a :class:`TrainingError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from wan_models.loading import torch_error_message

from .args import TrainingError
from .outputs import atomic_write, writing

logger = logging.getLogger(__name__)

__all__ = ["EMA_FILE", "STATE_DIR", "Progress", "find_state", "load_state", "save_state", "save_weights"]

STATE_DIR = "train_state"
EMA_FILE = "ema.safetensors"  # the moving average of the weights (--ema_decay)
LATEST = "latest"
DEEPSPEED_TAG = "deepspeed"


@dataclass
class Progress:
    """Where a run stands: the epoch, micro-batches of it each process has done, optimizer steps."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


def save_weights(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of ``tensors`` (moved to the CPU), written atomically."""
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt", **(metadata or {})}))
    logger.debug("saved %d tensors to %s", len(cpu), path)
    return path


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, progress: Progress,
               output_path: str | Path, ema: Any = None) -> Path:
    """Write the resume state of ``progress``, with ``ema``'s moving average when given (a collective
    call: every process must make it)."""
    root = Path(output_path) / STATE_DIR
    name = f"state-e{progress.epoch:04d}-b{progress.batch:09d}"
    partial, final = root / f"{name}.partial", root / name
    try:
        _write_state(accelerator, model, optimizer, progress, partial, ema)
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            with writing(final):
                os.replace(partial, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        atomic_write(root / LATEST, lambda tmp: tmp.write_text(name))
        for old in root.glob("state-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("resume state saved to %s", final)
    accelerator.wait_for_everyone()
    return final


def _write_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, progress: Progress,
                 partial: Path, ema: Any) -> None:
    """Every file of the resume state into the folder ``partial`` (collective)."""
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        with writing(partial):
            partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        with writing(partial):
            model.save_checkpoint(str(partial), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        trainable = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
        with writing(partial / "weights.safetensors"):
            save_file(trainable, str(partial / "weights.safetensors"))
        optimizer_state = optimizer.state_dict()
        with writing(partial / "optimizer.pt"):
            torch.save(optimizer_state, partial / "optimizer.pt")
    if ema is not None and accelerator.is_main_process:
        ema_state = ema.state_dict()
        with writing(partial / EMA_FILE):
            save_file(ema_state, str(partial / EMA_FILE))
    rng = _rng_state()
    with writing(partial / f"rng-{accelerator.process_index}.pt"):
        torch.save(rng, partial / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = {**asdict(progress), "num_processes": accelerator.num_processes}
        with writing(partial / "progress.json"):
            (partial / "progress.json").write_text(json.dumps(record, indent=2))


def find_state(resume: str, output_path: str | Path) -> Path:
    """The state folder ``--resume`` names: a folder, or ``latest`` under ``OUTPUT_PATH/train_state``."""
    if resume != "latest":
        path = Path(resume)
    else:
        pointer = Path(output_path) / STATE_DIR / LATEST
        if not pointer.is_file():
            raise TrainingError(f"--resume: no resume state under {pointer.parent.absolute()} (a run saves one at "
                                "each epoch end and every --save_steps steps)")
        path = pointer.parent / pointer.read_text().strip()
    if not (path / "progress.json").is_file():
        raise TrainingError(f"--resume: {path.absolute()} is not a complete resume state (no progress.json)")
    return path


def load_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, path: Path) -> Progress:
    """Restore what :func:`save_state` wrote into the prepared ``model`` and ``optimizer``; the progress."""
    record = json.loads((path / "progress.json").read_text())
    if record["num_processes"] != accelerator.num_processes:
        raise TrainingError(f"--resume: {path} was saved by {record['num_processes']} processes; resume with the same "
                            f"number (now {accelerator.num_processes}) so that each continues its share of the data")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_module_strict=False, load_optimizer_states=True,
                              load_lr_scheduler_states=False)
    else:
        unwrapped = accelerator.unwrap_model(model)
        weights = load_file(str(path / "weights.safetensors"))
        trainable = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            raise TrainingError(f"--resume: {path} holds other trainable weights than this run (e.g. "
                                f"{sorted(set(weights) ^ trainable)[:3]}); resume with the same model flags")
        unwrapped.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(_load_own(path / "optimizer.pt"))
    _set_rng_state(_load_own(path / f"rng-{accelerator.process_index}.pt"))
    progress = Progress(record["epoch"], record["batch"], record["step"])
    logger.info("resumed from %s: epoch %d, micro-batch %d, step %d", path, progress.epoch, progress.batch,
                progress.step)
    return progress


def _load_own(path: Path) -> Any:
    """A file :func:`save_state` wrote (plain data and tensors, never code); a damaged one is a
    :class:`TrainingError` without torch's advice to load it with ``weights_only=False``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise TrainingError(f"--resume: cannot read {path}: {torch_error_message(e)}; resume from an earlier "
                            "state or start again") from None
