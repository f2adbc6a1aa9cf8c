"""The web page of ``wan serve`` at "/": a Gradio Blocks app mounted on the API's FastAPI app.

A person types a prompt, picks the model (one of those served), size, frames, seed and steps, optionally
drops a start image and presses Generate. The page submits through :func:`wan_serve.service.submit`
in-process (the same validation and caps as ``POST /v1/videos``, no HTTP to itself), then polls the store:
the queue position and a progress bar while the job waits and runs, then the video to play and download.
The table of recent jobs lists every job in the store (the API's too); selecting a row shows that job.

Access: without a token the page is as open as the API (loopback by default). With a token (``--token`` or
``$WAN_API_TOKEN``) the page asks for it: Gradio's login form, any user name, the token as the password
(compared in constant time); every Gradio route (config, queue, files) refuses requests without the login
cookie. Gradio runs offline: no analytics or version check, client-side rendering, the theme's bundled
fonts, no run history.
"""

from __future__ import annotations

import os

# Before gradio is imported: its telemetry and version check read this (no network from the server).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import hmac
import logging
import re
import shutil
import tempfile
import time
import weakref
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
from fastapi import FastAPI
from starlette.routing import Match, Mount
from starlette.types import Scope

from wan_runtime.files import atomic_path

from .config import ServeConfig
from .service import ApiError, ModelCatalog, submit
from .store import Job, JobStore

logger = logging.getLogger(__name__)

JOB_COLUMNS = ["id", "status", "model", "prompt", "size", "frames", "created (UTC)"]
RECENT_JOBS = 50
PAGE_CSS = "#job-status progress { width: 100%; }"
API_PATHS = ("/v1", "/healthz", "/metrics")  # left to the API, whose 404/405 errors have the OpenAI shape
JOB_ID = re.compile(r"video_[0-9a-f]{24}")  # the store's id form; anything else never names a file


class _Page:
    """The page's handlers: they read and write the store in-process and keep mp4 copies for Gradio."""

    def __init__(self, store: JobStore, catalog: ModelCatalog, config: ServeConfig,
                 on_submit: Callable[[Job], None] | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.config = config
        self.on_submit = on_submit
        # gr.Video plays files; the store's videos are copied here once per job (under the temp folder,
        # which Gradio may serve from) and removed with the page.
        self.video_dir = Path(tempfile.mkdtemp(prefix="wan-serve-page-"))
        weakref.finalize(self, shutil.rmtree, self.video_dir, True)

    # -- the form ----------------------------------------------------------------------------------

    def defaults(self, model: str) -> tuple[Any, Any, Any, Any]:
        """Form updates (size, frames, steps, image input) for ``model``: its defaults, whether it takes an image."""
        spec = self.catalog.spec(model)
        d = spec.defaults
        return (gr.update(value=f"{d['width']}x{d['height']}"), gr.update(value=d["num_frames"]),
                gr.update(value=d["num_inference_steps"]), gr.update(visible=spec.takes_image, value=None))

    def generate(self, model: str, prompt: str, size: str, frames: float | None, seed: float | None,
                 steps: float | None, image: str | None) -> Iterator[tuple[str, Any, list[list[str]]]]:
        """Submit a job, then follow it: (status, video, recent jobs) until it finishes."""
        params: dict[str, Any] = {"model": model, "prompt": prompt or ""}
        if size and size.strip():
            params["size"] = size.strip()
        for key, value in (("num_frames", frames), ("num_inference_steps", steps)):
            if value is not None:
                params[key] = int(value)
        if seed is not None and seed >= 0:  # -1 (or empty): the service draws one
            params["seed"] = int(seed)
        image_bytes = Path(image).read_bytes() if image else None
        try:
            job = submit(self.store, self.catalog, self.config, params, image_bytes)
        except ApiError as error:
            raise gr.Error(error.message) from None
        if self.on_submit is not None:
            self.on_submit(job)
        logger.info("page: submitted %s (%s)", job.id, job.model)
        shown = self.describe(job)
        yield shown, None, self.recent()
        while True:
            time.sleep(self.config.poll_seconds)
            current = self.store.get(job.id)
            if current is None:
                yield _status(job, "deleted"), None, self.recent()
                return
            if not current.active:
                yield self.describe(current), self.video_file(current), self.recent()
                return
            now = self.describe(current)
            if now != shown:  # queue position or progress moved
                shown = now
                yield shown, gr.skip(), gr.skip()

    # -- past jobs ---------------------------------------------------------------------------------

    def recent(self) -> list[list[str]]:
        """Rows of the recent-jobs table, newest first."""
        found, _ = self.store.list(limit=RECENT_JOBS, order="desc")
        return [[job.id, job.status, job.model, job.prompt, job.size, str(job.num_frames),
                 datetime.fromtimestamp(job.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")]
                for job in found]

    def select(self, event: gr.SelectData) -> tuple[str, str | None]:
        """Show the job of the selected table row: its status, and its video when it has one."""
        row = event.row_value or []
        job = self.store.get(str(row[0])) if row else None
        if job is None:
            return "<p>That job no longer exists.</p>", None
        return self.describe(job), self.video_file(job)

    # -- helpers -----------------------------------------------------------------------------------

    def describe(self, job: Job) -> str:
        """HTML for where ``job`` stands: its queue position, a progress bar while it runs, or how it ended."""
        if job.status == "queued":
            position = self.store.queue_position(job)
            return _status(job, f"queued, position {position} in the queue", 0)
        if job.status == "in_progress":
            return _status(job, f"generating, {job.progress}%", job.progress)
        if job.status == "completed":
            took = (job.completed_at or job.created_at) - job.created_at
            return _status(job, f"completed, {took} s after it was submitted")
        if job.status == "cancelled" or job.cancel_requested:
            return _status(job, "cancelled")
        error = job.error or {}
        return _status(job, f"{job.status}: {error.get('message', 'no reason given')}")

    def video_file(self, job: Job) -> str | None:
        """A local mp4 of ``job``'s video for gr.Video (None when it has none, e.g. expired)."""
        if job.status != "completed" or not JOB_ID.fullmatch(job.id):
            return None
        path = self.video_dir / f"{job.id}.mp4"
        if not path.exists():
            data = self.store.get_blob(job.id, "video")
            if data is None:
                return None
            self._drop_old_files()
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(data)
        return str(path)

    def _drop_old_files(self) -> None:
        """Remove copies older than the retention period (their jobs' results have expired)."""
        cutoff = time.time() - self.config.retention_seconds
        for old in self.video_dir.glob("*.mp4"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)


def _status(job: Job, text: str, progress: int | None = None) -> str:
    """The status box: the job id, its settings, ``text``, and a progress bar when ``progress`` is given."""
    line = (f'<p><code class="job-id">{escape(job.id)}</code> ({escape(job.model)}, {escape(job.size)}, '
            f'{job.num_frames} frames): <span class="job-state">{escape(text)}</span></p>')
    if progress is None:
        return line
    return line + f'<progress class="job-progress" max="100" value="{int(progress)}"></progress>'


def build_page(store: JobStore, catalog: ModelCatalog, config: ServeConfig,
               on_submit: Callable[[Job], None] | None = None) -> gr.Blocks:
    """The Blocks of the page (not mounted; :func:`mount_page` mounts it); ``on_submit(job)`` runs after each
    job the page queues."""
    page = _Page(store, catalog, config, on_submit)
    names = catalog.names()
    first = catalog.spec(names[0])
    d = first.defaults
    with gr.Blocks(title="wan serve", analytics_enabled=False,
                   delete_cache=(3600, config.retention_seconds)) as blocks:
        gr.Markdown("## wan serve\nDescribe a video, press Generate, then play or download it.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                    placeholder="a red circle moving left on a white background")
                with gr.Row():
                    model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model")
                    size = gr.Textbox(value=f"{d['width']}x{d['height']}", label="Size (WxH)", elem_id="size")
                with gr.Row():
                    frames = gr.Number(value=d["num_frames"], label="Frames", precision=0, minimum=1,
                                       maximum=config.max_frames, elem_id="frames")
                    steps = gr.Number(value=d["num_inference_steps"], label="Steps", precision=0, minimum=1,
                                      maximum=config.max_steps, elem_id="steps")
                    seed = gr.Number(value=-1, label="Seed (-1: random)", precision=0, minimum=-1, elem_id="seed")
                image = gr.Image(label="Start image (optional)", type="filepath", sources=["upload"],
                                 visible=first.takes_image, elem_id="image")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.HTML("<p>No job yet.</p>", elem_id="job-status")
                video = gr.Video(label="Video", interactive=False, buttons=["download"], elem_id="result-video")
        gr.Markdown("### Recent jobs (select a row to show it)")
        jobs = gr.Dataframe(headers=JOB_COLUMNS, value=[], interactive=False, wrap=True, elem_id="jobs")
        refresh = gr.Button("Refresh", size="sm", elem_id="refresh")

        model.change(page.defaults, inputs=model, outputs=[size, frames, steps, image])
        # Following a job only polls the store: no limit, so many people can wait at once.
        generate.click(page.generate, inputs=[model, prompt, size, frames, seed, steps, image],
                       outputs=[status, video, jobs], concurrency_limit=None)
        jobs.select(page.select, outputs=[status, video])
        refresh.click(page.recent, outputs=jobs)
        blocks.load(page.recent, outputs=jobs)
    return blocks


class _PageMount(Mount):
    """The page's mount at "/": every path but the API's (an unknown /v1 path gets the API's JSON 404)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if any(path == prefix or path.startswith(prefix + "/") for prefix in API_PATHS):
            return Match.NONE, {}
        return super().matches(scope)


def mount_page(app: FastAPI, store: JobStore, catalog: ModelCatalog, config: ServeConfig) -> FastAPI:
    """Mount the page at "/" on ``app``; call it after every API route is added (the mount catches the rest).
    A job queued from the page counts in the app's metrics and wakes its in-process workers, as the API's do."""
    token = config.token

    def check_login(_user: str, password: str) -> bool:
        return token is not None and hmac.compare_digest(password.encode(), token.encode())

    gr.mount_gradio_app(
        app, build_page(store, catalog, config, getattr(app.state, "submitted", None)), path="/",
        auth=check_login if token is not None else None,
        auth_message="Sign in with the server's API token as the password (any user name).",
        max_file_size=config.max_upload_bytes, ssr_mode=False, run_history=False, mcp_server=False,
        footer_links=["gradio", "settings"], css=PAGE_CSS)
    mounted = app.router.routes.pop()  # what mount_gradio_app just added
    if not isinstance(mounted, Mount) or mounted.path != "":
        raise RuntimeError(f"gradio.mount_gradio_app added {mounted!r}, not a Mount at '/'")
    app.router.routes.append(_PageMount(mounted.path, app=mounted.app, name=mounted.name))
    return app
