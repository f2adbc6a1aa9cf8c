"""``wan serve`` (the HTTP video API, page and workers) and ``wan worker`` (a worker for a shared store)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .options import DTYPES, torch_dtype

MODEL_HELP = "Registry name (see `wan models`) or model folder; repeatable (default: the embedded tiny model)."


def _config(**values):
    """A ServeConfig from the flags; a bad value is a usage error naming it."""
    from wan_serve.config import ServeConfig

    try:
        return ServeConfig(**values)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _log_info() -> None:
    """wan-serve's INFO lines (the ready line, jobs, loads) on stderr beside the warnings."""
    logging.getLogger("wan_serve").setLevel(logging.INFO)


def _dtype(value: Optional[str]) -> Optional[str]:
    if value is not None:
        torch_dtype(value)  # the check (and message) of every command's --dtype
    return value


def serve(
    model: list[str] = typer.Option([], "--model", "-m", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback needs --token "
                             "(or --insecure)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="WAN_API_TOKEN",
                                        help="Bearer token every request must send (env WAN_API_TOKEN)."),
    state_dir: Path = typer.Option(Path("wan-serve"), "--state-dir", help="Job store and LoRA folder."),
    db: Optional[str] = typer.Option(None, "--db", help="Store URL, e.g. postgresql://user@host/db "
                                     "(default: sqlite in --state-dir)."),
    workers: int = typer.Option(1, "--workers", min=0, help="Worker threads (one per GPU; 0: API only)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without a token."),
    lease_seconds: float = typer.Option(60.0, "--lease-seconds", min=0.1,
                                        help="A job whose worker is silent this long is re-queued."),
    retention_hours: float = typer.Option(24.0, "--retention-hours", min=0.001,
                                          help="Finished videos are removed this long after completion."),
    max_frames: int = typer.Option(161, "--max-frames", min=1, help="Cap on frames per request."),
    max_steps: int = typer.Option(100, "--max-steps", min=1, help="Cap on denoising steps per request."),
    max_pixels: int = typer.Option(1280 * 720, "--max-pixels", min=1, help="Cap on width x height per request."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001, help="Cap on an uploaded image."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Origin allowed by CORS; repeatable "
                                          "(default: CORS off)."),
    lora_dir: Optional[Path] = typer.Option(None, "--lora-dir", help="LoRA files requests may name "
                                            "(default: STATE_DIR/loras)."),
    models_dir: Path = typer.Option(Path("models"), "--models-dir", help="Where registry models are stored."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu, ... (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=f"One of {', '.join(DTYPES)} (default: bfloat16 on "
                                        "CUDA, float32 on CPU)."),
) -> None:
    """Serve the models over an OpenAI-shaped video API (/v1/videos), a web page at / and /metrics."""
    from wan_serve.server import serve as run

    config = _config(models=model, host=host, port=port, token=token, state_dir=str(state_dir), db_url=db,
                     workers=workers, insecure=insecure, lease_seconds=lease_seconds,
                     retention_seconds=max(1, int(retention_hours * 3600)), max_frames=max_frames,
                     max_steps=max_steps, max_pixels=max_pixels, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                     cors_origins=tuple(cors_origin), lora_dir=str(lora_dir) if lora_dir else None,
                     models_dir=str(models_dir), device=device, dtype=_dtype(dtype))
    try:
        config.check_bind()
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--host") from None
    _log_info()
    run(config)


def worker(
    db: str = typer.Option(..., "--db", help="The server's store URL (postgresql://... or sqlite:///...)."),
    model: list[str] = typer.Option([], "--model", "-m", help=MODEL_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu, ... (default: cuda if present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=f"One of {', '.join(DTYPES)}."),
    lease_seconds: float = typer.Option(60.0, "--lease-seconds", min=0.1, help="Lease renewed every third of it."),
    worker_id: Optional[str] = typer.Option(None, "--worker-id", help="Name in the store and logs "
                                            "(default: host-pid-n)."),
    lora_dir: Optional[Path] = typer.Option(None, "--lora-dir", help="The LoRA folder (same files as the server's)."),
    models_dir: Path = typer.Option(Path("models"), "--models-dir", help="Where registry models are stored."),
) -> None:
    """Run jobs from a shared store: one worker per GPU, on any machine that reaches the database."""
    from wan_serve.server import work

    config = _config(models=model, db_url=db, device=device, dtype=_dtype(dtype), lease_seconds=lease_seconds,
                     lora_dir=str(lora_dir) if lora_dir else None, models_dir=str(models_dir))
    _log_info()
    work(config, worker_id)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
