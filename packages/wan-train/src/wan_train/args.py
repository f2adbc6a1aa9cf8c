"""Command-line flags: the seed's (DiffSynth's) ``train.py`` flags, names and defaults, plus a few more.

Every flag of the seed keeps its name, type and default, so its training scripts run unchanged
with ``python -m wan_train`` in place of ``train.py``. The flags added here cover what the seed
lacks: precision, seeding, data-loader workers, step checkpoints, resuming, latent caching,
DeepSpeed without a launcher config, and where the tokenizer lives. :func:`check_args` rejects bad
values before anything is loaded, naming the flag and the value.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import torch

from wan_models.identity import EXPERTS
from wan_runtime.lora.layouts import LAYOUTS
from wan_runtime.model_config import ModelConfig

__all__ = [
    "DTYPES", "EXPERTS", "EXTRA_INPUTS", "LORA_BASE_MODELS", "LORA_FORMATS", "TRAINABLE_MODELS", "TrainingError",
    "build_parser", "check_args", "model_configs", "parse_args", "schedule_index", "split_list",
]

# Networks whose weights can be trained. "vace" is the VACE part of a VACE DiT (its vace_* modules):
# the seed keeps it in a separate model, ours in the DiT, so the name still means the same weights.
TRAINABLE_MODELS = ("dit", "vace", "motion_controller")
LORA_BASE_MODELS = TRAINABLE_MODELS

# --extra_inputs: request fields filled from the sample. input_image / end_image are the first / last
# frame of the training video; the others come from metadata columns of the same name.
FRAMES_INPUTS = ("control_video", "vace_video", "vace_video_mask")
IMAGE_INPUTS = ("reference_image", "vace_reference_image")
NUMBER_INPUTS = {"camera_control_speed": float, "vace_scale": float, "motion_bucket_id": int}
TEXT_INPUTS = ("camera_control_direction",)
EXTRA_INPUTS = ("input_image", "end_image", *FRAMES_INPUTS, *IMAGE_INPUTS, *NUMBER_INPUTS, *TEXT_INPUTS)

LORA_FORMATS = LAYOUTS  # the words of `wan convert --to`

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TrainingError(ValueError):
    """A bad flag, dataset or model set, found before any training step; the message says what to fix."""


def split_list(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; ``None`` -> ``[]``."""
    return [] if value is None else [item.strip() for item in value.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m wan_train``: the seed's flags first, then ours."""
    parser = argparse.ArgumentParser(
        prog="python -m wan_train",
        description="LoRA or full fine-tuning of a Wan 2.1 or 2.2 model (one A14B expert at a time) on a folder of "
                    "videos/images with a metadata.csv.")
    seed = parser.add_argument_group("flags of the seed's train.py")
    seed.add_argument("--dataset_base_path", type=str, default="", required=True,
                      help="Folder the file names in the metadata are relative to.")
    seed.add_argument("--dataset_metadata_path", type=str, default=None,
                      help="metadata.csv (or .json list) with a video/image column, a prompt column and the "
                           "columns of --extra_inputs. Without it: every video/image in the base folder that "
                           "has a same-named .txt prompt beside it.")
    seed.add_argument("--max_pixels", type=int, default=1280 * 720,
                      help="Pixel cap per frame when height and width are left empty (dynamic resolution).")
    seed.add_argument("--height", type=int, default=None,
                      help="Frame height (a multiple of 16; 32 for Wan2.2-TI2V-5B). Leave height and width empty for "
                           "dynamic resolution.")
    seed.add_argument("--width", type=int, default=None,
                      help="Frame width (a multiple of 16; 32 for Wan2.2-TI2V-5B). Leave height and width empty for "
                           "dynamic resolution.")
    seed.add_argument("--num_frames", type=int, default=81,
                      help="Frames per training video (4k+1), taken from the start of each video.")
    seed.add_argument("--data_file_keys", type=str, default="image,video",
                      help="Metadata columns holding file names to load (comma-separated).")
    seed.add_argument("--dataset_repeat", type=int, default=1, help="How many times one epoch goes over the dataset.")
    seed.add_argument("--model_paths", type=str, default=None,
                      help='Model files as a JSON list; an inner list is the shards of one model, e.g. '
                           '\'["Wan2.1_VAE.pth", ["dit-00001.safetensors", "dit-00002.safetensors"]]\'.')
    seed.add_argument("--model_id_with_origin_paths", type=str, default=None,
                      help="Comma-separated model_id:file_pattern items, downloaded from ModelScope when missing, "
                           "e.g. Wan-AI/Wan2.1-T2V-1.3B:diffusion_pytorch_model*.safetensors.")
    seed.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    seed.add_argument("--num_epochs", type=int, default=1, help="Number of epochs.")
    seed.add_argument("--output_path", type=str, default="./models",
                      help="Folder for the checkpoints (epoch-N.safetensors, step-N.safetensors), the training "
                           "log and the resume state.")
    seed.add_argument("--remove_prefix_in_ckpt", type=str, default="pipe.dit.",
                      help="Prefix stripped from the saved weight names (pipe.dit., pipe.vace., "
                           "pipe.motion_controller.).")
    seed.add_argument("--trainable_models", type=str, default=None,
                      help=f"Networks to fine-tune in full, comma-separated: {', '.join(TRAINABLE_MODELS)}.")
    seed.add_argument("--lora_base_model", type=str, default=None,
                      help=f"Network to add LoRA layers to: {', '.join(LORA_BASE_MODELS)}.")
    seed.add_argument("--lora_target_modules", type=str, default="q,k,v,o,ffn.0,ffn.2",
                      help="Layers that get LoRA, comma-separated names (a layer matches when its name is one of "
                           "these or ends in .<name>).")
    seed.add_argument("--lora_rank", type=int, default=32, help="LoRA rank (alpha = rank).")
    seed.add_argument("--extra_inputs", default=None,
                      help=f"Conditioning inputs, comma-separated: {', '.join(EXTRA_INPUTS)}. input_image and "
                           "end_image are the first and last frame of the video; the others are metadata columns.")
    seed.add_argument("--use_gradient_checkpointing_offload", default=False, action="store_true",
                      help="Keep the activations saved by gradient checkpointing in CPU memory.")
    seed.add_argument("--gradient_accumulation_steps", type=int, default=1,
                      help="Micro-batches (one sample per process each) averaged into one optimizer step.")
    seed.add_argument("--max_timestep_boundary", type=float, default=None,
                      help="Upper end (0..1, default 1) of the part of the 1000-step schedule timesteps are drawn "
                           "from, as a fraction of the schedule INDEX (index 0 is t=1000): the Wan2.2-T2V-A14B "
                           "high-noise expert (t >= 875) is 0.417, not 0.875. --expert sets it for you.")
    seed.add_argument("--min_timestep_boundary", type=float, default=None,
                      help="Lower end (0..1, default 0) of that part, as a fraction of the schedule index.")

    ours = parser.add_argument_group("flags beyond the seed")
    ours.add_argument("--expert", choices=list(EXPERTS), default=None,
                      help="Train one expert of a Wan 2.2 A14B pair: only its files are loaded (the other's are "
                           "never read) and the timestep range comes from the model's switch boundary (T2V-A14B "
                           "high: --max_timestep_boundary 0.417; I2V-A14B high: 0.358; low: the rest). Not "
                           "combinable with the boundary flags.")
    ours.add_argument("--lora_format", choices=list(LORA_FORMATS), default="official",
                      help="Key layout of the saved LoRA files, the words of `wan convert --to`: official (the "
                           "release's layer names, lora_A/lora_B), diffusers or comfy. Full fine-tunes keep the "
                           "official names.")
    ours.add_argument("--torch_dtype", choices=list(DTYPES), default="bfloat16",
                      help="dtype the networks are loaded and trained in (the seed: bfloat16).")
    ours.add_argument("--seed", type=int, default=0,
                      help="Seed of the sample order, the noise and the timesteps (each sample's draws depend only "
                           "on the seed, the epoch and the sample, so any number of processes gives the same run).")
    ours.add_argument("--dataset_num_workers", type=int, default=2,
                      help="DataLoader worker processes decoding videos (0: decode in the training process).")
    ours.add_argument("--save_steps", type=int, default=None,
                      help="Also save step-N.safetensors and the resume state every N optimizer steps.")
    ours.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STATE",
                      help="Continue from a resume state: a state folder, or (no value) the latest one under "
                           "OUTPUT_PATH/train_state/. Restores weights, optimizer, LR schedule, step and RNG.")
    ours.add_argument("--empty_prompt_ratio", type=float, default=0.0,
                      help="Fraction of steps (drawn per sample from the seed) trained on the empty prompt's context "
                           "instead of the sample's, so that classifier-free guidance has an unconditional model.")
    ours.add_argument("--batch_size", type=int, default=1,
                      help="Samples per micro-batch per process, run as one DiT call (the seed: 1). Each keeps its "
                           "own noise and timestep, so the loss is the mean of the samples' losses. Needs samples "
                           "of one size: --height/--width, or --use_cached.")
    ours.add_argument("--foreground_weight", type=float, default=1.0,
                      help="Loss weight of the latent cells covering the clip's foreground (pixels far from its "
                           "median colour) against 1 for the rest: small objects on plain backgrounds otherwise "
                           "count for little next to the background.")
    ours.add_argument("--timestep_weighting", choices=["bell", "uniform"], default="bell",
                      help="Loss weight per timestep: the seed's bell (DiffSynth's weights, near zero at both ends "
                           "of the schedule) or uniform (the high-noise steps, where the prompt sets colour and "
                           "layout, count as much as the rest).")
    ours.add_argument("--ema_decay", type=float, default=None,
                      help="Keep an exponential moving average of the trained weights with this decay (e.g. 0.999, "
                           "warmed up over the first steps) and write it to the checkpoints in place of the weights; "
                           "the resume state keeps both.")
    ours.add_argument("--cache_latents", type=str, default=None, metavar="DIR",
                      help="Encode the dataset once (video latents, text context, conditioning) into DIR and exit; "
                           "train on it with --use_cached DIR.")
    ours.add_argument("--use_cached", type=str, default=None, metavar="DIR",
                      help="Train on the tensors --cache_latents wrote (only the DiT is needed; pass just its files).")
    ours.add_argument("--tokenizer_path", type=str, default=None,
                      help="umT5 tokenizer folder (google/umt5-xxl). Default: the one beside the T5 file of "
                           "--model_paths, else Wan-AI/Wan2.1-T2V-1.3B:google/* as the seed.")
    ours.add_argument("--local_model_path", type=str, default="./models",
                      help="Where --model_id_with_origin_paths files are looked for and downloaded to.")
    ours.add_argument("--deepspeed", type=str, default=None, metavar="CONFIG",
                      help="DeepSpeed config: zero2, zero3 (shipped in wan_train/configs) or a JSON path. Not needed "
                           "with an accelerate config that sets distributed_type: DEEPSPEED.")
    ours.add_argument("--no_gradient_checkpointing", action="store_true",
                      help="Keep every activation (faster, far more memory); the seed always checkpoints.")
    ours.add_argument("--disable_progress_bar", action="store_true", help="No tqdm progress bar.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check ``argv`` (default ``sys.argv[1:]``); bad values raise :class:`TrainingError`."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TrainingError(f"--{name} must be >= 1, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """Every flag on its own and in combination; raises :class:`TrainingError` naming the flag."""
    _positive(args, "num_frames", "max_pixels", "dataset_repeat", "num_epochs", "lora_rank",
              "gradient_accumulation_steps", "save_steps", "batch_size")
    if args.dataset_num_workers < 0:
        raise TrainingError(f"--dataset_num_workers must be >= 0, got {args.dataset_num_workers}")
    if (args.height is None) != (args.width is None):
        raise TrainingError(f"give both --height and --width, or neither (dynamic resolution); got "
                            f"--height {args.height} --width {args.width}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 16 or value % 16):
            raise TrainingError(f"--{name} must be a positive multiple of 16 (VAE factor 8 x patch 2), got {value}")
    if args.batch_size > 1 and args.height is None and not args.use_cached:
        raise TrainingError(f"--batch_size {args.batch_size} stacks samples of one size: set --height and --width "
                            "(dynamic resolution gives every video its own size), or train on --use_cached")
    if args.num_frames % 4 != 1:
        raise TrainingError(f"--num_frames must be of the form 4k+1 (1, 5, ..., 81), got {args.num_frames}")
    if not args.learning_rate > 0:
        raise TrainingError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not 0.0 <= args.empty_prompt_ratio < 1.0:
        raise TrainingError(f"--empty_prompt_ratio must be in [0, 1), got {args.empty_prompt_ratio}")
    if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
        raise TrainingError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if not args.foreground_weight > 0:
        raise TrainingError(f"--foreground_weight must be > 0, got {args.foreground_weight}")
    check_timestep_boundaries(args)
    if not split_list(args.data_file_keys):
        raise TrainingError("--data_file_keys names no column")
    unknown = [name for name in split_list(args.extra_inputs) if name not in EXTRA_INPUTS]
    if unknown:
        raise TrainingError(f"unknown --extra_inputs {unknown}; choose from {list(EXTRA_INPUTS)}")
    if args.cache_latents and args.use_cached:
        raise TrainingError("--cache_latents writes a cache and exits; --use_cached trains on one: pass only one")
    if args.cache_latents and args.resume:
        raise TrainingError("--resume continues training; it does not apply to --cache_latents")
    model_configs(args)  # the model flags parse
    if args.cache_latents:
        return
    unknown = [name for name in split_list(args.trainable_models) if name not in TRAINABLE_MODELS]
    if unknown:
        raise TrainingError(f"unknown --trainable_models {unknown}; choose from {list(TRAINABLE_MODELS)} (the VAE, "
                            "text and image encoders only prepare the inputs and stay frozen)")
    if args.lora_base_model is not None and args.lora_base_model not in LORA_BASE_MODELS:
        raise TrainingError(f"unknown --lora_base_model {args.lora_base_model!r}; choose from {list(LORA_BASE_MODELS)}")
    if args.lora_base_model is not None and not split_list(args.lora_target_modules):
        raise TrainingError("--lora_target_modules names no layer")
    if not split_list(args.trainable_models) and args.lora_base_model is None:
        raise TrainingError("nothing to train: pass --lora_base_model dit (LoRA) and/or --trainable_models dit (full)")
    if args.lora_format != "official":
        lora_of_dit = args.lora_base_model == "dit" and args.remove_prefix_in_ckpt == "pipe.dit."
        if not lora_of_dit or split_list(args.trainable_models):
            raise TrainingError(f"--lora_format {args.lora_format} writes a LoRA of the DiT: it needs "
                                "--lora_base_model dit alone (no --trainable_models) and the default --remove_prefix_in_ckpt pipe.dit.; "
                                "other checkpoints keep the official names (--lora_format official)")


def check_timestep_boundaries(args: argparse.Namespace) -> None:
    """The boundary flags: with ``--expert`` none may be given (it sets them once the model is loaded);
    without it they default to the whole schedule and need at least one timestep between them."""
    given = [f"--{name}" for name in ("min_timestep_boundary", "max_timestep_boundary")
             if getattr(args, name) is not None]
    if args.expert is not None:
        if given:
            raise TrainingError(f"--expert {args.expert} sets the timestep range from the model's expert boundary; "
                                f"drop {' and '.join(given)} (or drop --expert and give the range yourself)")
        return
    if args.min_timestep_boundary is None:
        args.min_timestep_boundary = 0.0
    if args.max_timestep_boundary is None:
        args.max_timestep_boundary = 1.0
    low, high = args.min_timestep_boundary, args.max_timestep_boundary
    if not (0.0 <= low < high <= 1.0) or schedule_index(low) >= schedule_index(high):
        raise TrainingError(f"need 0 <= --min_timestep_boundary < --max_timestep_boundary <= 1 (at least one of the "
                            f"1000 timesteps between them), got {low} and {high}")


def schedule_index(fraction: float, steps: int = 1000) -> int:
    """A boundary flag as an index into the ``steps``-step training schedule: ``int(fraction * steps)``
    as DiffSynth computes it, rounded first so that 0.417 is 417 whatever the float error."""
    return int(round(fraction * steps, 6))


def model_configs(args: argparse.Namespace) -> list[ModelConfig]:
    """The :class:`ModelConfig` list of ``--model_paths`` and ``--model_id_with_origin_paths``."""
    configs: list[ModelConfig] = []
    if args.model_paths is not None:
        example = '\'["models/Wan2.1_VAE.pth", ["dit-00001-of-00002.safetensors", "dit-00002-of-00002.safetensors"]]\''
        try:
            paths = json.loads(args.model_paths)
        except json.JSONDecodeError as e:
            raise TrainingError(f"--model_paths is not valid JSON ({e.msg} at character {e.pos}): "
                                f"{args.model_paths!r}; expected a list such as {example}") from None
        if not isinstance(paths, list) or not paths:
            raise TrainingError(f"--model_paths must be a non-empty JSON list, got {args.model_paths!r}; "
                                f"e.g. {example}")
        for item in paths:
            shards = item if isinstance(item, list) else [item]
            if not shards or not all(isinstance(path, str) and path for path in shards):
                raise TrainingError(f"--model_paths items must be file paths or lists of shard paths, got {item!r}")
        configs += [ModelConfig(path=item) for item in paths]
    for item in split_list(args.model_id_with_origin_paths):
        model_id, sep, pattern = item.partition(":")
        if not sep or not model_id or not pattern:
            raise TrainingError(f"--model_id_with_origin_paths item {item!r} is not model_id:file_pattern "
                                "(e.g. Wan-AI/Wan2.1-T2V-1.3B:Wan2.1_VAE.pth)")
        configs.append(ModelConfig(model_id=model_id, origin_file_pattern=pattern))
    if not configs:
        raise TrainingError("no model given: pass --model_paths and/or --model_id_with_origin_paths")
    return configs
