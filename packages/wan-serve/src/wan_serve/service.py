"""What the API and the page share: the served models, request validation, submission, the video object.

Every check runs here, before anything is stored, and fails with an :class:`ApiError` naming the
parameter: unknown model or parameter, bad numbers, caps on size, frames and steps, LoRA names, the
uploaded image. What a request leaves out comes from the model's registry settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wan_models.configs import DIFFSYNTH_SAMPLING
from wan_runtime.defaults import sampling_arguments
from wan_runtime.request import round_up  # the pipeline's rounding rule
from wan_runtime.schedulers import SCHEDULERS

from .config import ServeConfig
from .store import Job, JobStore

if TYPE_CHECKING:
    from PIL import Image

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
LORA_SUFFIXES = (".safetensors",)
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAMPLERS = tuple(SCHEDULERS)
MAX_SEED = 2 ** 63 - 1
MAX_PROMPT = 20_000  # characters; the text encoder reads far fewer tokens
# Parameters a request may carry; the first five are OpenAI's (input_reference is the upload).
PARAMS = ("model", "prompt", "seconds", "size", "input_reference", "negative_prompt", "seed", "num_frames",
          "num_inference_steps", "cfg_scale", "cfg_scale_2", "sampler", "sigma_shift", "loras")


class ApiError(Exception):
    """An error the API returns as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """One served model: its API id, what loads it, its defaults (request argument names plus ``fps``),
    the size and frame rules its networks impose, whether it takes an input image, and for Wan 2.2 image
    models how a size left out follows the image (``image_fit``: "area" or "closest", wan_runtime.defaults)."""

    name: str
    source: str
    defaults: dict[str, Any]
    spatial_multiple: int = 16
    temporal_multiple: int = 4
    takes_image: bool = False
    image_fit: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def fps(self) -> int:
        return int(self.defaults["fps"])


def _sampling_defaults(sampling: Any) -> dict[str, Any]:
    """A registry ``Sampling`` as request defaults plus its ``fps`` (an expert pair: cfg_scale high-noise,
    cfg_scale_2 low)."""
    return {**sampling_arguments(sampling), "fps": sampling.fps}


FALLBACK = _sampling_defaults(DIFFSYNTH_SAMPLING)  # a folder no registry entry matches (as `wan generate`)


def _image_dit(config: Any) -> bool:
    return bool(getattr(config, "image_input", False) or getattr(config, "conditioning", None) == "image"
                or getattr(config, "fuses_image_latents", False))


def _image_fit(config: Any) -> str | None:
    """A Wan 2.2 image model's rule for the size of a request that gives an image and no size."""
    if getattr(config, "family", None) != "wan2.2" or not _image_dit(config):
        return None
    return "closest" if config.fuses_image_latents else "area"


def describe_model(model: str) -> ServedModel:
    """A ``--model`` value (registry name, model folder, or "" / "tiny-shapes" for the embedded model) as
    a :class:`ServedModel`; an unknown name is a ValueError listing the known ones."""
    import wan_models
    from wan_models.configs import DIT_FILES, VAE22_FILE
    from wan_models.loading import read_checkpoint
    from wan_runtime.assets import DEFAULT_MODEL_NAME, DEFAULT_MODEL_SETTINGS, default_model_dir
    from wan_runtime.sources import folder_dit_files, folder_entry, unknown_model

    if model in ("", DEFAULT_MODEL_NAME):
        tiny = DEFAULT_MODEL_SETTINGS  # over the fallback, as `wan generate` takes them
        defaults = dict(FALLBACK, height=tiny["height"], width=tiny["width"], num_frames=tiny["frames"],
                        num_inference_steps=tiny["steps"], cfg_scale=tiny["cfg_scale"])
        return ServedModel(DEFAULT_MODEL_NAME, str(default_model_dir()), defaults)
    folder = Path(model).expanduser()
    if folder.is_dir():
        files = folder_dit_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder} holds no DiT ({DIT_FILES}); is it a Wan model folder?")
        config = read_checkpoint(files, network="dit").config
        entry, _ = folder_entry(folder, config)
        sampling = wan_models.MODELS[entry].sampling if entry is not None else None
        vae22 = (folder / VAE22_FILE).exists()
        defaults = _sampling_defaults(sampling) if sampling is not None else dict(FALLBACK)
        return ServedModel(folder.resolve().name, str(folder.resolve()), defaults, 32 if vae22 else 16, 4,
                           _image_dit(config), _image_fit(config))
    if model in wan_models.MODELS:
        spec = wan_models.MODELS[model]
        base = wan_models.MODELS[spec.base_model] if spec.base_model else spec
        sampling = spec.sampling or base.sampling
        defaults = _sampling_defaults(sampling) if sampling is not None else dict(FALLBACK)
        vae22 = base.vae_file == VAE22_FILE
        return ServedModel(model, model, defaults, 32 if vae22 else 16, 4, _image_dit(base.config),
                           _image_fit(base.config))
    raise unknown_model(model)


class ModelCatalog:
    """The models a server offers, by API id (no names: the embedded tiny model)."""

    def __init__(self, models: list[str] | tuple[str, ...] = ()) -> None:
        self.models: dict[str, ServedModel] = {}
        for model in models or [""]:
            served = describe_model(model)
            if served.name in self.models:
                raise ValueError(f"two models are named {served.name!r}; serve folders of different names")
            self.models[served.name] = served

    def names(self) -> list[str]:
        return list(self.models)

    def spec(self, name: str) -> ServedModel:
        """The served model ``name``; a 400 ApiError listing the served ones when there is none."""
        try:
            return self.models[name]
        except KeyError:
            raise ApiError(400, f"model {name!r} is not served here; served models: {', '.join(self.models)}",
                           "model", "model_not_found") from None


# -- parsing ---------------------------------------------------------------------------------------

def _number(params: dict[str, Any], name: str, kind: type, low: float | None = None) -> Any:
    """``params[name]`` as an int or a finite float (multipart sends text), or None when absent."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(400, f"{name} must be a number, got {value!r}", name, "invalid_value")
    try:
        number = kind(value) if not isinstance(value, str) else kind(value.strip())
        if kind is int and isinstance(value, float) and value != int(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        expected = "an integer" if kind is int else "a number"
        raise ApiError(400, f"{name} must be {expected}, got {value!r}", name, "invalid_value") from None
    if kind is float and not math.isfinite(number):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", name, "invalid_value")
    if low is not None and number < low:
        raise ApiError(400, f"{name} must be >= {low:g}, got {value!r}", name, "invalid_value")
    return number


def _text(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, got {type(value).__name__} {value!r}", name, "invalid_value")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` as (width, height); a 400 naming ``size`` otherwise."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '832x480', got {text!r}", "size",
                       "invalid_value")
    return int(match[1]), int(match[2])


def seconds_to_frames(seconds: float, fps: int, temporal_multiple: int = 4) -> int:
    """Frames for ``seconds`` at ``fps``, rounded up to the frame rule ``multiple * k + 1``."""
    return round_up(max(1, round(seconds * fps)), temporal_multiple, 1)


def format_seconds(frames: int, fps: int) -> str:
    """The duration ``frames`` play for at ``fps``, as the API's seconds string (e.g. "1.13")."""
    return f"{round(frames / fps, 2):g}"


def lora_files(lora_dir: Path) -> dict[str, Path]:
    """The LoRA files of ``lora_dir`` by file name (the names jobs store), from a listing, never a joined path."""
    return {p.name: p for p in sorted(lora_dir.glob("*")) if p.suffix in LORA_SUFFIXES and p.is_file()}


def parse_loras(value: Any, lora_dir: Path) -> list[list[Any]]:
    """``loras`` as ``[[name, strength], ...]``: names of files in ``lora_dir`` (``name`` or ``name.safetensors``),
    given as "a,b:0.8", a list of such strings, or a list of {"name", "strength"}. A name is looked up
    among the folder's files, never joined to a path."""
    if value is None or value == "" or value == []:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ApiError(400, f"loras must be a list of names, got {value!r}", "loras", "invalid_value")
    available = lora_files(lora_dir)
    available.update({p.stem: p for p in list(available.values())})
    out = []
    for item in items:
        if isinstance(item, dict):
            name, strength = item.get("name"), item.get("strength", 1.0)
        elif isinstance(item, str):
            name, _, strength = item.strip().partition(":")
            strength = strength or 1.0
        else:
            raise ApiError(400, f"loras entries are names or {{'name', 'strength'}}, got {item!r}", "loras",
                           "invalid_value")
        if not isinstance(name, str) or not LORA_NAME.match(name):
            raise ApiError(400, f"LoRA name {name!r} is not a plain file name (letters, digits, '.', '_', '-')",
                           "loras", "invalid_value")
        if name not in available:
            known = ", ".join(sorted({p.stem for p in available.values()})) or "none"
            raise ApiError(400, f"no LoRA named {name!r} in the server's LoRA folder; available: {known}", "loras",
                           "lora_not_found")
        try:
            strength = _number({"strength": strength}, "strength", float)
        except ApiError as e:
            raise ApiError(400, f"LoRA {name!r}: {e.message}", "loras", "invalid_value") from None
        out.append([available[name].name, strength])
    return out


def check_image(data: bytes, max_bytes: int, max_pixels: int) -> "Image.Image":
    """The uploaded image, decoded: 413 when larger than ``max_bytes``, 415 when not PNG/JPEG/WEBP (by its
    content, not its name), 400 when it does not decode or has more than ``max_pixels`` x 4 pixels."""
    from PIL import Image

    if len(data) > max_bytes:
        raise ApiError(413, f"input_reference is {len(data)} bytes; the limit is {max_bytes}", "input_reference",
                       "file_too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.UnidentifiedImageError:
            raise ApiError(415, f"input_reference must be a {', '.join(IMAGE_FORMATS)} image; its bytes are none of "
                           "them", "input_reference", "unsupported_media_type") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, ValueError) as e:
            raise ApiError(400, f"input_reference could not be read: {e}", "input_reference", "invalid_image") from None
        if image.width * image.height > 4 * max_pixels:
            raise ApiError(400, f"input_reference is {image.width}x{image.height}, more than 4 x the max_pixels cap "
                           f"{max_pixels}", "input_reference", "invalid_image")
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, ValueError,
                SyntaxError) as e:
            raise ApiError(400, f"input_reference is a damaged {image.format} image: {e}", "input_reference",
                           "invalid_image") from None
    return image  # the worker converts it (wan_runtime.images.to_rgb)


# -- submitting ------------------------------------------------------------------------------------

def resolve_params(catalog: ModelCatalog, config: ServeConfig, params: dict[str, Any],
                   image_size: tuple[int, int] | None = None) -> tuple[ServedModel, dict[str, Any]]:
    """The model and the full generation settings of a request: given values checked, missing ones from
    the model's defaults, sizes rounded as the pipeline will round them, caps applied. ``image_size``
    (width, height) is the uploaded image's: a Wan 2.2 image model without a size follows its aspect."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; accepted: {', '.join(PARAMS)}", unknown[0],
                       "unknown_parameter")
    model_name = _text(params, "model")
    model = catalog.spec(model_name) if model_name else catalog.spec(catalog.names()[0])
    d = model.defaults
    prompt = _text(params, "prompt")
    if prompt is None:
        raise ApiError(400, "prompt is required (what the video shows)", "prompt", "missing_required_parameter")
    if len(prompt) > MAX_PROMPT:
        raise ApiError(400, f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT}", "prompt", "above_cap")
    if image_size is not None and not model.takes_image:
        raise ApiError(400, f"model {model.name} generates from text only; it takes no input_reference",
                       "input_reference", "unsupported_input")
    size = _text(params, "size")
    width, height = parse_size(size) if size else (d["width"], d["height"])
    if not size and image_size is not None and model.image_fit is not None:
        from wan_runtime.defaults import fit_area, fit_area_closest_ratio

        fit = fit_area_closest_ratio if model.image_fit == "closest" else fit_area
        width, height = fit(*image_size, width * height, model.spatial_multiple)
    width, height = round_up(width, model.spatial_multiple), round_up(height, model.spatial_multiple)
    if width * height > config.max_pixels:
        raise ApiError(400, f"size {width}x{height} is {width * height} pixels, above the server's cap max_pixels="
                       f"{config.max_pixels}", "size", "above_cap")
    frames = _number(params, "num_frames", int, 1)
    seconds = _number(params, "seconds", float)
    if seconds is not None and seconds <= 0:
        raise ApiError(400, f"seconds must be > 0, got {params['seconds']!r}", "seconds", "invalid_value")
    if frames is None:
        frames = seconds_to_frames(seconds, model.fps, model.temporal_multiple) if seconds else d["num_frames"]
    frames = round_up(frames, model.temporal_multiple, 1)
    if frames > config.max_frames:
        which = ("num_frames" if params.get("num_frames") not in (None, "") else "seconds" if seconds
                 else None)
        asked = f"asked for ({which})" if which else f"by default for {model.name}; pass num_frames or seconds"
        raise ApiError(400, f"{frames} frames {asked}, above the server's cap max_frames={config.max_frames} "
                       f"({config.max_frames / model.fps:.1f} s at {model.fps} fps)", which or "num_frames",
                       "above_cap")
    steps = _number(params, "num_inference_steps", int, 1) or d["num_inference_steps"]
    if steps > config.max_steps:
        raise ApiError(400, f"num_inference_steps {steps} is above the server's cap max_steps={config.max_steps}",
                       "num_inference_steps", "above_cap")
    sampler = _text(params, "sampler") or d["sampler"]
    if sampler not in SAMPLERS:
        raise ApiError(400, f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}", "sampler", "invalid_value")
    shift = _number(params, "sigma_shift", float)
    if shift is not None and shift <= 0:
        raise ApiError(400, f"sigma_shift must be > 0, got {params['sigma_shift']!r}", "sigma_shift", "invalid_value")
    seed = _number(params, "seed", int, 0)
    if seed is not None and seed > MAX_SEED:
        raise ApiError(400, f"seed must be at most {MAX_SEED}, got {seed}", "seed", "invalid_value")
    cfg = _number(params, "cfg_scale", float, 0)
    cfg2 = _number(params, "cfg_scale_2", float, 0)
    resolved = dict(
        prompt=prompt, negative_prompt=_text(params, "negative_prompt") or "", width=width, height=height,
        num_frames=frames, fps=model.fps, num_inference_steps=steps, sampler=sampler,
        sigma_shift=shift if shift is not None else d["sigma_shift"],
        seed=seed if seed is not None else secrets.randbelow(2 ** 31),
        cfg_scale=cfg if cfg is not None else d["cfg_scale"],
        # one cfg_scale given serves both experts of a pair, as in `wan generate`
        cfg_scale_2=cfg2 if cfg2 is not None else (cfg if cfg is not None else d.get("cfg_scale_2")),
        switch_DiT_boundary=d.get("switch_DiT_boundary"),
        loras=parse_loras(params.get("loras"), config.resolved_lora_dir()))
    return model, resolved


def request_hash(params: dict[str, Any], image: bytes | None) -> str:
    """A digest of a request's body (its parameters and image), to tell an idempotent retry from a reuse."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    digest.update(hashlib.sha256(image or b"").digest())
    return digest.hexdigest()


def submit(store: JobStore, catalog: ModelCatalog, config: ServeConfig, params: dict[str, Any],
           image: bytes | None, idempotency_key: str | None = None) -> Job:
    """Validate a request and queue its job (committed before returning). A repeated ``idempotency_key``
    returns the job it created; reused with a different body it is a 409."""
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 255:
        raise ApiError(400, "Idempotency-Key must be 1 to 255 characters", "Idempotency-Key", "invalid_value")
    digest = request_hash(params, image)
    if idempotency_key is not None:
        earlier = store.by_idempotency_key(idempotency_key)
        if earlier is not None:
            return _same_request(earlier, digest)
    size = check_image(image, config.max_upload_bytes, config.max_pixels).size if image is not None else None
    model, resolved = resolve_params(catalog, config, params, size)
    fields = dict(model=model.name, prompt=resolved["prompt"], params=resolved,
                  size=f"{resolved['width']}x{resolved['height']}",
                  seconds=format_seconds(resolved["num_frames"], model.fps), num_frames=resolved["num_frames"],
                  request_hash=digest)
    job = store.create(fields, idempotency_key, inputs={"input_reference": image} if image is not None else None)
    return _same_request(job, digest)


def _same_request(job: Job, digest: str) -> Job:
    if job.request_hash is not None and job.request_hash != digest:
        raise ApiError(409, f"Idempotency-Key was already used for job {job.id} with a different request body",
                       "Idempotency-Key", "idempotency_key_reused")
    return job


def video_object(store: JobStore, job: Job) -> dict[str, Any]:
    """The OpenAI-shaped video object of ``job`` (plus our ``num_frames`` and ``queue_position``)."""
    return {
        "id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
        "created_at": job.created_at, "completed_at": job.completed_at, "expires_at": job.expires_at,
        "size": job.size, "seconds": job.seconds, "prompt": job.prompt, "error": job.error,
        "remixed_from_video_id": None, "num_frames": job.num_frames, "queue_position": store.queue_position(job),
    }
