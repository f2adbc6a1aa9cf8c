"""The training module: the pipeline's networks, what of them is trained, and the seed's loss.

One step, as the seed computes it: the pipeline's conditioning units turn the sample into DiT inputs
(text context, image/control/camera/VACE conditioning), the VAE encodes the video into ``x0``, a
timestep is drawn uniformly from the indices of the 1000-step training schedule, the DiT predicts the
velocity of ``add_noise(x0, noise, t)`` and the loss is ``mse(prediction, noise - x0) * weight(t)``.
What the units set besides the DiT's keyword inputs goes into the step as in generation: a per-token
timestep scale (``[B, L]`` timesteps) and latent cells held fixed by their step fix-ups, which the
noised latents take and the loss leaves out (TI2V-5B image-to-video: latent frame 0 is the image's,
at t = 0, and the mse runs over frames 1.., as DiffSynth's ``FlowMatchSFTLoss``).

Networks with trainable weights (full, ``--trainable_models``, or LoRA layers, ``--lora_base_model``)
are registered under ``pipe.<slot>`` so that weight names read ``pipe.dit.blocks.0...`` as in the
seed; frozen networks stay outside the module tree, so DDP and DeepSpeed neither broadcast nor shard
them. Gradient checkpointing wraps every DiT and VACE block (``torch.utils.checkpoint``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from wan_models.configs import T5_FILE, T5_TOKENIZER, VAE22_FILE, VAE_FILE
from wan_runtime import WanVideoPipeline
from wan_runtime.model_config import ModelConfig
from wan_runtime.pipeline import SLOTS
from wan_runtime.request import GenerationRequest
from wan_runtime.schedulers import FlowEulerScheduler
from wan_runtime.units import Conditioning, required_inputs
from wan_runtime.units.image import video_pixels
from wan_runtime.units.vace import reference_pixels

from .args import DTYPES, IMAGE_INPUTS, TrainingError, model_configs, schedule_index, split_list
from .experts import apply_expert, select_expert_files
from .foreground import foreground_mask, latent_foreground, weighted

logger = logging.getLogger(__name__)

__all__ = ["TrainingInputs", "WanTrainingModule", "held_cells", "load_pipeline", "sample_seed", "training_noise",
           "training_scheduler"]

NUM_TRAIN_TIMESTEPS = 1000
TRAINING_SHIFT = 5.0  # the seed's training scheduler: FlowMatchScheduler(shift=5), 1000 steps
VACE_PREFIX = "vace_"  # the DiT's VACE modules: vace_blocks, vace_patch_embedding
TIMESTEP_WEIGHTINGS = ("bell", "uniform")
ADAPTER = "default"  # peft's adapter name, dropped from saved keys
DEFAULT_LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
# DiT parts that only run when one of these inputs is given (else their weights get no gradient).
OPTIONAL_PARTS = {"ref_conv": ("reference_image",), "control_adapter": ("camera_control_direction",),
                  VACE_PREFIX: ("vace_video", "vace_video_mask", "vace_reference_image")}


@dataclass
class TrainingInputs:
    """What one step feeds the DiT besides noise and timestep; also what ``--cache_latents`` stores.

    ``shared`` holds the DiT keyword inputs (``y``, ``clip_feature``, ``reference_latents``,
    ``camera``, ``vace_context``, ``vace_scale``, ``motion_embedding``); ``vace_reference`` says that
    ``input_latents`` lead with a VACE reference frame (the noise's last frame moves to the front).
    ``foreground`` (``[B, 1, T', H', W']``, 0/1) marks the latent cells of the video's foreground.
    ``token_timestep_scale`` (``[B, L]``) multiplies each token's timestep (TI2V image-to-video: 0 on
    latent frame 0), and ``held_mask``/``held_latents`` (like ``input_latents``) are the cells the
    units hold fixed during sampling (the same frame 0) and their values: the noised latents take
    them, and the loss leaves them out, as DiffSynth's training of fused-image DiTs does.
    """

    input_latents: torch.Tensor
    context: torch.Tensor
    shared: dict[str, Any] = field(default_factory=dict)
    vace_reference: bool = False
    foreground: torch.Tensor | None = None
    token_timestep_scale: torch.Tensor | None = None
    held_mask: torch.Tensor | None = None
    held_latents: torch.Tensor | None = None

    TENSORS = ("input_latents", "context", "foreground", "token_timestep_scale", "held_mask", "held_latents")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrainingInputs":
        """A copy with every tensor on ``device`` (accelerate's DataLoader calls this)."""
        move = lambda v: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return replace(self, shared={k: move(v) for k, v in self.shared.items()},
                       **{name: move(getattr(self, name)) for name in self.TENSORS})

    @classmethod
    def stack(cls, items: Sequence["TrainingInputs"]) -> "TrainingInputs":
        """One batch of several samples' inputs: tensors joined along the batch axis; numbers and flags
        must agree (a batch runs as one DiT call)."""
        first = items[0]
        if len(items) == 1:
            return first
        shapes = {tuple(item.input_latents.shape[1:]) for item in items}
        if len(shapes) > 1:
            raise TrainingError(f"a batch needs samples of one size, got latents of shapes {sorted(shapes)}: "
                                "set --height/--width (and --num_frames) or use --batch_size 1")
        optional = [(name, [getattr(item, name) is None for item in items]) for name in cls.TENSORS[2:]]
        for name, values in (("vace_reference", [item.vace_reference for item in items]),
                             ("shared inputs", [sorted(item.shared) for item in items]), *optional):
            if any(value != values[0] for value in values):
                raise TrainingError(f"the samples of a batch differ in their {name}: {values} (e.g. some with an "
                                    "input image and some without): use --batch_size 1")
        shared: dict[str, Any] = {}
        for key, value in first.shared.items():
            values = [item.shared[key] for item in items]
            if isinstance(value, torch.Tensor):
                shared[key] = torch.cat(values)
            elif any(v != value for v in values):
                raise TrainingError(f"the samples of a batch differ in {key}: {values}")
            else:
                shared[key] = value
        tensors = {name: None if getattr(first, name) is None else torch.cat([getattr(item, name) for item in items])
                   for name in cls.TENSORS}
        return cls(shared=shared, vace_reference=first.vace_reference, **tensors)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's noise and timestep: a hash of (run seed, epoch, sample index).

    It depends on nothing else, so 1 process with gradient accumulation and N processes see the
    same draws, and a resumed run the draws of the uninterrupted one.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def training_noise(shape: Sequence[int], generator: torch.Generator, vace_reference: bool,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Gaussian noise as the pipeline's noise unit draws it (float32 on the CPU, then cast); with a
    VACE reference frame leading the latents, the last noise frame moves to the front, as in the unit."""
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if vace_reference:
        noise = torch.cat([noise[:, :, -1:], noise[:, :, :-1]], dim=2)
    return noise.to(device=device, dtype=dtype)


def training_scheduler() -> FlowEulerScheduler:
    """The seed's training schedule: 1000 shift-5 Euler timesteps from t = 1000 down, with loss weights."""
    scheduler = FlowEulerScheduler(shift=TRAINING_SHIFT, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    scheduler.set_timesteps(NUM_TRAIN_TIMESTEPS, training=True)
    return scheduler


def held_cells(cond: Conditioning, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the units' step fix-ups (``cond.step_fixups``) hold fixed in latents shaped ``like``: a bool
    mask and the held values (0 elsewhere), or ``None`` without fix-ups.

    A fix-up is run on latents of NaN: the cells it fills are the held ones. Training supports fix-ups
    that only put values back (TI2V's first frame); one that mixes held and free values is refused.
    """
    if not cond.step_fixups:
        return None
    probe = torch.full_like(like, float("nan"))
    check = torch.randn(like.shape, generator=torch.Generator().manual_seed(0)).to(like)
    fixed = check
    for fix in cond.step_fixups:
        probe, fixed = fix(probe), fix(fixed)
    if probe.shape != like.shape:
        raise TrainingError(f"a conditioning unit's step fix-up turns latents of shape {tuple(like.shape)} into "
                            f"{tuple(probe.shape)}; training needs fix-ups that keep the shape")
    mask = ~torch.isnan(probe)
    values = torch.where(mask, probe, torch.zeros_like(probe))
    if not torch.equal(torch.where(mask, values, check), fixed):
        raise TrainingError("a conditioning unit's step fix-up does more than hold latent cells at fixed values; "
                            "training supports only such fix-ups (TI2V-5B's first frame)")
    return mask, values


def tokenizer_config(args: argparse.Namespace) -> ModelConfig | None:
    """``--tokenizer_path``, else the umT5 folder beside a T5 file of ``--model_paths``, else the seed's default."""
    if args.tokenizer_path is not None:
        return ModelConfig(path=args.tokenizer_path)
    for config in model_configs(args):
        for path in config.path if isinstance(config.path, list) else [config.path]:
            if path is not None and Path(path).name == T5_FILE and (Path(path).parent / T5_TOKENIZER).is_dir():
                return ModelConfig(path=str(Path(path).parent / T5_TOKENIZER))
    return None


def load_pipeline(args: argparse.Namespace, device: torch.device | str = "cpu",
                  dit_only: bool = False) -> WanVideoPipeline:
    """The pipeline of the model flags in ``--torch_dtype``; ``dit_only`` drops what cached training needs not."""
    configs = model_configs(args)
    if args.expert is not None:
        configs = select_expert_files(configs, args.expert)
    pipe = WanVideoPipeline.from_pretrained(torch_dtype=DTYPES[args.torch_dtype], device=device,
                                            model_configs=configs, tokenizer_config=tokenizer_config(args),
                                            local_model_path=args.local_model_path)
    if pipe.dit is None:
        raise TrainingError("the model files hold no DiT (diffusion_pytorch_model*.safetensors): add it to "
                            "--model_paths / --model_id_with_origin_paths")
    if pipe.dit2 is not None:
        raise TrainingError("the model files hold both experts of a Wan 2.2 A14B pair; training takes one at a time: "
                            "pass --expert high or --expert low (the other's files are then not loaded)")
    apply_expert(args, pipe.dit, training_scheduler().timesteps)
    if dit_only:
        dropped = [slot for slot in ("vae", "text_encoder", "image_encoder", "motion_controller")
                   if getattr(pipe, slot) is not None]
        if dropped:
            logger.info("training on cached inputs: %s not needed, dropped", ", ".join(dropped))
        pipe.vae = pipe.text_encoder = pipe.image_encoder = pipe.motion_controller = pipe.prompter = None
    else:
        if pipe.vae is None:
            vae = VAE22_FILE if pipe.dit.config.fuses_image_latents else VAE_FILE
            raise TrainingError(f"training encodes the videos with the VAE: add {vae} to the model files")
        multiple = pipe.shape_multiples[0]
        for name in ("height", "width"):
            value = getattr(args, name, None)
            if value is not None and value % multiple:
                raise TrainingError(f"--{name} {value}: the loaded {pipe.dit.config.variant} DiT with its VAE needs a "
                                    f"multiple of {multiple} (VAE stride {pipe.vae_spatial_factor} x patch "
                                    f"{multiple // pipe.vae_spatial_factor})")
        if pipe.prompter is None:
            raise TrainingError(f"training encodes the prompts with umT5: add {T5_FILE} to the model files")
    return pipe


def empty_prompt_context(pipeline: WanVideoPipeline) -> torch.Tensor:
    """The context the pipeline's prompt unit gives the empty prompt (the default negative prompt)."""
    return pipeline.prompter.encode("", device=pipeline.device).to(pipeline.torch_dtype)


class WanTrainingModule(nn.Module):
    """The seed's ``WanTrainingModule``: ``module(sample) -> loss`` for one sample of the dataset (or a batch).

    ``trainable_models`` are fine-tuned in full; ``lora_base_model`` gets peft LoRA layers of rank
    ``lora_rank`` (alpha = rank) on ``lora_target_modules``. ``extra_inputs`` name the request
    fields filled from the sample (``input_image``/``end_image``: first/last video frame).
    Timesteps are drawn from the schedule indices in ``[min, max) * 1000`` of the boundaries.
    ``empty_prompt_ratio`` of the samples (drawn from each sample's seed) see ``empty_context``, the
    empty prompt's context, instead of their own: the unconditional model classifier-free guidance needs.
    ``foreground_weight`` scales the loss on the latent cells of the video's foreground (1: plain mse).
    ``timestep_weighting`` is the seed's ``"bell"`` (DiffSynth's weights, which fade out towards both
    ends of the schedule) or ``"uniform"`` (every timestep counts alike, the high-noise ones where a
    prompt decides colour and layout included).
    """

    def __init__(self, pipeline: WanVideoPipeline, trainable_models: Sequence[str] = (),
                 lora_base_model: str | None = None, lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
                 lora_rank: int = 32, use_gradient_checkpointing: bool = True,
                 use_gradient_checkpointing_offload: bool = False, extra_inputs: Sequence[str] = (),
                 max_timestep_boundary: float = 1.0, min_timestep_boundary: float = 0.0,
                 empty_prompt_ratio: float = 0.0, foreground_weight: float = 1.0,
                 timestep_weighting: str = "bell") -> None:
        super().__init__()
        self.pipeline = pipeline  # a plain object: its networks are not registered here
        self.extra_inputs = list(extra_inputs)
        self.use_gradient_checkpointing = use_gradient_checkpointing
        self.use_gradient_checkpointing_offload = use_gradient_checkpointing_offload
        self.timestep_range = (schedule_index(min_timestep_boundary, NUM_TRAIN_TIMESTEPS),
                               schedule_index(max_timestep_boundary, NUM_TRAIN_TIMESTEPS))
        self.scheduler = training_scheduler()
        self.lora_config: LoraConfig | None = None
        self.empty_prompt_ratio = empty_prompt_ratio
        self.foreground_weight = foreground_weight
        if timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise TrainingError(f"unknown timestep weighting {timestep_weighting!r}; choose from {TIMESTEP_WEIGHTINGS}")
        self.timestep_weighting = timestep_weighting
        self.empty_context: torch.Tensor | None = None  # set by the caller when the pipeline has no prompter
        if empty_prompt_ratio and pipeline.prompter is not None:
            self.empty_context = empty_prompt_context(pipeline)

        networks = {slot: getattr(pipeline, slot) for slot in SLOTS.values() if getattr(pipeline, slot) is not None}
        for network in networks.values():
            network.requires_grad_(False).eval()
        if lora_base_model is not None:
            self._add_lora(lora_base_model, list(lora_target_modules), lora_rank)
        # After the LoRA: peft freezes every non-LoRA weight of the network it adds layers to.
        for name in trainable_models:
            for part in self._parts(name):
                part.requires_grad_(True).train()
        self.pipe = nn.ModuleDict({slot: network for slot, network in networks.items()
                                   if any(p.requires_grad for p in network.parameters())})
        logger.info("trainable: %s parameters in %s", f"{sum(p.numel() for p in self.trainable_parameters()):,}",
                    ", ".join(self.pipe) or "nothing")

    @classmethod
    def from_args(cls, args: argparse.Namespace, pipeline: WanVideoPipeline) -> "WanTrainingModule":
        """The module the flags describe, around an already loaded ``pipeline``."""
        return cls(pipeline, trainable_models=split_list(args.trainable_models),
                   lora_base_model=args.lora_base_model, lora_target_modules=split_list(args.lora_target_modules),
                   lora_rank=args.lora_rank, use_gradient_checkpointing=not args.no_gradient_checkpointing,
                   use_gradient_checkpointing_offload=args.use_gradient_checkpointing_offload,
                   extra_inputs=split_list(args.extra_inputs), max_timestep_boundary=args.max_timestep_boundary,
                   min_timestep_boundary=args.min_timestep_boundary, empty_prompt_ratio=args.empty_prompt_ratio,
                   foreground_weight=args.foreground_weight, timestep_weighting=args.timestep_weighting)

    # -- what is trained ----------------------------------------------------------------------------

    def _parts(self, name: str) -> list[nn.Module]:
        """The modules a model name means: a whole network, or the VACE modules of the DiT."""
        if name == "vace":
            parts = [m for n, m in self.pipeline.dit.named_children() if n.startswith(VACE_PREFIX)]
            if not parts:
                raise TrainingError(f"'vace' names the VACE blocks, but the loaded {self.pipeline.dit.config.variant} "
                                    "DiT has none; load a Wan2.1-VACE model")
            return parts
        network = getattr(self.pipeline, name, None)
        if network is None:
            hint = (" (DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1:model.safetensors)"
                    if name == "motion_controller" else "")
            raise TrainingError(f"cannot train {name!r}: no such network is loaded{hint}")
        return [network]

    def _add_lora(self, base: str, targets: list[str], rank: int) -> None:
        """peft LoRA layers (A random, B zero: no change at the start) on ``targets`` inside ``base``."""
        parts = self._parts(base)  # raises when the network is not loaded
        root = self.pipeline.dit.vace_blocks if base == "vace" else parts[0]
        layers = {name: module for name, module in root.named_modules() if isinstance(module, (nn.Linear, nn.Conv3d))}
        unknown = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in layers)]
        if unknown:
            known = sorted({re.sub(r"^(?:\w*blocks\.)?\d+\.", "", name) for name in layers})
            raise TrainingError(f"--lora_target_modules {unknown} match no layer of {base}; its layers are "
                                f"(inside each block) {known}")
        self.lora_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
        inject_adapter_in_model(self.lora_config, root, adapter_name=ADAPTER)
        logger.info("LoRA rank %d on %s: %s", rank, base, ", ".join(targets))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def may_leave_parameters_unused(self) -> bool:
        """Whether some trained DiT weights sit in a part the ``--extra_inputs`` never run (DDP must then
        look for unused parameters every step)."""
        extras = set(self.extra_inputs)
        return any(name.startswith(prefix) and not extras & set(inputs)
                   for name, p in self.pipeline.dit.named_parameters() if p.requires_grad
                   for prefix, inputs in OPTIONAL_PARTS.items())

    @staticmethod
    def export_name(name: str, remove_prefix: str | None) -> str:
        """A parameter's name in saved files: ``remove_prefix`` stripped, peft's adapter name dropped.

        ``pipe.vace.`` (the seed's VACE prefix) strips ``pipe.dit.`` from the DiT's ``vace_*``
        weights, which gives the seed's key names.
        """
        if remove_prefix == "pipe.vace." and name.startswith(f"pipe.dit.{VACE_PREFIX}"):
            name = "pipe.vace." + name.removeprefix("pipe.dit.")
        if remove_prefix and name.startswith(remove_prefix):
            name = name[len(remove_prefix):]
        return name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")

    def check_extra_inputs(self) -> None:
        """Image-conditioned DiTs need their image inputs in ``--extra_inputs`` (else step 1 would fail)."""
        config, extras = self.pipeline.dit.config, set(self.extra_inputs)
        needed = set(required_inputs(config))
        if not needed <= extras:
            raise TrainingError(f"the loaded {config.variant} DiT is image-conditioned: add "
                                f"{sorted(needed - extras)} to --extra_inputs")

    # -- one step -----------------------------------------------------------------------------------

    def forward(self, samples: dict[str, Any] | Sequence[dict[str, Any]]) -> torch.Tensor:
        """The mean loss of a sample or a batch of them: dataset samples (or cached inputs), each with its
        ``sample_seed``; a batch is one DiT call, and its loss the mean of the samples' own losses."""
        samples = [samples] if isinstance(samples, dict) else list(samples)
        foreground = self.foreground_weight != 1.0
        parts = [self.prepare_inputs(s, foreground) if s.get("cached") is None else s["cached"] for s in samples]
        inputs = TrainingInputs.stack(parts).to(self.pipeline.device)
        return self.loss(inputs, [s["sample_seed"] for s in samples])

    def request(self, sample: dict[str, Any]) -> GenerationRequest:
        """The generation request the units read: the video's size, the prompt, no CFG, untiled VAE."""
        frames = sample["video"]
        extras: dict[str, Any] = {}
        for name in self.extra_inputs:
            if name == "input_image":
                extras[name] = frames[0]
            elif name == "end_image":
                extras[name] = frames[-1]
            else:
                value = sample[name]
                extras[name] = value[0] if name in IMAGE_INPUTS and isinstance(value, list) else value
        width, height = frames[0].size
        return GenerationRequest(prompt=sample["prompt"], height=height, width=width, num_frames=len(frames),
                                 cfg_scale=1.0, tiled=False, **extras)

    def prepare_inputs(self, sample: dict[str, Any], foreground: bool = True) -> TrainingInputs:
        """Run the pipeline's units and encode the video: everything of a step but noise and timestep.
        ``foreground=False`` skips the foreground mask (a median over the whole video), which only a
        ``foreground_weight`` other than 1 uses; caches always store it."""
        pipe, request = self.pipeline, self.request(sample)
        cond = Conditioning()
        # The units' networks are frozen, except a trainable motion controller (speed control).
        with torch.set_grad_enabled(torch.is_grad_enabled() and "motion_controller" in self.pipe):
            for unit in pipe.units:
                unit(pipe, request, cond)
        with torch.no_grad():
            video = video_pixels(pipe, request, sample["video"], "video")
            latents = pipe.encode_video(video, request)
            mask = latent_foreground(foreground_mask(video), tuple(latents.shape[2:])) if foreground else None
            if request.vace_reference_image is not None:
                reference = pipe.encode_video(reference_pixels(pipe, request), request)
                latents = torch.cat([reference, latents], dim=2)
                if mask is not None:
                    mask = torch.cat([torch.zeros_like(mask[:, :, :1]), mask], dim=2)
        held = held_cells(cond, latents)
        return TrainingInputs(latents, cond.positive["context"], dict(cond.shared),
                              request.vace_reference_image is not None, mask, self._token_scale(cond, latents),
                              *(held or (None, None)))

    def _token_scale(self, cond: Conditioning, latents: torch.Tensor) -> torch.Tensor | None:
        """The units' per-token timestep factor (``[1, L]``), checked against the DiT and the latents."""
        scale = cond.token_timestep_scale
        if scale is None:
            return None
        config = self.pipeline.dit.config
        tokens = math.prod(n // p for n, p in zip(latents.shape[2:], config.patch_size))
        if not config.per_token_timesteps:
            raise TrainingError(f"a unit set a per-token timestep scale, but the {config.variant} DiT takes one "
                                "timestep per video")
        if tuple(scale.shape) != (1, tokens):
            raise TrainingError(f"a unit set a per-token timestep scale of shape {tuple(scale.shape)}; the DiT sees "
                                f"(1, {tokens}) tokens for latents {tuple(latents.shape)}")
        return scale.to(torch.float32)

    def loss(self, inputs: TrainingInputs, seeds: int | Sequence[int]) -> torch.Tensor:
        """``mse(dit(add_noise(x0, noise, t)), noise - x0) * weight(t)``, noise and ``t`` drawn from each
        sample's seed (one seed per batch item), averaged over the batch."""
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        x0 = inputs.input_latents
        if len(seeds) != x0.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x0.shape[0]} samples")
        noisy, timesteps, targets, contexts, weights = zip(*(
            self._draw(x0[i:i + 1], inputs.context[i:i + 1], inputs.vace_reference, seed)
            for i, seed in enumerate(seeds)))
        noisy, timestep = torch.cat(noisy), torch.cat(timesteps)
        if inputs.held_mask is not None:  # the units' fixed cells (TI2V: the image's frame 0) take their values
            noisy = torch.where(inputs.held_mask, inputs.held_latents.to(noisy), noisy)
        if inputs.token_timestep_scale is not None:  # [B, L], as generation's per-token timestep
            timestep = (inputs.token_timestep_scale.float() * timestep.float()[:, None]).to(timestep.dtype)
        prediction = self.predict(noisy, timestep, torch.cat(contexts), inputs.shared)
        error = (prediction.float() - torch.cat(targets).float()).square()
        if self.foreground_weight != 1.0:
            if inputs.foreground is None:
                raise TrainingError("--foreground_weight needs the foreground of each sample: train on the videos, "
                                    "or on a cache written by this version (--cache_latents)")
            error = error * weighted(inputs.foreground, self.foreground_weight)
        if inputs.held_mask is None:
            per_sample = error.flatten(1).mean(1)
        else:  # the mean over the free cells only: held ones have no target
            free = (~inputs.held_mask).to(error.dtype)
            per_sample = (error * free).flatten(1).sum(1) / free.flatten(1).sum(1)
        return (per_sample * torch.stack(weights).to(error.device)).mean()

    def _draw(self, x0: torch.Tensor, context: torch.Tensor, vace_reference: bool,
              seed: int) -> tuple[torch.Tensor, ...]:
        """One sample's noised latents, timestep ``[1]``, target, context (maybe the empty prompt's) and
        loss weight, all drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        noise = training_noise(x0.shape, generator, vace_reference, x0.dtype, x0.device)
        index = torch.randint(*self.timestep_range, (1,), generator=generator)
        # As the seed: the timestep is cast to the pipeline dtype (bf16 rounds it) before use.
        timestep = self.scheduler.timesteps[index].to(dtype=self.pipeline.torch_dtype, device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, timestep)
        target = self.scheduler.training_target(x0, noise, timestep)
        if self.empty_prompt_ratio and torch.rand((), generator=generator) < self.empty_prompt_ratio:
            if self.empty_context is None:
                raise TrainingError("--empty_prompt_ratio needs the empty prompt's context: load the text encoder, "
                                    "or train on a cache written by this version (--cache_latents)")
            context = self.empty_context.to(device=context.device, dtype=context.dtype)
        weight = (self.scheduler.training_weight(timestep) if self.timestep_weighting == "bell"
                  else torch.ones((), dtype=torch.float32))
        return noisy, timestep, target, context, weight

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                shared: dict[str, Any]) -> torch.Tensor:
        """``dit(x, timestep, context, **shared)`` with every block (DiT and VACE) checkpointed.

        The stages are the DiT's own (``prepare``, blocks, ``finish``); only the block loops are
        written out here, so that each block call can go through ``torch.utils.checkpoint``.
        """
        dit = self.pipeline.dit
        shared = dict(shared)
        vace_context = shared.pop("vace_context", None)
        vace_scale = shared.pop("vace_scale", 1.0)
        prepared = dit.prepare(x, timestep, context, **shared)
        hints: list[torch.Tensor] = []
        if vace_context is not None:
            c = dit.vace_patch_embedding(vace_context.to(dit.dtype)).flatten(2).transpose(1, 2).float()
            for block in dit.vace_blocks:
                c, hint = self._run(block, c, prepared.tokens, prepared.e0, prepared.context, prepared.rope)
                hints.append(hint)
        tokens, layers = prepared.tokens, dit.config.vace_layers
        for i, block in enumerate(dit.blocks):
            tokens = self._run(block, tokens, prepared.e0, prepared.context, prepared.rope, prepared.image_tokens)
            if hints and i in layers:
                tokens = tokens + hints[layers.index(i)] * vace_scale
        return dit.finish(tokens, prepared)

    def _run(self, block: nn.Module, *args: Any) -> Any:
        """``block(*args)``, checkpointed (activations recomputed in backward) when gradients are on."""
        if not (self.use_gradient_checkpointing and torch.is_grad_enabled()):
            return block(*args)
        if self.use_gradient_checkpointing_offload:
            with torch.autograd.graph.save_on_cpu():
                return checkpoint(block, *args, use_reentrant=False)
        return checkpoint(block, *args, use_reentrant=False)
