"""Latent caching: encode the dataset once, then train the DiT on the stored tensors.

Every step of plain training runs the VAE, umT5 (and CLIP) on its sample again. ``--cache_latents
DIR`` runs them once per metadata row and stores what the DiT step needs (:class:`TrainingInputs`:
video latents, text context, conditioning) as ``DIR/<row>.safetensors`` plus ``DIR/cache.json``;
``--use_cached DIR`` then trains with only the DiT loaded. Noise and timesteps are still drawn per
step, so a cached run computes the same losses as an uncached one. The frames are fixed by the
cache: changing size, frame count or extra inputs means writing a new cache.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from wan_models import WanDiT

from .args import TrainingError, split_list
from .dataset import first_item, video_dataset
from .module import TrainingInputs, WanTrainingModule, empty_prompt_context, load_pipeline
from .outputs import atomic_write, check_output_folder
from .state import save_weights

logger = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "CachedDataset", "build_cache", "read_inputs", "write_inputs"]

CACHE_FORMAT = 2  # 2: per-token timestep scale and held latents (TI2V image-to-video) stored
READABLE_FORMATS = (1, 2)  # format 1 lacks them, which only a fused-image DiT needs (check_model)
OPTIONAL = ("foreground", "token_timestep_scale", "held_mask", "held_latents")
MANIFEST = "cache.json"
EMPTY_PROMPT = "empty_prompt.safetensors"  # the empty prompt's context, for --empty_prompt_ratio
SHARED = "shared."


def write_inputs(inputs: TrainingInputs, path: Path) -> None:
    """One sample's inputs as safetensors; numbers (``vace_scale``) and flags go to the metadata."""
    tensors = {"input_latents": inputs.input_latents, "context": inputs.context}
    tensors.update({name: getattr(inputs, name) for name in OPTIONAL if getattr(inputs, name) is not None})
    scalars = {}
    for key, value in inputs.shared.items():
        if isinstance(value, torch.Tensor):
            tensors[SHARED + key] = value
        else:
            scalars[key] = value
    save_weights(tensors, path, {"scalars": json.dumps(scalars), "vace_reference": json.dumps(inputs.vace_reference)})


def read_inputs(path: Path) -> TrainingInputs:
    """The :class:`TrainingInputs` :func:`write_inputs` stored (on the CPU)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    shared: dict[str, Any] = json.loads(metadata["scalars"])
    shared.update({key[len(SHARED):]: value for key, value in tensors.items() if key.startswith(SHARED)})
    return TrainingInputs(tensors["input_latents"], tensors["context"], shared, json.loads(metadata["vace_reference"]),
                          **{name: tensors.get(name) for name in OPTIONAL})


def _sample_path(folder: Path, row: int) -> Path:
    return folder / f"{row:08d}.safetensors"


class CachedDataset(torch.utils.data.Dataset):
    """Samples ``{"cached": TrainingInputs, "index": i}`` of a cache folder, ``repeat`` times over."""

    def __init__(self, folder: str | Path, repeat: int = 1) -> None:
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise TrainingError(f"--use_cached {self.folder.absolute()}: no {MANIFEST}; write the cache with "
                                "--cache_latents first (an interrupted cache pass leaves none)")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") not in READABLE_FORMATS:
            raise TrainingError(f"{manifest}: cache format {self.manifest.get('format')}, this version reads "
                                f"{', '.join(map(str, READABLE_FORMATS))}; write the cache again")
        self.rows = self.manifest["samples"]
        missing = [row for row in range(self.rows) if not _sample_path(self.folder, row).is_file()]
        if missing:
            raise TrainingError(f"{self.folder}: cached samples {missing[:5]} are missing; write the cache again")
        self.repeat = repeat
        empty = self.folder / EMPTY_PROMPT
        self.empty_context = load_file(str(empty))["context"] if empty.is_file() else None
        logger.info("cached dataset: %d samples from %s, each seen %d times per epoch", self.rows, self.folder, repeat)

    def check_model(self, dit: WanDiT) -> None:
        """The cache must come from the same kind of DiT (its conditioning inputs depend on it)."""
        if self.manifest["dit_variant"] != dit.config.variant or self.manifest["dit_in_dim"] != dit.config.in_dim:
            raise TrainingError(f"{self.folder} was cached for a {self.manifest['dit_variant']} DiT (in_dim "
                                f"{self.manifest['dit_in_dim']}); the loaded one is {dit.config.variant} "
                                f"(in_dim {dit.config.in_dim})")
        if self.manifest["format"] < 2 and dit.config.fuses_image_latents:
            raise TrainingError(f"{self.folder} was written by an older version that did not store the first-frame "
                                f"conditioning the {dit.config.variant} DiT needs; write the cache again")

    def __len__(self) -> int:
        return self.rows * self.repeat

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"cached": read_inputs(_sample_path(self.folder, index % self.rows)), "index": index}


def build_cache(args: argparse.Namespace) -> Path:
    """Encode every metadata row once into ``--cache_latents``; processes split the rows between them."""
    folder = check_output_folder(args.cache_latents, "--cache_latents")
    accelerator = Accelerator()
    show = accelerator.is_main_process and not args.disable_progress_bar
    dataset = video_dataset(args, repeat=1, show_progress=show)
    pipeline = load_pipeline(args, device=accelerator.device)
    dataset.fit_model(pipeline)
    module = WanTrainingModule(pipeline, extra_inputs=split_list(args.extra_inputs))
    module.check_extra_inputs()
    (folder / MANIFEST).unlink(missing_ok=True)
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = DataLoader(Subset(dataset, rows), batch_size=1, collate_fn=first_item,
                        num_workers=args.dataset_num_workers)
    with torch.no_grad():
        for sample in tqdm(loader, desc="caching", disable=not show):
            write_inputs(module.prepare_inputs(sample), _sample_path(folder, sample["index"]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_weights({"context": empty_prompt_context(pipeline)}, folder / EMPTY_PROMPT)
        config = pipeline.dit.config
        manifest = {"format": CACHE_FORMAT, "samples": len(dataset), "dit_variant": config.variant,
                    "dit_in_dim": config.in_dim, "source": dataset.source, "num_frames": args.num_frames,
                    "height": args.height, "width": args.width, "extra_inputs": split_list(args.extra_inputs)}
        atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
        logger.info("cached %d samples in %s", len(dataset), folder)
    accelerator.end_training()
    return folder
