"""The arguments a caller leaves out, for a Wan 2.2 pipeline: its registry entry's official settings.

Wan 2.1 pipelines keep the seed's (DiffSynth's) defaults, those of :class:`GenerationRequest`. A
Wan 2.2 pipeline is matched to its registry entry by its DiT's declared variant and by whether it
holds an expert pair; then steps, shift, sampler, frames, size, guidance (a pair: ``cfg_scale`` for
the high-noise expert and ``cfg_scale_2`` for the low-noise one, as diffusers' ``guidance_scale`` /
``guidance_scale_2``) and the expert boundary come from ``MODELS[name].sampling``. With an
``input_image`` and no size, the size follows the image's aspect ratio within the default size's
area, by the rule of the official code for that model.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Mapping

from wan_models import MODELS, ModelSpec

if TYPE_CHECKING:
    from wan_models.configs import Sampling

    from .pipeline import WanVideoPipeline

logger = logging.getLogger(__name__)


def registry_entry(pipe: WanVideoPipeline) -> ModelSpec | None:
    """The Wan 2.2 registry entry the loaded DiT(s) are (``None`` for Wan 2.1 or no match)."""
    if pipe.dit is None or pipe.dit.config.family != "wan2.2":
        return None
    pair = pipe.dit2 is not None
    found = [spec for spec in MODELS.values() if spec.family == "wan2.2" and spec.sampling is not None
             and spec.config.variant == pipe.dit.config.variant and bool(spec.experts) == pair]
    return found[0] if len(found) == 1 else None


def fit_area(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """``(width, height)`` of the image's aspect ratio with about ``area`` pixels, each side rounded
    down to ``multiple`` (the A14B image-to-video rule: sides from sqrt(area * ratio))."""
    ratio = height / width
    return (multiple * int(math.sqrt(area / ratio) // multiple), multiple * int(math.sqrt(area * ratio) // multiple))


def fit_area_closest_ratio(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """``(width, height)``, multiples of ``multiple`` within ``area`` pixels, whose ratio is closest to the
    image's: round the width down first or the height down first, keep the better (the TI2V rule)."""
    ratio = width / height
    exact_w = math.sqrt(area * ratio)
    w1 = int(exact_w // multiple * multiple)
    h1 = int(area / w1 // multiple * multiple)
    h2 = int(area / exact_w // multiple * multiple)
    w2 = int(area / h2 // multiple * multiple)

    def off(w: int, h: int) -> float:
        return max(ratio / (w / h), (w / h) / ratio)

    return (w1, h1) if off(w1, h1) < off(w2, h2) else (w2, h2)


def sampling_arguments(sampling: Sampling) -> dict[str, Any]:
    """A registry ``Sampling`` as request arguments: its first size and sampler; an expert pair's
    (low-noise, high-noise) guidance as ``cfg_scale`` (high) and ``cfg_scale_2`` (low), and its boundary
    as ``switch_DiT_boundary``. Shared by the pipeline, `wan generate` and wan-serve."""
    height, width = sampling.sizes[0]
    out: dict[str, Any] = dict(num_inference_steps=sampling.steps, sigma_shift=sampling.shift,
                               sampler=sampling.default_sampler, num_frames=sampling.frames)
    if isinstance(sampling.guidance, tuple):
        out["cfg_scale_2"], out["cfg_scale"] = sampling.guidance
        out["switch_DiT_boundary"] = sampling.boundary
    else:
        out["cfg_scale"] = sampling.guidance
    out.update(height=height, width=width)
    return out


def model_defaults(pipe: WanVideoPipeline, given: Mapping[str, Any]) -> dict[str, Any]:
    """Request arguments for what ``given`` (the caller's keyword arguments) leaves out; empty for a
    Wan 2.1 pipeline. Logs which entry the settings came from."""
    spec = registry_entry(pipe)
    if spec is None:
        return {}
    sampling = spec.sampling
    out = sampling_arguments(sampling)
    if "cfg_scale" in given or out.get("cfg_scale_2") == out["cfg_scale"]:  # a caller's cfg_scale serves both
        out.pop("cfg_scale_2", None)
    image = given.get("input_image")
    if image is not None and "height" not in given and "width" not in given:
        fit = fit_area_closest_ratio if pipe.dit.config.fuses_image_latents else fit_area
        out["width"], out["height"] = fit(image.width, image.height, out["height"] * out["width"],
                                          pipe.shape_multiples[0])
    taken = {key: value for key, value in out.items() if key not in given}
    if taken:
        logger.info("settings from the registry entry %s: %s", spec.name,
                    ", ".join(f"{key}={value}" for key, value in taken.items()))
    return taken
