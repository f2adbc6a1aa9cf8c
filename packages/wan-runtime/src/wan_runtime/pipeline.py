"""``WanVideoPipeline``: load the networks, run the conditioning units, denoise, decode.

The call is thin: a :class:`GenerationRequest` is validated, each unit in :data:`UNITS` adds its
conditioning, the sampler steps the latents with classifier-free guidance, and the VAE decodes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

import wan_models
from wan_models.clip import CLIPVisionTower
from wan_models.t5 import UMT5Encoder
from wan_models.vae import WanVAE

from .acceleration import enable_kernels, optimize_for_cpu, quantize_fp8
from .compile import compile_blocks, is_compiled
from .defaults import model_defaults
from .denoise import predict, predict_windows
from .devices import resolve_device, resolve_dtype
from .finite import NonFiniteError, check_finite, check_finite_tensors
from .images import tensor_to_frames
from .limits import RequestLimits
from .lora import LoraMerge, LoraSource, merge_lora, unmerge_lora
from .memory import Accountant, VramManager, manage_pipeline
from .parallel import SequenceParallel, enable_usp, init_process_group
from .request import GenerationRequest, finite_number
from .schedulers import make_scheduler
from .step import DEFAULT_STEP_HOOKS, Route, StepHook, plan_steps
from .units import Conditioning, Unit, camera, control, fused_image, image, noise, prompt, required_inputs, speed, vace

if TYPE_CHECKING:
    from .model_config import ModelConfig

logger = logging.getLogger(__name__)

# Order matters: later units read what earlier ones wrote (e.g. Fun control reuses the image latents).
UNITS: list[Unit] = [
    noise.initial_noise,
    noise.input_video,
    prompt.prompt,
    image.image,
    fused_image.fused_image,
    control.control_video,
    control.reference_image,
    camera.camera_control,
    speed.motion_bucket,
    vace.vace,
]

# Which attribute of the pipeline each network type fills.
SLOTS: dict[type, str] = {
    wan_models.WanDiT: "dit",
    WanVAE: "vae",
    UMT5Encoder: "text_encoder",
    CLIPVisionTower: "image_encoder",
    wan_models.MotionController: "motion_controller",
}


class WanVideoPipeline:
    """Wan 2.1 / 2.2 video generation with the seed's (DiffSynth's) call signature.

    Networks live in attributes ``dit``, ``vae``, ``text_encoder``, ``image_encoder``,
    ``motion_controller`` and ``prompter`` (tokenizer + text encoder); any may be ``None`` when the
    loaded model set does not need it. An expert pair (Wan2.2-A14B) puts the high-noise expert in
    ``dit`` and the low-noise one in ``dit2``. ``units`` build the DiT inputs, ``step_hooks`` the parts
    of each denoising step (:mod:`wan_runtime.step`).
    """

    def __init__(self, device: str | torch.device = "cuda", torch_dtype: torch.dtype = torch.bfloat16) -> None:
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(torch_dtype)
        self.limits = RequestLimits.from_env()  # size caps and memory check, run before any network
        self.dit: wan_models.WanDiT | None = None
        self.dit2: wan_models.WanDiT | None = None  # the low-noise expert of a pair
        self.vae: WanVAE | None = None
        self.text_encoder: UMT5Encoder | None = None
        self.image_encoder: CLIPVisionTower | None = None
        self.motion_controller: wan_models.MotionController | None = None
        self.prompter = None
        self.step_cache_skips: list[list[bool]] | None = None  # per CFG branch, last call with a step cache
        self.scheduler = make_scheduler("euler", shift=5.0)
        self.units: list[Unit] = list(UNITS)
        self.step_hooks: list[StepHook] = list(DEFAULT_STEP_HOOKS)
        self.sequence_parallel: SequenceParallel | None = None  # set by parallel.enable_usp
        self.vram: VramManager | None = None  # set by enable_vram_management
        self.attention_backend = "sdpa"  # set by from_pretrained through wan_kernels when installed

    # -- networks ---------------------------------------------------------------------------------

    def add_model(self, module: torch.nn.Module) -> None:
        """Put a loaded network in its slot, chosen by its type; a second DiT makes an expert pair."""
        name = next((slot for cls, slot in SLOTS.items() if isinstance(module, cls)), None)
        if name is None:
            raise TypeError(f"the pipeline has no slot for a {type(module).__name__}")
        if name == "dit" and self.dit is not None:
            self._add_expert(module)
            return
        if getattr(self, name) is not None:
            raise ValueError(f"two {name} networks given; a pipeline holds one")
        setattr(self, name, module)

    def _add_expert(self, module: wan_models.WanDiT) -> None:
        """The second DiT of an expert pair: the loader's identity (folder, file name, model_index.json)
        says which is the high-noise expert; when neither says, the order given decides (logged)."""
        if self.dit2 is not None:
            raise ValueError("three DiTs given; a pipeline holds one, or a high-noise and a low-noise expert")
        first = self.dit
        if module.config != first.config:
            raise ValueError(f"two DiTs of different architectures ({first.config.variant}, {module.config.variant}) "
                             "cannot be the experts of one model")
        roles = [m.identity.expert if m.identity is not None else None for m in (first, module)]
        if roles[0] is not None and roles[0] == roles[1]:
            raise ValueError(f"both DiTs are {roles[0]}-noise experts; load one high-noise and one low-noise expert")
        if "high" in roles or "low" in roles:
            high, low = (module, first) if roles[1] == "high" or roles[0] == "low" else (first, module)
        else:
            logger.info("nothing says which DiT is the high-noise expert (no high_noise_model/ or low_noise_model/ "
                        "folder, file name or model_index.json); taking the order given: first high-noise, "
                        "second low-noise")
            high, low = first, module
        self.dit, self.dit2 = high, low

    @property
    def dits(self) -> list[wan_models.WanDiT]:
        """The loaded DiTs: ``[dit]``, or ``[dit, dit2]`` for an expert pair."""
        return [dit for dit in (self.dit, self.dit2) if dit is not None]

    @classmethod
    def from_pretrained(
        cls,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cuda",
        model_configs: Sequence["ModelConfig"] = (),
        tokenizer_config: "ModelConfig | None" = None,
        local_model_path: str = "./models",
        skip_download: bool = False,
        redirect_common_files: bool = True,
        use_usp: bool = False,
        attention_backend: str | None = None,
        progress_bar_cmd: Callable = tqdm,
        download_source: str | None = None,
    ) -> "WanVideoPipeline":
        """Resolve (download if needed) and load every model file; networks are detected by content.

        ``tokenizer_config`` defaults to the umT5 tokenizer folder of Wan-AI/Wan2.1-T2V-1.3B.
        With ``wan-kernels`` installed, the best attention backend (or ``attention_backend``, or
        ``$WAN_ATTENTION``) and the fused ops the device supports are switched on, plus its CPU fast
        path for a DiT computed on the CPU (exact to float32 rounding, no extra weight memory).
        ``progress_bar_cmd`` wraps the list of model files (``lambda x: x`` silences it).
        ``download_source`` ("ModelScope" or "HuggingFace") is the hub of the configs that name none
        and of the default tokenizer (None: ``$DIFFSYNTH_DOWNLOAD_SOURCE``, else ModelScope).
        ``use_usp=True`` (under torchrun) joins the process group, puts each rank on its own GPU and
        splits the DiT's tokens across the ranks (see :mod:`wan_runtime.parallel`).
        """
        from .model_config import ModelConfig, redirect_common_files as redirect, with_download_source

        torch_dtype = resolve_dtype(torch_dtype)
        if not use_usp:  # under USP the device is each rank's own GPU, chosen when the group starts
            device = resolve_device(device)
        if use_usp:
            device = init_process_group(device)
        if tokenizer_config is None:
            tokenizer_config = ModelConfig(model_id="Wan-AI/Wan2.1-T2V-1.3B", origin_file_pattern="google/*",
                                           download_source=download_source)
        model_configs = with_download_source(model_configs, download_source)
        configs = redirect(list(model_configs)) if redirect_common_files else list(model_configs)
        pipe = cls(device=device, torch_dtype=torch_dtype)
        for config in progress_bar_cmd(configs):
            paths = config.resolve(local_model_path, skip_download=skip_download, use_usp=use_usp)
            module = wan_models.load_model(paths, dtype=config.offload_dtype or torch_dtype,
                                           device=config.offload_device or device)
            pipe.add_model(module)
        if pipe.text_encoder is not None:
            from .text import Prompter

            folder = tokenizer_config.resolve(local_model_path, skip_download=skip_download, use_usp=use_usp)
            folder = folder[0] if isinstance(folder, (list, tuple)) else folder
            folder = folder if folder.is_dir() else folder.parent
            pipe.prompter = Prompter.from_folder(folder, pipe.text_encoder)
        pipe.attention_backend = enable_kernels(attention_backend)
        if torch.device(device).type == "cpu":
            for dit in pipe.dits:
                optimize_for_cpu(dit)
        if use_usp:
            enable_usp(pipe)
        return pipe

    def quantize_fp8(self, include: str | list[str] | None = "blocks.*", scaled_mm: bool = False):
        """Store the DiT's matching linear layers in FP8 (needs ``wan-kernels``); returns the report.

        ``scaled_mm=True`` also computes them with FP8 matrix products where the GPU has them.
        """
        if self.dit is None:
            raise ValueError("no DiT is loaded")
        reports = [quantize_fp8(dit, include=include, scaled_mm=scaled_mm) for dit in self.dits]
        return reports[0] if len(reports) == 1 else reports

    def compile(self, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = False,
                backend: str = "inductor") -> None:
        """Compile each DiT block with ``torch.compile`` (regional: the blocks share one graph, so the
        cost is one block's); the compile runs on the first denoising step. See docs/compile.md.

        Options are ``torch.compile``'s. LoRA loading, FP8 storage and step caches compose with it;
        VRAM management and sequence parallel raise, since their hooks act inside the blocks.
        """
        if self.dit is None:
            raise ValueError("no DiT is loaded")
        if self.vram is not None:
            raise ValueError("compile() does not compose with enable_vram_management(): its hooks swap the "
                             "weights of every layer inside the blocks; use one or the other")
        if self.sequence_parallel is not None:
            raise ValueError("compile() does not compose with use_usp=True yet: the sequence-parallel hooks "
                             "swap the attention function inside the blocks")
        for dit in self.dits:
            compile_blocks(dit, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)

    def load_lora(self, module: torch.nn.Module, path: LoraSource, alpha: float = 1.0) -> LoraMerge:
        """Merge the LoRA at ``path`` into ``module`` (e.g. ``pipe.dit``) at strength ``alpha``, in place;
        returns the record :meth:`unload_lora` takes (see :mod:`wan_runtime.lora`)."""
        self._offload()  # merge into the stored weights, not into compute copies about to be dropped
        return merge_lora(module, path, alpha)

    def unload_lora(self, merge: LoraMerge) -> None:
        """Subtract a LoRA merged by :meth:`load_lora`; other merged LoRAs stay, in any order."""
        self._offload()
        unmerge_lora(merge.module, merge)

    def enable_vram_management(self, num_persistent_param_in_dit: int | None = None, vram_limit: float | None = None,
                               vram_buffer: float = 0.5, accountant: Accountant | None = None) -> VramManager:
        """Keep each network in its offload place (``ModelConfig.offload_device``/``offload_dtype``) and
        bring its layers to ``device`` as they run, keeping as many resident as the limit allows.

        ``vram_limit`` (GiB; default: the CUDA device's memory, no limit elsewhere) minus ``vram_buffer``
        bounds the weights on the device; ``num_persistent_param_in_dit`` instead fixes how many DiT
        parameters stay resident. float8 weights are upcast to ``torch_dtype`` per layer. Calling it again
        replaces the plan. See docs/vram_management.md.
        """
        for name, value in (("vram_limit", vram_limit), ("vram_buffer", vram_buffer)):
            if value is not None:
                finite_number(name, value, low=0.0)
        if any(is_compiled(dit) for dit in self.dits):
            raise ValueError("enable_vram_management() does not compose with compile(): its hooks swap the "
                             "weights of every layer inside the compiled blocks; use one or the other")
        if self.vram is not None:
            self.vram.disable()
        self.vram = manage_pipeline(self, num_persistent_param_in_dit, vram_limit, vram_buffer, accountant)
        return self.vram

    def _offload(self) -> None:
        """Under VRAM management, every weight back in its offload place."""
        if self.vram is not None:
            self.vram.offload()

    @property
    def vae_spatial_factor(self) -> int:
        return self.vae.config.spatial_factor if self.vae is not None else 8

    @property
    def shape_multiples(self) -> tuple[int, int]:
        """(pixels per DiT token along H and W, frames per latent) of the loaded VAE and DiT: the sizes
        a request is rounded up to (16 and 4 for Wan 2.1; 32 and 4 for TI2V-5B's 16x VAE)."""
        patch = self.dit.config.patch_size[1] if self.dit is not None else 2
        temporal = self.vae.config.temporal_factor if self.vae is not None else 4
        return self.vae_spatial_factor * patch, temporal

    @property
    def latent_channels(self) -> int:
        if self.vae is not None:
            return self.vae.config.z_dim
        return self.dit.config.out_dim

    def encode_video(self, video: torch.Tensor, request: GenerationRequest, tiled: bool | None = None) -> torch.Tensor:
        """VAE latents of ``[1, 3, T, H, W]`` pixels in [-1, 1], in the pipeline dtype."""
        if self.vae is None:
            raise ValueError("this input needs the VAE (Wan2.1_VAE.pth), which is not loaded")
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(video.to(device=self.device, dtype=vae_dtype),
                                  tiled=request.tiled if tiled is None else tiled,
                                  tile_size=request.tile_size, tile_stride=request.tile_stride)
        return latents.to(dtype=self.torch_dtype)

    # -- generation -------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> Conditioning:
        """Set the schedule and run every unit: the DiT inputs of the first step."""
        if self.dit is None:
            raise ValueError("no DiT is loaded; pass its file in model_configs")
        self.limits.check(self, request)
        self._set_schedule(request)
        cond = Conditioning()
        for unit in self.units:
            unit(self, request, cond)
        hint = "check the inputs (prompt_embeds, images, videos) and the loaded weights"
        check_finite(cond.latents, "the initial latents", hint)
        for name, inputs in (("shared", cond.shared), ("positive", cond.positive), ("negative", cond.negative)):
            check_finite_tensors(inputs, f"the DiT input {name}", hint)
        return cond

    def _set_schedule(self, request: GenerationRequest) -> None:
        self.scheduler = make_scheduler(request.sampler, shift=request.sigma_shift)
        if request.sampler == "euler":
            self.scheduler.set_timesteps(request.num_inference_steps, denoising_strength=request.denoising_strength,
                                         shift=request.sigma_shift, step_list=request.denoising_step_list)
        elif request.denoising_strength != 1.0:
            raise ValueError(f"denoising_strength={request.denoising_strength} (video-to-video) needs "
                             f"sampler='euler'; {request.sampler!r} always starts from pure noise")
        else:
            self.scheduler.set_timesteps(request.num_inference_steps, shift=request.sigma_shift)

    def denoise(self, request: GenerationRequest, cond: Conditioning,
                progress_bar_cmd: Callable = tqdm,
                step_callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                caches: list | None = None) -> torch.Tensor:
        """Step the latents through the schedule with classifier-free guidance; returns final latents.

        Each step is composed of the parts ``self.step_hooks`` choose (:mod:`wan_runtime.step`).
        ``caches`` (one per CFG branch, objects with ``run(dit, inputs)``) override the step caches
        the request asks for (one DiT only).
        """
        self._check_conditioning(cond)
        self._check_experts(request, caches)
        plan = plan_steps(self, request, cond)
        if caches is not None:
            plan.routes[0].caches = caches
        latents = cond.latents
        for step, t in enumerate(progress_bar_cmd(self.scheduler.timesteps)):
            route = plan.route(t)
            velocity = self._velocity(request, cond, latents, plan.timestep(t), route)
            latents = self.scheduler.step(velocity.to(latents.dtype), t, latents)
            for fix in plan.fixups:
                latents = fix(latents)
            self._check_step(latents, step, t)
            if step_callback is not None:
                step_callback(step, t, latents)
        self._report_caches(plan.routes)
        return latents[:, :, cond.leading_frames_to_drop:]

    def _check_experts(self, request: GenerationRequest, caches: list | None) -> None:
        """An expert needs its partner, and expert-pair fields need a pair: nothing is silently ignored."""
        if self.dit2 is not None:
            if caches is not None:
                raise ValueError("caches= overrides the step caches of one DiT; with an expert pair ask for a cache "
                                 "with step_cache= (each expert gets its own)")
            return
        expert = self.dit.identity.expert if self.dit.identity is not None else None
        if expert is not None:
            other = "low" if expert == "high" else "high"
            raise ValueError(f"the loaded DiT is the {expert}-noise expert of a Wan 2.2 pair, and the {other}-noise "
                             f"expert is missing: load it too (its {other}_noise_model/ folder)")
        given = [name for name in ("cfg_scale_2", "switch_DiT_boundary") if getattr(request, name) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} set, but the pipeline holds one DiT: they apply to an expert "
                             "pair (load a high-noise and a low-noise expert)")

    def _report_caches(self, routes: list[Route]) -> None:
        """Keep and log what the step caches skipped, per CFG branch over all steps."""
        if routes[0].caches[0] is None:
            self.step_cache_skips = None
            return
        if len(routes) == 1:  # the caches' own lists (a cache shared by both CFG branches: one list, twice)
            self.step_cache_skips = [cache.skipped for cache in routes[0].caches]
        else:
            branches = range(len(routes[0].caches))
            self.step_cache_skips = [[skip for route in routes for skip in route.caches[b].skipped] for b in branches]
        logger.info("%s skipped %s of %d steps (per CFG branch)", type(routes[0].caches[0]).__name__,
                    "/".join(str(sum(s)) for s in self.step_cache_skips), len(self.scheduler.timesteps))

    def _check_step(self, latents: torch.Tensor, step: int, t: torch.Tensor) -> None:
        """Stop at the first step whose latents are not finite (one reduction and sync per step)."""
        if bool(torch.isfinite(latents).all()):
            return
        steps = len(self.scheduler.timesteps)
        raise NonFiniteError(
            f"the latents went non-finite at denoising step {step + 1} of {steps} (timestep {float(t):.1f}); "
            f"nothing was decoded. Likely causes: float16 overflow (use bfloat16 or float32), a LoRA or strength "
            f"that blows the weights up, or an extreme cfg_scale")

    def _check_conditioning(self, cond: Conditioning) -> None:
        """An image-conditioned DiT needs its ``y``: say which input provides it, before any DiT work."""
        config = self.dit.config
        needed = required_inputs(config)
        if needed and "y" not in cond.shared:
            raise ValueError(f"the loaded {config.variant} DiT is image-conditioned: pass {' and '.join(needed)}")

    def _velocity(self, request: GenerationRequest, cond: Conditioning, latents: torch.Tensor,
                  timestep: torch.Tensor, route: Route) -> torch.Tensor:
        """Guided velocity ``neg + cfg * (pos - neg)`` from the route's DiT and scale; both branches in
        one batch with ``cfg_merge``."""
        caches, dit = route.caches, route.dit
        if not request.uses_cfg:
            return self._predict(request, dit, latents, timestep, {**cond.shared, **cond.positive}, caches[0])
        if request.cfg_merge:
            if caches[0] is not caches[1]:
                raise ValueError("cfg_merge=True runs both CFG branches as one batch, through one step cache: pass "
                                 "the same cache for both branches, or cfg_merge=False")
            inputs = {k: _repeat_batch(v) for k, v in cond.shared.items()}
            inputs["context"] = torch.cat([cond.positive["context"], cond.negative["context"]])
            timestep = _repeat_batch(timestep) if timestep.dim() == 2 else timestep  # per token: [2, L]
            positive, negative = self._predict(request, dit, _repeat_batch(latents), timestep, inputs,
                                               caches[0]).chunk(2)
        else:
            positive = self._predict(request, dit, latents, timestep, {**cond.shared, **cond.positive}, caches[0])
            negative = self._predict(request, dit, latents, timestep, {**cond.shared, **cond.negative}, caches[1])
        return negative + route.cfg_scale * (positive - negative)

    def _predict(self, request, dit, latents, timestep, inputs, cache) -> torch.Tensor:
        dit = dit if self.sequence_parallel is None else self.sequence_parallel.wrap(dit)
        if request.sliding_window_size is not None:
            return predict_windows(dit, latents, timestep, inputs,
                                   request.sliding_window_size, request.sliding_window_stride)
        return predict(dit, latents, timestep, inputs, cache)

    def decode(self, latents: torch.Tensor, request: GenerationRequest) -> list[Image.Image]:
        if self.vae is None:
            raise ValueError("decoding needs the VAE (Wan2.1_VAE.pth); pass output_type='latent' to skip it")
        vae_dtype = next(self.vae.parameters()).dtype
        video = self.vae.decode(latents.to(device=self.device, dtype=vae_dtype), tiled=request.tiled,
                                tile_size=request.tile_size, tile_stride=request.tile_stride)
        check_finite(video, "the decoded video", "the VAE overflowed: load it in bfloat16 or float32")
        return tensor_to_frames(video)

    def request(self, kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> GenerationRequest:
        """The :class:`GenerationRequest` a call with ``kwargs`` runs: unknown arguments refused, what a
        Wan 2.2 model's call leaves out taken from its registry entry, sizes rounded to the loaded models."""
        unknown = set(kwargs) - (set(GenerationRequest.__dataclass_fields__) - {"extra"})
        if unknown:
            raise TypeError(f"unknown arguments {sorted(unknown)}")
        kwargs = {**model_defaults(self, kwargs), **kwargs}  # a Wan 2.2 model's registry settings
        return GenerationRequest(extra=dict(extra or {}), shape_multiples=self.shape_multiples, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        progress_bar_cmd: Callable = tqdm,
        output_type: str = "pil",
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        step_callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        **kwargs: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate a video; keyword arguments are those of :class:`GenerationRequest` (for a Wan 2.2
        model, those left out come from its registry entry: :mod:`wan_runtime.defaults`).

        Returns PIL frames, or the final latents with ``output_type="latent"``. ``prompt_embeds``
        stand in for the text encoder; ``step_callback(step, timestep, latents)`` sees every step.
        """
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        extra = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        request = self.request({"prompt": prompt, "negative_prompt": negative_prompt, **kwargs}, extra)
        if output_type == "pil" and self.vae is None:
            raise ValueError("decoding needs the VAE (Wan2.1_VAE.pth), which is not loaded; load it, or pass "
                             "output_type='latent' for the latents")
        try:
            cond = self.prepare(request)
            latents = self.denoise(request, cond, progress_bar_cmd, step_callback)
            return latents if output_type == "latent" else self.decode(latents, request)
        finally:
            self._offload()  # between calls every weight is in its offload place


def _repeat_batch(value: Any) -> Any:
    """A batch-1 tensor repeated to batch 2 (both CFG branches); other values as they are."""
    return value.repeat(2, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) else value
