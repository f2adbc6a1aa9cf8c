"""The HTTP API in-process (FastAPI's TestClient) over a fresh SQLite store, with a worker on the embedded
tiny model (CPU, float32, 2 steps at 32x32): every route, the error shape for each kind of bad input,
auth, idempotency, caps, upload checks, cancellation, expiry, progress, LoRAs and metrics."""

from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lora_files import lightx2v_lora
from serve.jobs_support import decoded_frames, png_bytes
from wan_serve import ServeConfig, Worker, create_app
from wan_serve.config import is_loopback
from wan_serve.service import ModelCatalog, seconds_to_frames
from wan_serve.worker import PipelineCache

FAST = {"size": "32x32", "num_frames": "5", "num_inference_steps": "2", "seed": "3"}


@pytest.fixture(scope="module")
def pipelines(catalog) -> PipelineCache:
    cache = PipelineCache("cpu", torch.float32)
    cache.get(catalog.spec("tiny-shapes"))  # loaded once for the module, as a server keeps it
    return cache


@pytest.fixture
def make(tmp_path, catalog, pipelines):
    """``make(**config) -> (client, worker)`` over a fresh store in tmp_path."""
    made = []

    def build(**overrides):
        config = ServeConfig(state_dir=str(tmp_path / "state"), device="cpu", dtype="float32", **overrides)
        app = create_app(config, catalog=catalog)
        worker = Worker(app.state.store, catalog, device="cpu", dtype="float32", lease_seconds=30,
                        lora_dir=config.resolved_lora_dir(), wake=app.state.wake, metrics=app.state.metrics)
        worker.pipelines = pipelines
        made.append(app.state.store)
        return TestClient(app), worker

    yield build
    for store in made:
        store.close()


def _error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param and body["error"]["message"]
    return body["error"]


def test_seconds_become_frames_of_the_4k_plus_1_rule() -> None:
    assert seconds_to_frames(1, 16) == 17  # 16 frames -> 17
    assert seconds_to_frames(0.5, 15) == 9  # 7.5 -> 8 -> 9
    assert seconds_to_frames(5, 16) == 81  # 80 -> 81, the released models' length
    assert seconds_to_frames(0.01, 16) == 1


def test_create_run_retrieve_list_download_delete(make) -> None:
    client, worker = make()
    # The SDK's multipart body: a size the DiT cannot take exactly and seconds instead of frames.
    r = client.post("/v1/videos", data={"prompt": "a red circle", "size": "40x24", "seconds": "0.5",
                                        "num_inference_steps": "2"})
    assert r.status_code == 200, r.text
    video = r.json()
    assert re.fullmatch(r"video_[0-9a-f]{24}", video["id"])
    assert (video["object"], video["status"], video["model"], video["progress"]) == ("video", "queued",
                                                                                     "tiny-shapes", 0)
    # rounded as the pipeline rounds: 48x32; 0.5 s at 15 fps -> 9 frames = 0.6 s
    assert (video["size"], video["num_frames"], video["seconds"], video["queue_position"]) == ("48x32", 9, "0.6", 1)
    assert worker.run_once() is True and worker.run_once() is False
    done = client.get(f"/v1/videos/{video['id']}").json()
    assert (done["status"], done["progress"], done["error"]) == ("completed", 100, None)
    assert done["expires_at"] == done["completed_at"] + 24 * 3600
    content = client.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert decoded_frames(content.content) == (9, 48, 32)
    second = client.post("/v1/videos", json={"prompt": "a blue square", **FAST, "num_frames": 5}).json()
    listed = client.get("/v1/videos", params={"limit": 1}).json()
    assert listed["object"] == "list" and listed["has_more"] is True
    assert listed["first_id"] == listed["last_id"] == second["id"]
    rest = client.get("/v1/videos", params={"limit": 5, "after": second["id"]}).json()
    assert [v["id"] for v in rest["data"]] == [video["id"]] and rest["has_more"] is False
    assert [v["id"] for v in client.get("/v1/videos", params={"order": "asc"}).json()["data"]] == [video["id"],
                                                                                                  second["id"]]
    assert client.delete(f"/v1/videos/{video['id']}").json() == {"id": video["id"], "object": "video.deleted",
                                                                 "deleted": True}
    _error(client.get(f"/v1/videos/{video['id']}"), 404, "video_id")
    _error(client.get(f"/v1/videos/{video['id']}/content"), 404, "video_id")
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-shapes"]
    assert client.get("/healthz").json()["status"] == "ok"


def test_registry_defaults_fill_what_the_request_leaves_out_and_num_frames_wins(make) -> None:
    client, worker = make()
    video = client.post("/v1/videos", json={"prompt": "a green triangle"}).json()
    # the tiny model's settings (wan_runtime.assets.DEFAULT_MODEL_SETTINGS): 64x64, 17 frames at 15 fps
    assert (video["size"], video["num_frames"], video["seconds"]) == ("64x64", 17, "1.13")
    job = worker.store.get(video["id"])
    assert (job.params["num_inference_steps"], job.params["cfg_scale"], job.params["sampler"]) == (20, 3.0, "euler")
    both = client.post("/v1/videos", json={"prompt": "x", "seconds": "4", "num_frames": 6}).json()
    assert (both["num_frames"], both["seconds"]) == (9, "0.6")


BAD_BODIES = [
    ({"prompt": "x", "model": "sora-2"}, "model"),
    ({"size": "32x32"}, "prompt"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "0x32"}, "size"),
    ({"prompt": "x", "num_frames": "many"}, "num_frames"),
    ({"prompt": "x", "num_frames": "0"}, "num_frames"),
    ({"prompt": "x", "seconds": "-1"}, "seconds"),
    ({"prompt": "x", "seed": "-4"}, "seed"),
    ({"prompt": "x", "cfg_scale": "nan"}, "cfg_scale"),
    ({"prompt": "x", "sigma_shift": "0"}, "sigma_shift"),
    ({"prompt": "x", "sampler": "ddim"}, "sampler"),
    ({"prompt": "x", "loras": "missing"}, "loras"),
    ({"prompt": "x", "loras": "../../etc/passwd"}, "loras"),
    ({"prompt": "x" * 20_001}, "prompt"),
    ({"prompt": "x", "temperature": "1"}, "temperature"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[p for _, p in BAD_BODIES])
def test_bad_parameters_are_400s_naming_them_and_store_nothing(make, body, param) -> None:
    client, worker = make()
    error = _error(client.post("/v1/videos", data=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert worker.store.counts()["queued"] == 0


def test_caps_are_400s_naming_the_cap(make) -> None:
    client, worker = make(max_pixels=64 * 64, max_frames=9, max_steps=4)
    assert "max_pixels=4096" in _error(client.post("/v1/videos", data={"prompt": "x", "size": "80x64"}), 400,
                                       "size")["message"]
    assert "max_frames=9" in _error(client.post("/v1/videos", data={"prompt": "x", "num_frames": "10"}), 400,
                                    "num_frames")["message"]
    assert "max_frames=9" in _error(client.post("/v1/videos", data={"prompt": "x", "seconds": "2"}), 400,
                                    "seconds")["message"]
    assert "max_steps=4" in _error(client.post("/v1/videos", data={"prompt": "x", "num_frames": "5",
                                                                 "num_inference_steps": "5"}),
                                   400, "num_inference_steps")["message"]
    assert "by default" in _error(client.post("/v1/videos", data={"prompt": "x"}), 400, "num_frames")["message"]
    assert client.post("/v1/videos", data={"prompt": "x", "size": "64x64", "num_frames": "9",
                                           "num_inference_steps": "4"}).status_code == 200


def test_malformed_requests_get_the_error_shape_never_a_500(make) -> None:
    client, _ = make()
    _error(client.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"}), 415, None)
    _error(client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}), 400, None)
    _error(client.post("/v1/videos", json=["a list"]), 400, None)
    huge = b'{"prompt": "' + b"x" * (12 * 1024 * 1024) + b'"}'
    _error(client.post("/v1/videos", content=iter([huge[:1024], huge[1024:]]),  # chunked: no Content-Length
                       headers={"content-type": "application/json"}), 413, None)
    _error(client.post("/v1/videos", content=iter([b"--x--\r\n"]),
                       headers={"content-type": "multipart/form-data; boundary=x"}), 411, None)
    _error(client.post("/v1/videos", json={"prompt": 5}), 400, "prompt")
    _error(client.post("/v1/videos", json={"prompt": "x", "seed": True}), 400, "seed")
    _error(client.get("/v1/videos/video_0000"), 404, "video_id")
    _error(client.get("/v1/videos", params={"limit": 0}), 400, "limit")
    _error(client.get("/v1/videos", params={"order": "sideways"}), 400, "order")
    _error(client.get("/v1/videos", params={"after": "video_nope"}), 400, "after")
    _error(client.get("/v1/nothing"), 404, None)
    _error(client.put("/v1/videos"), 405, None)
    queued = client.post("/v1/videos", json={"prompt": "x", **FAST}).json()
    _error(client.get(f"/v1/videos/{queued['id']}/content"), 409, "video_id")
    _error(client.get(f"/v1/videos/{queued['id']}/content", params={"variant": "thumbnail"}), 400, "variant")


def test_uploads_are_decoded_and_checked(make) -> None:
    client, worker = make(max_upload_bytes=20_000)
    big = png_bytes(200, 200)
    assert len(big) > 20_000
    error = _error(client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", big)}),
                   413, "input_reference")
    assert "20000" in error["message"]
    text = b"#!/bin/sh\necho not an image\n"
    _error(client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", text, "image/png")}),
           415, "input_reference")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(gif, format="GIF")
    _error(client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", gif.getvalue())}),
           415, "input_reference")  # a real image, but not one of the accepted formats
    truncated = png_bytes(40, 24)[:200]
    _error(client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", truncated)}),
           400, "input_reference")
    # A good image, but the tiny model generates from text only.
    assert "text only" in _error(client.post("/v1/videos", data={"prompt": "x"},
                                             files={"input_reference": ("a.webp", png_bytes(40, 24, fmt="WEBP"))}),
                                 400, "input_reference")["message"]
    assert worker.store.counts()["queued"] == 0


def test_an_image_model_takes_the_upload_through_the_store(tmp_path_factory, tmp_path) -> None:
    from wan_runtime import tiny_release

    folder = tiny_release.write_release(tmp_path_factory.mktemp("models"), "Wan2.1-I2V-14B-480P")
    catalog = ModelCatalog([str(folder)])
    assert catalog.spec("Wan2.1-I2V-14B-480P").takes_image
    config = ServeConfig(state_dir=str(tmp_path / "state"))
    app = create_app(config, catalog=catalog)
    client = TestClient(app)
    image = png_bytes(48, 40)
    r = client.post("/v1/videos", data={"prompt": "a cat", **FAST}, files={"input_reference": ("in.jpg", image)})
    assert r.status_code == 200, r.text
    assert app.state.store.get_blob(r.json()["id"], "input_reference") == image
    worker = Worker(app.state.store, catalog, device="cpu", dtype="float32")
    assert worker.run_once()
    done = client.get(f"/v1/videos/{r.json()['id']}").json()
    assert done["status"] == "completed", done["error"]
    assert decoded_frames(client.get(f"/v1/videos/{done['id']}/content").content) == (5, 32, 32)
    app.state.store.close()


def test_a_16_bit_greyscale_upload_is_scaled_as_wan_generate_reads_it(tmp_path_factory, tmp_path,
                                                                      monkeypatch) -> None:
    """A 16-bit PNG (values 0..65535) reaches the pipeline as `wan generate`'s load_image reads the same file,
    scaled by its bit depth; Pillow's plain convert("RGB") would clip it to near-white."""
    import wan_serve.worker
    from wan_runtime import tiny_release
    from wan_runtime.video_io import load_image

    folder = tiny_release.write_release(tmp_path_factory.mktemp("models"), "Wan2.1-I2V-14B-480P")
    catalog = ModelCatalog([str(folder)])
    app = create_app(ServeConfig(state_dir=str(tmp_path / "state")), catalog=catalog)
    client = TestClient(app)
    levels = np.linspace(1000, 64000, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored and read back as 16-bit
    r = client.post("/v1/videos", data={"prompt": "a cat", **FAST},
                    files={"input_reference": ("grey16.png", path.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    handed: list = []
    real_run_job = wan_serve.worker.run_job

    def recording_run_job(pipe, params, image, *rest):
        handed.append(image)
        return real_run_job(pipe, params, image, *rest)

    monkeypatch.setattr(wan_serve.worker, "run_job", recording_run_job)
    assert Worker(app.state.store, catalog, device="cpu", dtype="float32").run_once()
    assert client.get(f"/v1/videos/{r.json()['id']}").json()["status"] == "completed"
    pixels = np.asarray(handed[0])
    expected = np.rint(levels.astype(np.float64) * 255 / 65535).astype(np.uint8)  # the bit-depth scaling, by hand
    assert handed[0].mode == "RGB" and np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(pixels, np.asarray(load_image(path)))
    app.state.store.close()


def test_a_wan22_image_model_without_a_size_follows_the_image(tmp_path_factory, tmp_path) -> None:
    from wan_runtime import tiny_release

    folder = tiny_release.write_release(tmp_path_factory.mktemp("models"), "Wan2.2-TI2V-5B")
    catalog = ModelCatalog([str(folder)])
    app = create_app(ServeConfig(state_dir=str(tmp_path / "state")), catalog=catalog)
    client = TestClient(app)
    r = client.post("/v1/videos", data={"prompt": "a cat", "num_frames": "5"},
                    files={"input_reference": ("in.png", png_bytes(64, 32))})
    # The tiny DiT matches no registry entry, so the default size is `wan generate`'s 832x480; TI2V's rule
    # keeps that area at the image's 2:1 aspect, sides multiples of 32 (the 16x VAE), taking the closer
    # ratio of two roundings: 864x448 (ratio 1.93) beats 960x416 (2.31).
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "864x448"
    assert client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 5}).json()["size"] == "832x480"
    app.state.store.close()


def test_bearer_token(make) -> None:
    client, _ = make(token="s3cret-token")
    assert _error(client.get("/v1/models"), 401, None)["type"] == "authentication_error"
    _error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, None)
    _error(client.get("/metrics"), 401, None)
    ok = {"Authorization": "Bearer s3cret-token"}
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.post("/v1/videos", json={"prompt": "x", **FAST}, headers=ok).status_code == 200
    assert client.get("/metrics", headers=ok).status_code == 200
    assert client.get("/healthz").status_code == 200  # health checks need no token


def test_binding_beyond_loopback_needs_a_token_or_insecure() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="without a token"):
        ServeConfig(host="0.0.0.0").check_bind()
    ServeConfig(host="0.0.0.0", token="t").check_bind()
    ServeConfig(host="0.0.0.0", insecure=True).check_bind()


def test_cors_only_when_asked(make) -> None:
    client, _ = make()
    headers = {"Origin": "https://example.org", "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in client.options("/v1/models", headers=headers).headers
    client, _ = make(cors_origins=("https://example.org",))
    assert client.options("/v1/models", headers=headers).headers["access-control-allow-origin"] == \
        "https://example.org"


def test_idempotency_key(make) -> None:
    client, worker = make()
    body = {"prompt": "a red circle", **FAST}
    first = client.post("/v1/videos", data=body, headers={"Idempotency-Key": "k1"}).json()
    again = client.post("/v1/videos", data=body, headers={"Idempotency-Key": "k1"}).json()
    assert again["id"] == first["id"] and worker.store.counts()["queued"] == 1
    _error(client.post("/v1/videos", data={**body, "seed": "4"}, headers={"Idempotency-Key": "k1"}), 409,
           "Idempotency-Key")
    assert client.post("/v1/videos", data=body, headers={"Idempotency-Key": "k2"}).json()["id"] != first["id"]
    assert 'wan_serve_jobs_submitted_total{model="tiny-shapes"} 2.0' in client.get("/metrics").text  # k1 once


def test_delete_cancels_queued_and_running_jobs_and_progress_is_reported(make) -> None:
    client, worker = make()
    queued = client.post("/v1/videos", json={"prompt": "x", **FAST}).json()
    assert client.delete(f"/v1/videos/{queued['id']}").json()["deleted"] is True
    _error(client.get(f"/v1/videos/{queued['id']}"), 404, "video_id")
    assert worker.run_once() is False  # nothing left to run
    # A long job (many steps) in a worker thread; progress shows up, then DELETE stops it mid-way.
    long = client.post("/v1/videos", json={"prompt": "x", "size": "32x32", "num_frames": 5,
                                           "num_inference_steps": 100}).json()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while (seen := client.get(f"/v1/videos/{long['id']}").json())["progress"] == 0:
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        assert seen["status"] == "in_progress" and 0 < seen["progress"] < 100
        assert client.delete(f"/v1/videos/{long['id']}").json()["deleted"] is True
        while worker.store.get(long["id"]).status != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    count = _sample(worker, "wan_serve_step_seconds_count")
    assert 0 < count < 100  # it stopped before the last step
    assert worker.store.get_blob(long["id"], "video") is None
    _error(client.get(f"/v1/videos/{long['id']}"), 404, "video_id")


def _sample(worker: Worker, name: str, **labels: str) -> float:
    value = worker.metrics.registry.get_sample_value(name, labels or {"model": "tiny-shapes"})
    return 0.0 if value is None else value


def test_expired_results_are_gone(make) -> None:
    client, worker = make(retention_seconds=60)
    video = client.post("/v1/videos", json={"prompt": "x", **FAST}).json()
    worker.run_once()
    done = client.get(f"/v1/videos/{video['id']}").json()
    assert done["expires_at"] == done["completed_at"] + 60
    assert worker.store.expire(now=done["expires_at"] - 1) == 0
    assert worker.store.expire(now=done["expires_at"]) == 1
    assert _error(client.get(f"/v1/videos/{video['id']}/content"), 404, "video_id")["code"] == "video_expired"


def test_loras_are_merged_for_the_job_and_unmerged_after(make, tmp_path) -> None:
    client, worker = make()
    pipe = worker.pipelines.get(worker.catalog.spec("tiny-shapes"))
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    lora_dir = tmp_path / "state" / "loras"
    lora_dir.mkdir(parents=True)
    lightx2v_lora(lora_dir / "style.safetensors", {k: v.shape for k, v in before.items()}, seed=7)
    plain = client.post("/v1/videos", json={"prompt": "a red circle", **FAST}).json()
    styled = client.post("/v1/videos", json={"prompt": "a red circle", **FAST, "loras": ["style:0.8"]}).json()
    assert worker.store.get(styled["id"]).params["loras"] == [["style.safetensors", 0.8]]
    worker.run_once(), worker.run_once()
    for k, v in pipe.dit.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-5)  # base weights back after the job
    a = client.get(f"/v1/videos/{plain['id']}/content").content
    b = client.get(f"/v1/videos/{styled['id']}/content").content
    assert a != b  # same seed and prompt: the LoRA changed the video


def test_metrics(make) -> None:
    client, worker = make()
    for _ in range(2):
        client.post("/v1/videos", json={"prompt": "x", **FAST})
    text = client.get("/metrics").text
    assert "wan_serve_queue_depth 2.0" in text and 'wan_serve_jobs{state="queued"} 2.0' in text
    worker.run_once()
    text = client.get("/metrics").text
    assert "wan_serve_queue_depth 1.0" in text and 'wan_serve_jobs{state="completed"} 1.0' in text
    assert _sample(worker, "wan_serve_step_seconds_count") == 2  # two steps of one job


def test_wan_serve_refuses_a_public_host_without_a_token(capsys, monkeypatch) -> None:
    import signal

    from wan_cli.main import main

    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's SIGTERM handler
    monkeypatch.delenv("WAN_API_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--host", "0.0.0.0", "--port", "0"])
    assert exit_.value.code == 2 and "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err
