"""The training loop on accelerate: one process, DDP, or DeepSpeed ZeRO-2/3, with the same code.

As the seed: AdamW over the trainable weights at the rate of torch's ``ConstantLR`` with its defaults
(the first five optimizer steps at a third of ``--learning_rate``, then the full rate; set by hand
here, which also reaches DeepSpeed's optimizer), one sample per process per micro-batch (``--batch_size``
stacks more into one DiT call), ``--gradient_accumulation_steps`` micro-batches per optimizer step, and
``epoch-N.safetensors`` (the trainable weights, ``--remove_prefix_in_ckpt`` stripped) after every epoch,
each with its provenance (model identity and resolved flags) in the header and in ``epoch-N.json``.
Beyond the seed:
``step-N.safetensors`` and a resume state every ``--save_steps`` steps, ``--resume``, a JSON-lines
log of the loss, and a sample order, noise and timesteps that depend only on ``--seed`` (see
:func:`wan_train.module.sample_seed`), so runs are reproducible across process counts and resumes.

Note: the seed zeroes the gradients at the top of every accumulation micro-step, which with
accelerate drops all but the last micro-batch's gradient; here they are zeroed after the step.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import (DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                               set_seed)
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .args import TrainingError, split_list
from .cache import CachedDataset
from .configs import deepspeed_config
from .dataset import VideoDataset, video_dataset
from .ema import EMA
from .module import WanTrainingModule, load_pipeline, sample_seed
from .outputs import append_line, check_output_folder
from .provenance import base_identity, save_checkpoint
from .state import EMA_FILE, Progress, find_state, load_state, save_state

logger = logging.getLogger(__name__)

__all__ = ["EpochSampler", "TrainResult", "make_accelerator", "open_dataset", "train"]

LOG_FILE = "train_log.jsonl"
WARMUP_STEPS, WARMUP_FACTOR = 5, 1 / 3  # torch ConstantLR's defaults: the seed's scheduler


def learning_rate(base: float, step: int) -> float:
    """The rate of optimizer step ``step`` (0-based), as the seed's ``ConstantLR(optimizer)`` gives it."""
    return base * WARMUP_FACTOR if step < WARMUP_STEPS else base


class EpochSampler(Sampler[int]):
    """A fresh permutation of ``range(length)`` per epoch, seeded by ``(seed, epoch)`` only.

    Every process draws the same order; accelerate then deals batch ``k`` to process ``k % N``.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


@dataclass
class TrainResult:
    """What a run did: the mean loss of each optimizer step it ran, the files it wrote, where it
    stopped, and the trained module (its pipeline holds the trained networks)."""

    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    module: WanTrainingModule | None = None


def make_accelerator(args: argparse.Namespace, find_unused_parameters: bool = False) -> Accelerator:
    """The Accelerator of the launch (plain, DDP, or DeepSpeed from ``--deepspeed`` or the accelerate config).

    Without a GPU, DeepSpeed runs under ``torchrun`` on gloo: accelerate would otherwise see no
    backend and treat every process as the only one.
    """
    plugin = DeepSpeedPlugin(hf_ds_config=str(deepspeed_config(args.deepspeed))) if args.deepspeed else None
    wants_deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if wants_deepspeed and not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              deepspeed_plugin=plugin, kwargs_handlers=handlers)
    if args.deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise TrainingError(f"--deepspeed {args.deepspeed}: accelerate did not start DeepSpeed (distributed type "
                            f"{accelerator.distributed_type}); unset ACCELERATE_USE_CPU, which turns it off")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("gradient_clipping") in (None, "auto"):
            # DeepSpeed clips at norm 1.0 when the config says nothing; DDP (and the seed) never clip.
            config["gradient_clipping"] = 0.0
    logger.info("%s, %d process(es), device %s", accelerator.distributed_type, accelerator.num_processes,
                accelerator.device)
    return accelerator


def open_dataset(args: argparse.Namespace, show_progress: bool = True) -> VideoDataset | CachedDataset:
    """The dataset of the flags (checked file by file), or the cached one with ``--use_cached``."""
    if args.use_cached:
        return CachedDataset(args.use_cached, args.dataset_repeat)
    return video_dataset(args, args.dataset_repeat, show_progress)


def _export(accelerator: Accelerator, model: torch.nn.Module, args: argparse.Namespace,
            name: str, ema: EMA | None = None) -> Path | None:
    """Save the trainable weights (their moving average with ``ema``) under their export names, with
    the run's provenance (collective; the main process writes)."""
    unwrapped: WanTrainingModule = accelerator.unwrap_model(model)
    trainable = set(unwrapped.trainable_names())
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; None off the main process there
    path = None
    if accelerator.is_main_process:
        if ema is not None:
            state = ema.weights(trainable)
        tensors = {unwrapped.export_name(key, args.remove_prefix_in_ckpt): value
                   for key, value in state.items() if key in trainable}
        lora_only = unwrapped.lora_config is not None and not split_list(args.trainable_models)
        base = base_identity(unwrapped.pipeline.dit, args.expert)
        path = save_checkpoint(Path(args.output_path) / f"{name}.safetensors", tensors, args, base,
                               unwrapped.lora_config, lora_only)
    accelerator.wait_for_everyone()
    return path


def _moving_average(accelerator: Accelerator, module: WanTrainingModule, decay: float | None) -> EMA | None:
    """The :class:`EMA` of ``--ema_decay`` over the trainable weights (every process keeps its own copy,
    which stays the same on all since their weights do), or ``None``."""
    if decay is None:
        return None
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        raise TrainingError("--ema_decay needs every process to hold the whole weights; ZeRO-3 shards them: "
                            "use ZeRO-2 (--deepspeed zero2) or DDP")
    return EMA(((n, p) for n, p in module.named_parameters() if p.requires_grad), decay)


def train(args: argparse.Namespace,
          on_step: Callable[[Progress, float], None] | None = None) -> TrainResult:
    """Train as the flags say; ``on_step(progress, loss)`` is called after every optimizer step."""
    check_output_folder(args.output_path, "--output_path")
    # Everything is loaded (on the CPU) and checked before the Accelerator, which must know whether
    # DDP has to look for unused parameters.
    show = int(os.environ.get("RANK", "0")) == 0 and not args.disable_progress_bar
    dataset = open_dataset(args, show_progress=show)
    pipeline = load_pipeline(args, dit_only=bool(args.use_cached))
    if isinstance(dataset, VideoDataset):
        dataset.fit_model(pipeline)
    if isinstance(dataset, CachedDataset):
        dataset.check_model(pipeline.dit)
        if "motion_controller" in split_list(args.trainable_models):
            raise TrainingError("the motion controller runs before the DiT: it cannot train on cached inputs")
    set_seed(args.seed)  # LoRA initialisation: the same on every process and in every run
    module = WanTrainingModule.from_args(args, pipeline)
    if isinstance(dataset, CachedDataset):
        module.empty_context = dataset.empty_context
    if not isinstance(dataset, CachedDataset):
        module.check_extra_inputs()
    accelerator = make_accelerator(args, module.may_leave_parameters_unused())
    for network in (pipeline.dit, pipeline.vae, pipeline.text_encoder, pipeline.image_encoder,
                    pipeline.motion_controller):
        if network is not None:
            network.to(accelerator.device)
    pipeline.device = accelerator.device

    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=args.learning_rate)
    sampler = EpochSampler(len(dataset), args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=list,
                        num_workers=args.dataset_num_workers)
    model, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    ema = _moving_average(accelerator, module, args.ema_decay)

    result = TrainResult()
    progress = Progress()
    if args.resume:
        state = find_state(args.resume, args.output_path)
        progress = load_state(accelerator, model, optimizer, state)
        if ema is not None:
            ema.load(state / EMA_FILE)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    log_path = Path(args.output_path) / LOG_FILE
    bar = tqdm(total=steps_per_epoch * args.num_epochs, initial=progress.step, disable=not show, desc="training")
    for epoch in range(progress.epoch, args.num_epochs):
        loader.set_epoch(epoch)  # accelerate's loader passes its epoch to the sampler on every pass
        batches = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
        losses: list[torch.Tensor] = []
        for batch in batches:
            for sample in batch:
                sample["sample_seed"] = sample_seed(args.seed, epoch, sample["index"])
            lr = learning_rate(args.learning_rate, progress.step)
            for group in optimizer.param_groups:  # before backward: DeepSpeed steps inside it
                group["lr"] = lr
            with accelerator.accumulate(model):
                loss = model(batch)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            progress.batch += 1
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            if ema is not None:
                ema.update(progress.step)
            mean = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            losses = []
            result.losses.append(mean)
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)  # a refresh here would redraw every step
            bar.update(1)
            if accelerator.is_main_process:
                record = {"epoch": epoch, "step": progress.step, "loss": mean, "lr": lr}
                append_line(log_path, json.dumps(record))
            if args.save_steps and progress.step % args.save_steps == 0:
                result.checkpoints.append(_export(accelerator, model, args, f"step-{progress.step}", ema))
                save_state(accelerator, model, optimizer, progress, args.output_path, ema)
            if on_step is not None:
                on_step(progress, mean)
        progress = Progress(epoch + 1, 0, progress.step)
        result.checkpoints.append(_export(accelerator, model, args, f"epoch-{epoch}", ema))
        save_state(accelerator, model, optimizer, progress, args.output_path, ema)
    bar.close()
    result.progress = progress
    result.module = accelerator.unwrap_model(model)
    result.checkpoints = [path for path in result.checkpoints if path is not None]
    accelerator.end_training()
    return result
