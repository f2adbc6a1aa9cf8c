"""The HTTP API: OpenAI's video API shape (``/v1/videos``), ``/v1/models``, ``/healthz`` and ``/metrics``.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input
(FastAPI's own validation errors included); a 500 means a bug. With a token configured, every route
but ``/healthz`` needs ``Authorization: Bearer <token>`` (compared in constant time).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import service
from .config import ServeConfig
from .metrics import CONTENT_TYPE, Metrics
from .service import ApiError, ModelCatalog
from .store import Job, JobStore

logger = logging.getLogger(__name__)

FORM_OVERHEAD = 1024 * 1024  # room for the text fields of a multipart body beside its image
MAX_LIST = 100


def _visible(store: JobStore, job_id: str) -> Job:
    """The job ``job_id`` as the API shows it; cancelled ones (and unknown ids) are a 404."""
    job = store.get(job_id)
    if job is None or job.status == "cancelled" or job.cancel_requested:
        raise ApiError(404, f"no video with id {job_id!r}", "video_id", "video_not_found")
    return job


def _check_token(config: ServeConfig, request: Request) -> None:
    if config.token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.token.encode()):
        raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer <token>'", None,
                       "invalid_api_key", "authentication_error")


def _data_url(value: Any) -> bytes:
    """A JSON ``input_reference`` ({"image_url": "data:image/...;base64,..."}) as bytes; remote URLs are
    refused (the server fetches nothing on a client's behalf)."""
    url = value.get("image_url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, "input_reference in a JSON body must be {'image_url': 'data:image/png;base64,...'}; "
                       "upload a file with multipart/form-data otherwise", "input_reference", "invalid_value")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "input_reference's data URL is not valid base64", "input_reference",
                       "invalid_value") from None


async def _read_body(request: Request, config: ServeConfig) -> tuple[dict[str, Any], bytes | None]:
    """The create parameters and the image of a multipart or JSON body (413/415/400 on bad bodies)."""
    limit = config.max_upload_bytes + FORM_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {config.max_upload_bytes} for the "
                       "image plus 1 MiB", None, "request_too_large")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        raw = bytearray()
        async for chunk in request.stream():  # bounded even without a Content-Length
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", None,
                               "request_too_large")
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", None, "invalid_json")
        image = body.pop("input_reference", None)
        return body, (_data_url(image) if image is not None else None)
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        if length is None:  # the form parser spools files to disk: only bodies of a declared size
            raise ApiError(411, "a form body needs a Content-Length header", None, "length_required")
        try:
            form = await request.form(max_files=1, max_fields=64, max_part_size=FORM_OVERHEAD)
        except Exception as e:  # starlette's MultiPartException and parser errors: a malformed body
            raise ApiError(400, f"the form body could not be parsed: {e}", None, "invalid_form") from None
        params: dict[str, Any] = {}
        image = None
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key
            if not isinstance(value, str):  # an uploaded file
                if name != "input_reference":
                    raise ApiError(400, f"unexpected file field {key!r}; only input_reference takes a file", key,
                                   "unknown_parameter")
                image = await value.read(config.max_upload_bytes + 1)
            elif name == "loras":
                params.setdefault("loras", []).append(value)
            elif name in params:
                raise ApiError(400, f"{key!r} is given twice", key, "invalid_value")
            else:
                params[name] = value
        return params, image
    raise ApiError(415, f"Content-Type {kind or 'none'!r} is not accepted; send multipart/form-data or "
                   "application/json", None, "unsupported_media_type")


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) if first.get("loc") else None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(error)
        return JSONResponse(ApiError(400, message, param, "invalid_value").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}" if error.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}" if error.status_code == 405
                   else str(error.detail))
        return JSONResponse(ApiError(error.status_code, message, None, None).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error ({type(error).__name__}); see the server log", None,
                                     "internal_error", "server_error").body(), status_code=500)


def create_app(config: ServeConfig, store: JobStore | None = None, catalog: ModelCatalog | None = None) -> FastAPI:
    """The FastAPI app over ``store`` and ``catalog`` (built from ``config`` when None). ``app.state`` holds
    config, store, catalog, metrics, ``wake`` (an Event set on every submission, for in-process workers) and
    ``submitted(job, new=True)`` (what every submission does after queueing: count it when new, then wake)."""
    store = store if store is not None else JobStore(config.resolved_db_url(), config.retention_seconds)
    catalog = catalog if catalog is not None else ModelCatalog(config.models)
    metrics = Metrics(store)
    wake = threading.Event()
    app = FastAPI(title="wan serve", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.config, app.state.store, app.state.catalog = config, store, catalog

    def submitted(job: Job, new: bool = True) -> None:
        if new:  # a repeated Idempotency-Key returns the earlier job: not a new submission
            metrics.submitted.labels(job.model).inc()
        wake.set()

    app.state.metrics, app.state.wake, app.state.submitted = metrics, wake, submitted
    _error_handlers(app)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    def auth(request: Request) -> None:
        _check_token(config, request)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            store.counts()  # the store answers
        except Exception as e:
            logger.warning("health check: the store does not answer: %s", e)
            return JSONResponse({"status": "unavailable", "reason": "the job store does not answer"}, 503)
        return JSONResponse({"status": "ok", "models": catalog.names()})

    @app.get("/metrics", dependencies=[Depends(auth)])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.get("/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                            "owned_by": "wan-serve"} for m in catalog.models.values()]}

    @v1.post("/videos")
    async def create(request: Request) -> JSONResponse:
        params, image = await _read_body(request, config)
        key = request.headers.get("idempotency-key")
        replay = key is not None and await run_in_threadpool(store.by_idempotency_key, key) is not None
        job = await run_in_threadpool(service.submit, store, catalog, config, params, image, key)
        submitted(job, new=not replay)
        return JSONResponse(await run_in_threadpool(service.video_object, store, job))

    @v1.get("/videos")
    def list_videos(limit: int = Query(20, ge=1, le=MAX_LIST), after: str | None = None,
                    order: str = Query("desc", pattern="^(asc|desc)$")) -> dict[str, Any]:
        try:
            found, more = store.list(limit, after, order)
        except KeyError:
            raise ApiError(400, f"after={after!r} names no video", "after", "video_not_found") from None
        data = [service.video_object(store, job) for job in found]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @v1.get("/videos/{video_id}")
    def retrieve(video_id: str) -> dict[str, Any]:
        return service.video_object(store, _visible(store, video_id))

    @v1.get("/videos/{video_id}/content")
    def content(video_id: str, variant: str = "video") -> Response:
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not available; only 'video'", "variant", "invalid_value")
        job = _visible(store, video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}, not completed; it has no content yet"
                           if job.status != "failed" else f"video {video_id} failed; it has no content",
                           "video_id", "video_not_ready")
        data = store.get_blob(video_id, "video")
        if data is None:
            raise ApiError(404, f"video {video_id} expired at {job.expires_at} (unix time); generate it again",
                           "video_id", "video_expired")
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="{video_id}.mp4"'})

    @v1.delete("/videos/{video_id}")
    def remove(video_id: str) -> dict[str, Any]:
        job = _visible(store, video_id)
        done = store.cancel(video_id) is not None if job.status in ("queued", "in_progress") else store.delete(video_id)
        if not done:  # it changed state meanwhile (e.g. finished): delete what it is now
            if store.delete(video_id) is False and store.cancel(video_id) is None:
                raise ApiError(404, f"no video with id {video_id!r}", "video_id", "video_not_found")
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    app.include_router(v1)
    return app
