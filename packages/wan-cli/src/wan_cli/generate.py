"""``wan generate``: every pipeline input as a flag; prints where the video went and stage times."""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from wan_models.configs import DIFFSYNTH_SAMPLING
from wan_runtime.schedulers import SCHEDULERS

from .options import DTYPES, default_device, finite, key_values, load_config, torch_dtype

CAMERA_DIRECTIONS = ("Left", "Right", "Up", "Down", "LeftUp", "LeftDown", "RightUp", "RightDown")
SAMPLERS = tuple(SCHEDULERS)
REGISTRY_DEFAULT = "default: the model's registry settings"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The values of the sampling flags (--height ... --sampler), by their parameter names."""

    height: int
    width: int
    frames: int
    fps: int
    steps: int
    sigma_shift: float
    cfg_scale: float
    sampler: str
    cfg_scale_2: Optional[float] = None  # an expert pair's low-noise guidance
    switch_boundary: Optional[float] = None  # an expert pair's switch (fraction of 1000 timesteps)

    def describe(self) -> str:
        experts = ("" if self.switch_boundary is None else
                   f", low-noise cfg {float(self.cfg_scale if self.cfg_scale_2 is None else self.cfg_scale_2)}, "
                   f"boundary {self.switch_boundary}")
        return (f"{self.width}x{self.height}, {self.frames} frames @ {self.fps} fps, {self.steps} steps, "
                f"shift {float(self.sigma_shift)}, cfg {float(self.cfg_scale)}{experts}, {self.sampler}")


def registry_settings(sampling: Any) -> Settings:
    """A ``wan_models.configs.Sampling`` as flag values (:func:`wan_runtime.defaults.sampling_arguments`: its
    first size and sampler; an expert pair's guidance as --cfg-scale (high) and --cfg-scale-2 (low), and its
    boundary)."""
    from wan_runtime.defaults import sampling_arguments

    a = sampling_arguments(sampling)
    return Settings(a["height"], a["width"], a["num_frames"], sampling.fps, a["num_inference_steps"],
                    a["sigma_shift"], a["cfg_scale"], a["sampler"], a.get("cfg_scale_2"), a.get("switch_DiT_boundary"))


# A folder that matches no registry entry: DiffSynth-Studio's pipeline defaults, 15 fps as its examples.
FALLBACK_SETTINGS = registry_settings(DIFFSYNTH_SAMPLING)


def default_settings(model: Optional[str]) -> tuple[Settings, str, Optional[str]]:
    """The flags' defaults for ``--model``, where they come from (for the log line) and the registry entry."""
    import wan_models

    if model is None:
        from wan_runtime.assets import DEFAULT_MODEL_SETTINGS as tiny

        settings = dataclasses.replace(FALLBACK_SETTINGS, **tiny)
        return settings, "the embedded tiny-shapes model", None
    if Path(model).is_dir():
        from wan_runtime.sources import folder_entry

        entry, candidates = folder_entry(Path(model))
        if entry is None:
            why = (f"its DiT fits {', '.join(candidates)}, which its name does not tell apart" if candidates
                   else "no registry entry has its DiT's config")
            return FALLBACK_SETTINGS, f"the defaults ({model}: {why})", None
        source = f"the registry entry {entry} (matched by {model}'s DiT)"
    elif model in wan_models.MODELS:
        entry, source = model, f"the registry entry {model}"
    else:
        return FALLBACK_SETTINGS, "the defaults", None  # not a model: resolve_model says so
    sampling = wan_models.MODELS[entry].sampling
    if sampling is None:
        return FALLBACK_SETTINGS, f"the defaults ({entry} has no registry settings)", entry
    return registry_settings(sampling), source, entry


class StageTimer:
    """Wall-clock seconds per named stage, for the closing summary line."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        return ", ".join(f"{name} {sec:.1f}s" for name, sec in self.seconds.items())


def _sliding_window(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if value is None:
        return None, None
    try:
        size, stride = (int(v) for v in value.split(":"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not SIZE:STRIDE in latent frames, e.g. 9:4",
                                 param_hint="--sliding-window") from None
    return size, stride


LORA_FORM = "PATH[:ALPHA][@high|@low]"


def _lora_file(text: str, value: str) -> Optional[tuple[Path, float]]:
    """``text`` as an existing ``PATH`` or ``PATH:ALPHA`` (None when no file is named); ``value`` is the
    whole flag value, for the message."""
    if Path(text).is_file():
        return Path(text), 1.0
    path, colon, alpha = text.rpartition(":")
    if not colon or not Path(path).is_file():
        return None
    try:
        strength = float(alpha)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: the strength {alpha!r} is not a number (expected {LORA_FORM})",
                                 param_hint="--lora") from None
    if not math.isfinite(strength):
        raise typer.BadParameter(f"{value!r}: the strength {alpha} is not a finite number", param_hint="--lora")
    return Path(path), strength


def _lora(value: str) -> tuple[Path, float, Optional[str]]:
    """``PATH[:ALPHA][@high|@low]`` -> (path, strength, expert or None), read from the right so that a path
    holding ':' or '@' still works; the file must exist."""
    from wan_models.identity import EXPERTS

    if Path(value).is_file():
        return Path(value), 1.0, None
    head, at, suffix = value.rpartition("@")
    if at and suffix in EXPERTS:
        found = _lora_file(head, value)
        if found is not None:
            return (*found, suffix)
    found = _lora_file(value, value)
    if found is not None:
        return (*found, None)
    if at and suffix not in EXPERTS and "/" not in suffix and "\\" not in suffix:
        raise typer.BadParameter(f"{value!r}: '@{suffix}' names no expert; expected {LORA_FORM} (an expert "
                                 "pair's high-noise or low-noise DiT)", param_hint="--lora")
    raise typer.BadParameter(f"no LoRA file in {value!r} (expected {LORA_FORM}, PATH an existing file)",
                             param_hint="--lora")


def _check_lora_experts(loras: list[tuple[Path, float, Optional[str]]], values: list[str], pair: bool,
                        model: str) -> None:
    """An expert suffix needs a Wan 2.2 expert pair: refused on a single DiT, naming the flag value."""
    if pair:
        return
    named = [value for value, (_, _, expert) in zip(values, loras) if expert is not None]
    if named:
        raise typer.BadParameter(f"{', '.join(map(repr, named))}: {model} has one DiT, not a Wan 2.2 expert pair; "
                                 "drop the @high/@low suffix", param_hint="--lora")


def _apply_preset(name: str, entry: Optional[str], defaults: Settings) -> tuple[Any, Settings]:
    """The preset ``name`` of registry entry ``entry`` and the defaults it sets (guidance 1 on every DiT)."""
    from wan_runtime.presets import get_preset

    try:
        preset = get_preset(entry, name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--preset") from None
    pair = defaults.switch_boundary is not None
    return preset, dataclasses.replace(defaults, steps=preset.steps, sigma_shift=preset.shift, cfg_scale=1.0,
                                       sampler=preset.sampler, cfg_scale_2=1.0 if pair else None)


def generate(
    prompt: str = typer.Option("", "--prompt", "-p", help="What the video shows."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="What to steer away from (with CFG)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Registry name (see `wan models`) or a local model folder "
                                             "(default: the embedded tiny-shapes model, 64x64, 17 frames)."),
    output: Path = typer.Option(Path("output.mp4"), "--output", "-o", help="Where to write the mp4."),
    image: Optional[Path] = typer.Option(None, "--image", help="First frame (I2V, FLF2V, Fun InP, camera)."),
    end_image: Optional[Path] = typer.Option(None, "--end-image", help="Last frame (FLF2V, Fun InP)."),
    video: Optional[Path] = typer.Option(None, "--video", help="Input video for video-to-video."),
    denoising_strength: float = typer.Option(1.0, "--denoising-strength", callback=finite, min=0.0, max=1.0,
                                             help="How much of --video to repaint (0..1)."),
    control_video: Optional[Path] = typer.Option(None, "--control-video", help="Fun Control video (depth, pose, ...)."),
    reference_image: Optional[Path] = typer.Option(None, "--reference-image", help="Fun V1.1 reference image."),
    camera_direction: Optional[str] = typer.Option(None, "--camera-direction",
                                                   help=f"Camera motion: {', '.join(CAMERA_DIRECTIONS)}."),
    camera_speed: float = typer.Option(1 / 54, "--camera-speed", callback=finite, min=0.0,
                                       help="Camera speed per frame."),
    vace_video: Optional[Path] = typer.Option(None, "--vace-video", help="VACE control/source video."),
    vace_mask: Optional[Path] = typer.Option(None, "--vace-mask", help="VACE mask video (white = generate)."),
    vace_reference: Optional[Path] = typer.Option(None, "--vace-reference", help="VACE reference image."),
    vace_scale: float = typer.Option(1.0, "--vace-scale", callback=finite, help="Strength of the VACE hints."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (same seed, same video)."),
    height: Optional[int] = typer.Option(None, "--height", min=16, help="Pixels; rounded up to a multiple of 16 "
                                         f"({REGISTRY_DEFAULT})."),
    width: Optional[int] = typer.Option(None, "--width", min=16, help="Pixels; rounded up to a multiple of 16 "
                                        f"({REGISTRY_DEFAULT})."),
    frames: Optional[int] = typer.Option(None, "--frames", min=1, help="Frame count; rounded up to 4k+1 "
                                         f"({REGISTRY_DEFAULT})."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help=f"Denoising steps ({REGISTRY_DEFAULT})."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", callback=finite, min=0.0,
                                              help=f"Classifier-free guidance, 1 = off ({REGISTRY_DEFAULT}); "
                                                   "for an expert pair the high-noise expert's, and the low-noise "
                                                   "one's too unless --cfg-scale-2 is given."),
    cfg_scale_2: Optional[float] = typer.Option(None, "--cfg-scale-2", callback=finite, min=0.0,
                                                help=f"The low-noise expert's guidance (Wan2.2-A14B; {REGISTRY_DEFAULT})."),
    switch_boundary: Optional[float] = typer.Option(None, "--switch-boundary", callback=finite, min=0.0, max=1.0,
                                                    help="Where the high-noise expert hands over, as a fraction of "
                                                         f"1000 timesteps (Wan2.2-A14B; {REGISTRY_DEFAULT})."),
    sigma_shift: Optional[float] = typer.Option(None, "--sigma-shift", callback=finite,
                                                help=f"Schedule time shift, > 0 ({REGISTRY_DEFAULT})."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help=f"One of {', '.join(SAMPLERS)} "
                                          f"({REGISTRY_DEFAULT}; dpmpp is the official DPM++)."),
    motion_bucket_id: Optional[int] = typer.Option(None, "--motion-bucket-id", min=0,
                                                   help="Speed control (with the speedcontrol model)."),
    tiled: bool = typer.Option(True, "--tiled/--no-tiled", help="Tiled VAE encode/decode (less memory)."),
    sliding_window: Optional[str] = typer.Option(None, "--sliding-window",
                                                 help="SIZE:STRIDE in latent frames: DiT over blended windows."),
    attention: Optional[str] = typer.Option(None, "--attention",
                                            help="Attention backend (wan-kernels): auto, flash3, flash2, sage, sdpa, math."),
    fp8: bool = typer.Option(False, "--fp8", help="Store the DiT blocks' linear weights in FP8 (wan-kernels)."),
    compile: bool = typer.Option(False, "--compile",  # named as the flag: --config keys are parameter names
                                 help="torch.compile each DiT block (the first step pays the compile time)."),
    lora: list[str] = typer.Option([], "--lora", help=f"LoRA file to merge, {LORA_FORM}: into both experts of a Wan "
                                                      "2.2 pair unless @high or @low names one; repeatable."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Few-step settings of a distilled LoRA for --model "
                                         "(e.g. lightning: 4 steps, cfg 1, its LoRA files fetched unless --lora is "
                                         "given; docs/lora.md); flags given win."),
    teacache: Optional[float] = typer.Option(None, "--teacache", callback=finite, min=0.0,
                                             help="TeaCache threshold (e.g. 0.05 to 0.2): skip near-duplicate steps."),
    teacache_model: Optional[str] = typer.Option(None, "--teacache-model",
                                                 help="TeaCache coefficients to use (default: --model's name)."),
    step_cache: Optional[str] = typer.Option(None, "--step-cache",
                                             help="Step cache that skips near-duplicate DiT steps: first_block, "
                                                  "teacache, magcache (docs/step_caches.md)."),
    step_cache_option: list[str] = typer.Option([], "--step-cache-option",
                                                help="KEY=VALUE option of --step-cache (e.g. threshold=0.08; numbers, "
                                                     "true/false, comma lists); repeatable."),
    usp: bool = typer.Option(False, "--usp", help="Sequence parallel across the GPUs of a torchrun launch."),
    offload: bool = typer.Option(False, "--offload", help="Keep weights in CPU memory, stream layers to the GPU."),
    vram_limit: Optional[float] = typer.Option(None, "--vram-limit", callback=finite, min=0.0,
                                               help="GB of GPU memory for resident weights (with --offload)."),
    fps: Optional[int] = typer.Option(None, "--fps", min=1, help=f"Frames per second of the mp4 ({REGISTRY_DEFAULT})."),
    quality: int = typer.Option(5, "--quality", min=0, max=10, help="mp4 quality 0..10 (10 best)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cpu, ... (default: cuda if present)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help=f"One of {', '.join(DTYPES)}."),
    models_dir: Path = typer.Option(Path("models"), "--models-dir", help="Where registry models are stored."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    config: Optional[Path] = typer.Option(None, "--config", is_eager=True, callback=load_config,
                                          help="TOML file of option defaults (keys = flag names)."),
) -> None:
    """Generate a video and write it as an mp4 (with the embedded tiny-shapes model when no --model is given).

    Sampling flags not given take the model's registry settings (``wan_models.MODELS[name].sampling``).
    """
    defaults, settings_source, entry = default_settings(model)
    few_step = None
    if preset is not None:
        few_step, defaults = _apply_preset(preset, entry, defaults)
        settings_source += f" with the preset {few_step.name} ({few_step.source})"
    if model is None:
        from wan_runtime.assets import default_model_dir

        model = str(default_model_dir())
    given = dict(height=height, width=width, frames=frames, fps=fps, steps=steps, sigma_shift=sigma_shift,
                 cfg_scale=cfg_scale, sampler=sampler, cfg_scale_2=cfg_scale_2, switch_boundary=switch_boundary)
    if cfg_scale is not None and cfg_scale_2 is None:  # one --cfg-scale serves both experts
        given["cfg_scale_2"] = cfg_scale if defaults.switch_boundary is not None else None
    settings = dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})
    height, width, frames, fps, steps = settings.height, settings.width, settings.frames, settings.fps, settings.steps
    sigma_shift, cfg_scale, sampler = settings.sigma_shift, settings.cfg_scale, settings.sampler
    step_list = None
    if few_step is not None:  # its timesteps, unless --steps or --sampler asked for another schedule
        if steps == len(few_step.step_list) and sampler == "euler":
            step_list = few_step.step_list
        else:
            typer.echo(f"the preset's timesteps {list(few_step.step_list)} are not used: {steps} {sampler} steps "
                       "were asked for", err=True)
    if camera_direction is not None and camera_direction not in CAMERA_DIRECTIONS:
        raise typer.BadParameter(f"{camera_direction!r} is not one of {', '.join(CAMERA_DIRECTIONS)}",
                                 param_hint="--camera-direction")
    if sampler not in SAMPLERS:
        raise typer.BadParameter(f"{sampler!r} is not one of {', '.join(SAMPLERS)}", param_hint="--sampler")
    if sigma_shift <= 0:
        raise typer.BadParameter(f"{sigma_shift} must be > 0", param_hint="--sigma-shift")
    if output.suffix.lower() != ".mp4":
        raise typer.BadParameter(f"{output} must end in .mp4", param_hint="--output")
    from wan_runtime.devices import resolve_device
    from wan_runtime.files import check_writable

    try:
        check_writable(output)  # before hours of work, not after them
        device = str(resolve_device(device or default_device(), None))
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--output" if isinstance(e, OSError) else "--device") from None
    window_size, window_stride = _sliding_window(sliding_window)
    loras = [_lora(value) for value in lora]
    if entry is not None:  # a registry entry says whether the model is an expert pair: refuse before loading
        import wan_models

        _check_lora_experts(loras, lora, bool(wan_models.MODELS[entry].experts), entry)
    if teacache is not None:
        from wan_runtime.caching import TEACACHE_COEFFICIENTS

        teacache_model = teacache_model or Path(model).name
        if teacache_model not in TEACACHE_COEFFICIENTS:
            raise typer.BadParameter(f"no TeaCache coefficients for {teacache_model!r}; pass --teacache-model, one of "
                                     f"{', '.join(TEACACHE_COEFFICIENTS)}", param_hint="--teacache")
    cache_options = _step_cache_options(step_cache, step_cache_option, teacache, teacache_model or entry
                                        or Path(model).name, steps, window_size, window_stride)
    dtype_ = torch_dtype(dtype)

    from tqdm import tqdm

    from wan_runtime import WanVideoPipeline
    from wan_runtime.presets import expert_module
    from wan_runtime.video_io import load_image, load_video, save_video

    from wan_runtime.sources import resolve_model

    if vram_limit is not None and not offload:
        raise typer.BadParameter("--vram-limit needs --offload", param_hint="--vram-limit")
    if compile and (offload or usp):
        raise typer.BadParameter(f"--compile does not compose with {'--offload' if offload else '--usp'} "
                                 "(their hooks act inside the compiled blocks)", param_hint="--compile")
    timer = StageTimer()
    try:
        source = resolve_model(model)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    if few_step is not None and not loras:
        from wan_runtime.presets import fetch_loras

        loras = fetch_loras(few_step, models_dir)
        typer.echo(f"preset {few_step.name}: " + ", ".join(f"{path} at {strength:g}"
                                                           + (f" on the {expert}-noise expert" if expert else "")
                                                           for path, strength, expert in loras), err=True)
    named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    typer.echo(f"settings from {settings_source}: {settings.describe()}"
               + (f"; from the command line: {', '.join(named)}" if named else ""), err=True)

    def bar(stage: str, unit: str):
        return (lambda x: x) if quiet else (lambda x: tqdm(x, desc=stage, unit=unit))

    with timer.stage("read"):
        from wan_runtime.limits import RequestLimits
        from wan_runtime.request import GenerationRequest

        # The request rounds sizes (and says so); media are then read at the rounded size.
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, denoising_strength=denoising_strength,
            camera_control_direction=camera_direction, camera_control_speed=camera_speed, vace_scale=vace_scale,
            seed=seed, height=height, width=width, num_frames=frames, cfg_scale=cfg_scale,
            cfg_scale_2=settings.cfg_scale_2, switch_DiT_boundary=settings.switch_boundary,
            num_inference_steps=steps, sigma_shift=sigma_shift, sampler=sampler, denoising_step_list=step_list,
            motion_bucket_id=motion_bucket_id,
            tiled=tiled, sliding_window_size=window_size, sliding_window_stride=window_stride,
            tea_cache_l1_thresh=teacache, tea_cache_model_id=teacache_model or "", step_cache=step_cache,
            step_cache_options=cache_options)
        limits = RequestLimits.from_env()
        limits.check_size(request)  # before any file is read or network loaded
        size = dict(height=request.height, width=request.width)
        for field, path in (("input_image", image), ("end_image", end_image), ("reference_image", reference_image),
                            ("vace_reference_image", vace_reference)):
            if path is not None:
                setattr(request, field, load_image(path, **size))
        for field, path in (("input_video", video), ("control_video", control_video), ("vace_video", vace_video),
                            ("vace_video_mask", vace_mask)):
            if path is not None:
                setattr(request, field, load_video(path, num_frames=request.num_frames, **size))
    model_configs = source.model_configs
    if offload:
        model_configs = [dataclasses.replace(c, offload_device="cpu") for c in model_configs]
    with timer.stage("load"):
        pipe = WanVideoPipeline.from_pretrained(torch_dtype=dtype_, device=device,
                                                model_configs=model_configs,
                                                tokenizer_config=source.tokenizer_config,
                                                local_model_path=str(models_dir), use_usp=usp,
                                                attention_backend=attention,
                                                progress_bar_cmd=bar("load", "file"))
        if loras:
            _check_lora_experts(loras, lora or [str(path) for path, _, _ in loras], pipe.dit2 is not None, model)
        for path, strength, expert in loras:
            for dit in expert_module(pipe, expert, str(path)):  # no suffix: every loaded DiT
                pipe.load_lora(dit, path, alpha=strength)
        if fp8:
            pipe.quantize_fp8()
        if offload:
            pipe.enable_vram_management(vram_limit=vram_limit)
        if compile:
            pipe.compile()
    if pipe.vae is None:
        from wan_models.configs import VAE_FILE

        raise ValueError(f"{model} has no VAE ({VAE_FILE}), which decoding the video needs; add it to the folder")
    pipe.limits = limits
    import torch

    with timer.stage("encode"), torch.no_grad():
        cond = pipe.prepare(request)
    with timer.stage("denoise"), torch.no_grad():
        latents = pipe.denoise(request, cond, progress_bar_cmd=bar("denoise", "step"))
    with timer.stage("decode"), torch.no_grad():
        video_frames = pipe.decode(latents, request)
    if usp and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # every rank computed the same video; rank 0 writes it
    with timer.stage("save"):
        save_video(video_frames, output, fps=fps, quality=quality)
    typer.echo(f"wrote {output} ({len(video_frames)} frames, {video_frames[0].width}x{video_frames[0].height}); "
               f"{timer.summary()}")


def _step_cache_options(name: Optional[str], values: list[str], teacache: Optional[float], model_name: str,
                        steps: int, window_size: Optional[int], window_stride: Optional[int]) -> dict[str, Any]:
    """``--step-cache-option`` values as ``step_cache_options``, checked by building the caches now, so a
    bad name or option is a usage error before anything loads (TeaCache's model_id defaults to the model's name)."""
    options = key_values(values, "--step-cache-option")
    if name is None and not options:
        return options
    if name == "teacache":
        options.setdefault("model_id", model_name)
    from wan_runtime.caching import make_step_caches
    from wan_runtime.request import GenerationRequest

    try:
        probe = GenerationRequest(step_cache=name, step_cache_options=options, tea_cache_l1_thresh=teacache,
                                  sliding_window_size=window_size, sliding_window_stride=window_stride)
        make_step_caches(probe, steps, 1)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--step-cache") from None
    return options


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
