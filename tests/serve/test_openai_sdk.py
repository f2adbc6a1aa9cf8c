"""The official ``openai`` SDK (the version pinned in wan-serve's test extra) against a real `wan serve`.

One server process for the module, with a token, serving the embedded tiny model (text only) and a tiny
random Wan2.2-TI2V-5B release (takes an input image). Every call goes through the SDK's own code:
``videos.create`` sends multipart/form-data with ``seconds`` and ``size`` as strings and our extra
parameters as form fields; the answers are parsed into the SDK's ``Video`` models; mp4 bytes are
decoded with PyAV. The SDK marks its video methods deprecated (the upstream service is shutting down);
only that warning is silenced.
"""

from __future__ import annotations

import io
import secrets
import time
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pytest
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI
from openai.types import Video

from serve.jobs_support import WanProcess, WanProcesses, png_bytes
from wan_runtime import tiny_release

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Sora API is scheduled to permanently shut down:DeprecationWarning")

TOKEN = "sdk-" + secrets.token_hex(12)
TINY = "tiny-shapes"  # the embedded model's API id (64x64, 15 fps)
TI2V = "Wan2.2-TI2V-5B"  # the tiny release folder's name is its API id
JOB_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WanProcess]:
    tmp = tmp_path_factory.mktemp("sdk")
    folder = tiny_release.write_release(tmp / "models", TI2V)
    processes = WanProcesses(tmp)
    try:
        yield processes.serve("--token", TOKEN, "--model", TINY, "--model", str(folder))
    finally:
        processes.stop_all()


@pytest.fixture
def client(server: WanProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=30)


def wait_completed(client: OpenAI, video_id: str) -> Video:
    """``videos.retrieve`` until the job is completed; fails on a failed job or after JOB_TIMEOUT."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        assert video.status != "failed", video.error
        if video.status == "completed":
            return video
        time.sleep(0.1)
    pytest.fail(f"{video_id} not completed after {JOB_TIMEOUT:.0f} s (last status {video.status})")


def decode(data: bytes) -> list[np.ndarray]:
    """Every frame of an mp4, as RGB arrays."""
    with av.open(io.BytesIO(data), format="mp4") as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_create_retrieve_download_delete(client: OpenAI) -> None:
    video = client.videos.create(model=TINY, prompt="a red circle moving right", seconds="1", size="64x64",
                                 extra_body={"num_inference_steps": 2, "seed": 1})
    assert isinstance(video, Video)
    assert (video.object, video.model, video.status, video.size) == ("video", TINY, "queued", "64x64")
    # 1 s at 15 fps is 15 frames, rounded up to the frame rule 4k + 1: 17 frames, which play for 1.13 s
    assert video.seconds == "1.13" and video.prompt == "a red circle moving right"

    done = wait_completed(client, video.id)
    assert done.id == video.id and done.progress == 100 and done.error is None
    assert done.created_at <= done.completed_at < done.expires_at

    frames = decode(client.videos.download_content(video.id).read())
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (video.id, "video.deleted", True)
    with pytest.raises(NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(NotFoundError):
        client.videos.download_content(video.id)


def test_input_reference_upload_reaches_the_model(client: OpenAI) -> None:
    settings = dict(model=TI2V, prompt="a red ball", seconds="4", size="32x32",
                    extra_body={"num_frames": 5, "num_inference_steps": 2, "seed": 3})
    with_image = client.videos.create_and_poll(input_reference=("first.png", png_bytes(48, 40, seed=0), "image/png"),
                                               poll_interval_ms=100, **settings)
    assert with_image.status == "completed", with_image.error
    assert with_image.size == "32x32"
    without = wait_completed(client, client.videos.create(**settings).id)
    image_frames = decode(client.videos.download_content(with_image.id).read())
    text_frames = decode(client.videos.download_content(without.id).read())
    # num_frames wins over seconds; same seed and prompt, so only the uploaded image can make them differ
    assert len(image_frames) == len(text_frames) == 5 and image_frames[0].shape == (32, 32, 3)
    assert np.abs(image_frames[0].astype(int) - text_frames[0].astype(int)).mean() > 1.0


def test_list_pages_with_limit_and_after(client: OpenAI) -> None:
    ids = [client.videos.create(model=TINY, prompt=f"job {i}", size="32x32",
                                extra_body={"num_frames": 1, "num_inference_steps": 1, "seed": i}).id
           for i in range(3)]
    page = client.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[::-1][:2] and page.has_more
    following = page.get_next_page()
    assert following.data[0].id == ids[0]
    everything = [v.id for v in client.videos.list(limit=2)]  # the SDK follows last_id -> after itself
    assert everything[:3] == ids[::-1] and len(everything) == len(set(everything))
    oldest_first = [v.id for v in client.videos.list(order="asc", limit=100)]
    assert oldest_first == everything[::-1]
    for video_id in ids:  # queued or running jobs are cancelled, finished ones removed
        assert client.videos.delete(video_id).deleted
    remaining = {v.id for v in client.videos.list(limit=100)}
    assert remaining.isdisjoint(ids)


def test_models_are_listed(client: OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {TINY, TI2V}


def test_wrong_token_is_an_authentication_error(server: WanProcess) -> None:
    wrong = OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN + "x", max_retries=0)
    with pytest.raises(AuthenticationError) as caught:
        wrong.videos.create(model=TINY, prompt="a red circle", size="64x64")
    assert caught.value.status_code == 401 and "API token" in caught.value.message
    with pytest.raises(AuthenticationError):
        wrong.videos.list()


@pytest.mark.parametrize("size, expected", [
    ("64by64", "size must be 'WIDTHxHEIGHT' in pixels"),
    ("4096x4096", "above the server's cap max_pixels="),
])
def test_bad_size_is_a_bad_request_with_our_message(client: OpenAI, size: str, expected: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        client.videos.create(model=TINY, prompt="a red circle", size=size)
    assert caught.value.status_code == 400 and caught.value.param == "size"
    assert expected in caught.value.message and size in caught.value.message


def test_sdk_is_the_pinned_version() -> None:
    import openai

    pyproject = Path(__file__).parents[2] / "packages" / "wan-serve" / "pyproject.toml"
    assert f'"openai=={openai.__version__}"' in pyproject.read_text()
