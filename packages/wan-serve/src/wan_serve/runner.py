"""The one place a job becomes a ``WanVideoPipeline`` call and an mp4.

:func:`pipeline_kwargs` is the call's arguments (the load benchmark's baseline makes the same call in
a plain loop); :func:`run_job` adds the job's LoRAs, progress, cancellation and the mp4 encoding.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from PIL import Image
    from wan_runtime import WanVideoPipeline

logger = logging.getLogger(__name__)

MP4_QUALITY = 8


class JobStopped(Exception):
    """Raised from the step callback when the job must stop (cancelled, or its lease lost)."""


def pipeline_kwargs(params: dict[str, Any], image: "Image.Image | None" = None) -> dict[str, Any]:
    """Keyword arguments of ``pipe(**kwargs)`` for a job's resolved ``params`` (service.resolve_params)."""
    kwargs = dict(prompt=params["prompt"], negative_prompt=params.get("negative_prompt", ""), seed=params["seed"],
                  height=params["height"], width=params["width"], num_frames=params["num_frames"],
                  num_inference_steps=params["num_inference_steps"], cfg_scale=params["cfg_scale"],
                  sigma_shift=params["sigma_shift"], sampler=params["sampler"], progress_bar_cmd=lambda x: x)
    for name in ("cfg_scale_2", "switch_DiT_boundary"):
        if params.get(name) is not None:
            kwargs[name] = params[name]
    if image is not None:
        kwargs["input_image"] = image
    return kwargs


@contextmanager
def merged_loras(pipe: "WanVideoPipeline", loras: Sequence[tuple[Path, float]]) -> Iterator[None]:
    """Merge the job's LoRAs into every loaded DiT for the duration of the job, and subtract them after
    (even when the job fails or is cancelled), so the next job sees the base weights."""
    merges = []
    try:
        for path, strength in loras:
            for dit in pipe.dits:
                merges.append(pipe.load_lora(dit, path, alpha=strength))
        yield
    finally:
        for merge in reversed(merges):
            pipe.unload_lora(merge)


def encode_mp4(frames: Sequence["Image.Image"], fps: int) -> bytes:
    """The frames as mp4 bytes (written to a temporary file: the encoder needs a seekable file)."""
    from wan_runtime.video_io import save_video

    with tempfile.TemporaryDirectory(prefix="wan-serve-") as folder:
        path = Path(folder) / "video.mp4"
        save_video(frames, path, fps=fps, quality=MP4_QUALITY)
        return path.read_bytes()


def run_job(pipe: "WanVideoPipeline", params: dict[str, Any], image: "Image.Image | None" = None,
            loras: Sequence[tuple[Path, float]] = (),
            progress_cb: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            step_seconds: Callable[[float], None] | None = None) -> bytes:
    """Generate the job's video and return it as mp4 bytes.

    ``progress_cb(done_steps, total_steps)`` and ``step_seconds(seconds)`` follow each denoising step;
    ``should_stop()`` is asked after each step, and true raises :class:`JobStopped` there.
    """
    total = int(params["num_inference_steps"])
    last = [time.perf_counter()]

    def on_step(step: int, _t: Any, _latents: Any) -> None:
        now = time.perf_counter()
        if step_seconds is not None:
            step_seconds(now - last[0])
        last[0] = now
        if progress_cb is not None:
            progress_cb(step + 1, total)
        if should_stop is not None and should_stop():
            raise JobStopped()

    with merged_loras(pipe, loras):
        frames = pipe(**pipeline_kwargs(params, image), step_callback=on_step)
    return encode_mp4(frames, int(params["fps"]))
