"""One generation call's arguments, checked and normalised before any network runs."""

from __future__ import annotations

import logging
import math
from dataclasses import InitVar, dataclass, field
from numbers import Real
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from .caching import requested_step_cache
from .devices import resolve_device

logger = logging.getLogger(__name__)

Frames = Sequence[Image.Image]
DEFAULT_CAMERA_ORIGIN = (0, 0.532139961, 0.946026558, 0.5, 0.5, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)


def round_up(value: int, multiple: int, remainder: int = 0) -> int:
    """Smallest ``n >= value`` with ``n % multiple == remainder``."""
    return value + (remainder - value) % multiple


@dataclass
class GenerationRequest:
    """Everything ``WanVideoPipeline.__call__`` accepts, with the reference pipeline's defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    input_image: Image.Image | None = None
    end_image: Image.Image | None = None
    input_video: Frames | None = None
    denoising_strength: float = 1.0
    control_video: Frames | None = None
    reference_image: Image.Image | None = None
    camera_control_direction: str | None = None
    camera_control_speed: float = 1 / 54
    camera_control_origin: tuple[float, ...] = DEFAULT_CAMERA_ORIGIN
    vace_video: Frames | None = None
    vace_video_mask: Frames | None = None
    vace_reference_image: Image.Image | None = None
    vace_scale: float = 1.0
    seed: int | None = None
    rand_device: str = "cpu"
    height: int = 480
    width: int = 832
    num_frames: int = 81
    cfg_scale: float = 5.0
    cfg_scale_2: float | None = None  # the low-noise expert's guidance (None: cfg_scale), with pipe.dit2
    switch_DiT_boundary: float | None = None  # expert switch, fraction of 1000 timesteps (None: 0.875)
    cfg_merge: bool = False
    num_inference_steps: int = 50
    sigma_shift: float = 5.0
    sampler: str = "euler"
    # LightX2V's denoising_step_list: timesteps on the unshifted 1000-step grid, each step's sigma being
    # sigma_shift applied to t/1000 (the few-step LoRAs' published schedules; euler only; None: evenly spaced)
    denoising_step_list: Sequence[float] | None = None
    motion_bucket_id: int | None = None
    tiled: bool = True
    tile_size: tuple[int, int] = (30, 52)
    tile_stride: tuple[int, int] = (15, 26)
    sliding_window_size: int | None = None
    sliding_window_stride: int | None = None
    tea_cache_l1_thresh: float | None = None
    tea_cache_model_id: str = ""
    mag_cache_thresh: float | None = None
    mag_cache_ratios: Sequence[float] | Sequence[Sequence[float]] | Mapping[str, Any] | None = None
    mag_cache_max_skip_steps: int = 2
    mag_cache_retention_ratio: float = 0.2
    step_cache: str | None = None  # a name in wan_runtime.caching.STEP_CACHES; see docs/step_caches.md
    step_cache_options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # (pixels per DiT token along H and W, VAE frames per latent): the loaded models' strides, which
    # the pipeline passes; the default is the Wan 2.1 VAE (8) times the patch (2), and 4 frames.
    shape_multiples: InitVar[tuple[int, int]] = (16, 4)

    def __post_init__(self, shape_multiples: tuple[int, int]) -> None:
        self._check_types()
        self._check_numbers()
        self._round_shape(*shape_multiples)

    def _check_types(self) -> None:
        """Text, flags and the noise device: a wrong type is an error naming the field, before any work."""
        for name in ("prompt", "negative_prompt", "tea_cache_model_id"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a str, got {type(value).__name__} {value!r}"
                                 + (" (pass '' for no prompt)" if value is None else ""))
        if self.step_cache is not None and not isinstance(self.step_cache, str):
            raise ValueError(f"step_cache must be a str (a registered cache name) or None, got "
                             f"{type(self.step_cache).__name__} {self.step_cache!r}")
        if not isinstance(self.step_cache_options, dict) or not all(isinstance(k, str) for k in self.step_cache_options):
            raise ValueError(f"step_cache_options must be a dict with str keys, got {self.step_cache_options!r}")
        for name in ("cfg_merge", "tiled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.rand_device = str(resolve_device(self.rand_device, "rand_device"))

    def _check_numbers(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("height", "width", "num_frames", "num_inference_steps"):
            positive_int(name)
        for name in ("cfg_scale", "vace_scale", "camera_control_speed"):
            finite_number(name, getattr(self, name))
        if self.cfg_scale_2 is not None:
            finite_number("cfg_scale_2", self.cfg_scale_2)
        if self.switch_DiT_boundary is not None:
            finite_number("switch_DiT_boundary", self.switch_DiT_boundary, low=0.0, high=1.0)
        finite_number("denoising_strength", self.denoising_strength, low=0.0, high=1.0)
        finite_number("sigma_shift", self.sigma_shift, low=0.0, low_open=True)
        finite_number("mag_cache_retention_ratio", self.mag_cache_retention_ratio, low=0.0, high=1.0)
        for name in ("tea_cache_l1_thresh", "mag_cache_thresh"):
            if getattr(self, name) is not None:
                finite_number(name, getattr(self, name), low=0.0)
        for i, value in enumerate(self.camera_control_origin):
            finite_number(f"camera_control_origin[{i}]", value)
        for name in ("tile_size", "tile_stride"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
                raise ValueError(f"{name} must be two positive integers (height, width) in latents, got {value!r}")
        if self.mag_cache_ratios:
            ratios = self.mag_cache_ratios
            # Per expert ({"dit": ..., "dit2": ...}, from calibrate_magcache on a pair), per CFG branch, or one list.
            groups = ([(f"[{key!r}]", value) for key, value in ratios.items()] if isinstance(ratios, Mapping)
                      else [("", ratios)])
            for where, group in groups:
                nested = isinstance(group, (list, tuple)) and group and isinstance(group[0], (list, tuple))
                for row in group if nested else [group]:
                    for i, value in enumerate(row):
                        finite_number(f"mag_cache_ratios{where}[{i}]", value)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.motion_bucket_id is not None and (isinstance(self.motion_bucket_id, bool)
                                                  or not isinstance(self.motion_bucket_id, int)
                                                  or self.motion_bucket_id < 0):
            raise ValueError(f"motion_bucket_id must be a non-negative integer or None, got {self.motion_bucket_id!r}")
        if (self.sliding_window_size is None) != (self.sliding_window_stride is None):
            raise ValueError("sliding_window_size and sliding_window_stride go together; got "
                             f"{self.sliding_window_size!r} and {self.sliding_window_stride!r}")
        if self.sliding_window_size is not None:
            positive_int("sliding_window_size")
            positive_int("sliding_window_stride")
            if self.sliding_window_stride > self.sliding_window_size:
                raise ValueError(f"sliding_window_stride {self.sliding_window_stride} exceeds "
                                 f"sliding_window_size {self.sliding_window_size}")
        if self.denoising_step_list is not None:
            self._check_step_list()
        if self.mag_cache_thresh is not None and self.mag_cache_ratios is None:
            raise ValueError("mag_cache_thresh needs mag_cache_ratios from "
                             "wan_runtime.caching.calibrate_magcache(pipe, ...) for this model")
        cache = requested_step_cache(self)  # unknown name, bad options, two caches: a ValueError naming them
        if cache is not None and self.sliding_window_size is not None:
            raise ValueError(f"step caches ({cache[2]}) and sliding windows cannot be combined")

    def _check_step_list(self) -> None:
        """A published step list: strictly decreasing numbers in (0, 1000], one per step, with the Euler
        sampler from pure noise; stored as a tuple of floats."""
        given = self.denoising_step_list
        try:
            steps = [] if isinstance(given, (str, bytes)) else list(given)
        except TypeError:
            steps = []
        if not steps:
            raise ValueError(f"denoising_step_list must be a non-empty list of timesteps in (0, 1000], got {given!r}")
        values = tuple(finite_number(f"denoising_step_list[{i}]", t, low=0.0, high=1000.0, low_open=True)
                       for i, t in enumerate(steps))
        for i in range(1, len(values)):
            if values[i] >= values[i - 1]:
                raise ValueError(f"denoising_step_list must be strictly decreasing: denoising_step_list[{i}]="
                                 f"{steps[i]!r} follows {steps[i - 1]!r} in {steps!r}")
        if self.num_inference_steps != len(values):
            raise ValueError(f"num_inference_steps={self.num_inference_steps} but denoising_step_list has "
                             f"{len(values)} timesteps {steps!r}; pass num_inference_steps={len(values)}")
        if self.sampler != "euler":
            raise ValueError(f"denoising_step_list needs sampler='euler', got sampler={self.sampler!r}")
        if self.denoising_strength != 1.0:
            raise ValueError(f"denoising_step_list starts from pure noise; it does not combine with "
                             f"denoising_strength={self.denoising_strength}")
        self.denoising_step_list = values

    def _round_shape(self, spatial: int, temporal: int) -> None:
        """Sizes the VAE and the DiT's patches divide exactly, rounded up with a warning."""
        for name, multiple, remainder, what in (("height", spatial, 0, f"a multiple of {spatial}"),
                                                ("width", spatial, 0, f"a multiple of {spatial}"),
                                                ("num_frames", temporal, 1, f"of the form {temporal}k+1")):
            value = getattr(self, name)
            rounded = round_up(value, multiple, remainder)
            if rounded != value:
                logger.warning("%s=%d is not %s; rounded up to %d", name, value, what, rounded)
                setattr(self, name, rounded)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // 4 + 1

    @property
    def uses_cfg(self) -> bool:
        """Whether any step runs the negative branch (an expert pair: either guidance scale)."""
        return self.cfg_scale != 1.0 or (self.cfg_scale_2 is not None and self.cfg_scale_2 != 1.0)


def finite_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """``value`` as a float, which must be a real, finite number within ``[low, high]`` (``(low`` with
    ``low_open``); otherwise ``ValueError`` naming ``name`` and the value (a NaN or inf guidance scale
    would otherwise make an all-black video)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lower, upper = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
        bounds = f"{'(' if low_open else '['}{lower}, {upper}]"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return float(value)


ProgressBar = Callable[[Any], Any]
