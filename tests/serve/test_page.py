"""The page in-process (no browser): a token makes every Gradio route ask for the login, the token as the
password (and that login opens no API route); the API keeps its paths and JSON errors beside the page mounted
at "/"; the form starts at the tiny model's own defaults; bad input is refused with the service's message
before a job exists; an image model's form takes a start image, which reaches the job as it was dropped; a
table row names no file. The browser test (test_browser.py) drives the whole page against a real server."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from serve.jobs_support import png_bytes
from wan_runtime import tiny_release
from wan_runtime.assets import DEFAULT_MODEL_NAME, DEFAULT_MODEL_SETTINGS
from wan_serve import ServeConfig, create_app
from wan_serve.page import _Page, mount_page
from wan_serve.service import ModelCatalog
from wan_serve.store import JobStore

TOKEN = "page-token-4f1c9e"


def _client(tmp_path: Path, catalog: ModelCatalog, **overrides: object) -> TestClient:
    config = ServeConfig(state_dir=str(tmp_path / "state"), workers=0, **overrides)
    app = create_app(config, catalog=catalog)
    mount_page(app, app.state.store, catalog, config)
    return TestClient(app)


def _components(config: dict) -> dict[str, dict]:
    """The page's components by elem_id, from Gradio's /config."""
    return {c["props"]["elem_id"]: c["props"] for c in config["components"] if c["props"].get("elem_id")}


def test_with_a_token_the_page_asks_for_it(tmp_path: Path, catalog: ModelCatalog) -> None:
    with _client(tmp_path, catalog, token=TOKEN) as client:
        assert client.get("/config").status_code == 401
        assert client.get("/gradio_api/info").status_code == 401
        joined = client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "abc"})
        assert joined.status_code == 401
        assert client.post("/login", data={"username": "anyone", "password": TOKEN[:-1]}).status_code == 400
        assert client.post("/login", data={"username": "anyone", "password": TOKEN}).status_code == 200
        assert client.get("/config").status_code == 200
        # The page's login cookie is no API credential: the API still wants the bearer token.
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_without_a_token_the_form_starts_at_the_model_defaults(tmp_path: Path, catalog: ModelCatalog) -> None:
    with _client(tmp_path, catalog) as client:
        response = client.get("/config")
        assert response.status_code == 200
        props = _components(response.json())
        tiny = DEFAULT_MODEL_SETTINGS
        assert props["model"]["value"] == DEFAULT_MODEL_NAME
        assert props["size"]["value"] == f"{tiny['width']}x{tiny['height']}"
        assert props["frames"]["value"] == tiny["frames"]
        assert props["steps"]["value"] == tiny["steps"]
        assert props["image"]["visible"] is False  # the tiny model generates from text only
        # Offline: no telemetry, no run history kept in the browser, no MCP endpoint.
        assert [response.json()[key] for key in ("analytics_enabled", "run_history", "mcp_server")] == [False] * 3


def test_the_api_keeps_its_paths_and_error_shape_beside_the_page(tmp_path: Path, catalog: ModelCatalog) -> None:
    with _client(tmp_path, catalog) as client:
        for method, path, status in (("get", "/v1/nothing", 404), ("put", "/v1/videos", 405),
                                     ("post", "/healthz", 405), ("get", "/v1/videos/video_0", 404)):
            response = client.request(method, path)
            assert response.status_code == status, (method, path, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
        assert client.get("/v1/models").json()["data"][0]["id"] == DEFAULT_MODEL_NAME
        assert "<html" in client.get("/").text


def test_bad_input_is_refused_before_a_job_exists(tmp_path: Path, catalog: ModelCatalog) -> None:
    config = ServeConfig(state_dir=str(tmp_path / "state"), workers=0, max_steps=8)
    store = JobStore(config.resolved_db_url())
    try:
        page = _Page(store, catalog, config)
        for size, steps, words in (("64by64", 2, "64by64"), ("64x64", 9, "max_steps=8")):
            run = page.generate(DEFAULT_MODEL_NAME, "a red circle", size, 17, -1, steps, None)
            with pytest.raises(gr.Error, match=words):
                next(run)
        assert store.list()[0] == []
    finally:
        store.close()


def test_an_image_model_takes_the_dropped_image(tmp_path: Path) -> None:
    folder = tiny_release.write_release(tmp_path / "models", "Wan2.1-I2V-14B-480P")
    catalog = ModelCatalog([str(folder)])
    name = catalog.names()[0]
    config = ServeConfig(state_dir=str(tmp_path / "state"), workers=0)
    store = JobStore(config.resolved_db_url())
    try:
        page = _Page(store, catalog, config)
        *_, image_update = page.defaults(name)
        assert image_update["visible"] is True
        png = png_bytes(64, 48, seed=5)
        dropped = tmp_path / "start.png"
        dropped.write_bytes(png)
        run = page.generate(name, "a cat turns its head", "64x48", 5, 11, 2, str(dropped))
        status, video, rows = next(run)
        run.close()
        job_id = rows[0][0]
        assert job_id in status and "queued, position 1" in status and video is None
        assert store.get_blob(job_id, "input_reference") == png
        assert store.get(job_id).params["seed"] == 11
    finally:
        store.close()


def test_a_table_row_names_no_file(tmp_path: Path, catalog: ModelCatalog) -> None:
    config = ServeConfig(state_dir=str(tmp_path / "state"), workers=0)
    store = JobStore(config.resolved_db_url())
    try:
        page = _Page(store, catalog, config)
        event = gr.SelectData(None, {"index": [0, 0], "value": "x", "row_value": ["../../etc/passwd"]})
        status, video = page.select(event)
        assert video is None and "no longer exists" in status
        assert list(page.video_dir.iterdir()) == []
    finally:
        store.close()
