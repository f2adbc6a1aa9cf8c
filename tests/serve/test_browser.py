"""The page at "/" in a real headless browser: Debian's chromium driven by Selenium through chromium-driver.

A real `wan serve` (subprocess, tiny model, temp state, free port) serves the page; the test types a prompt,
sets the steps and seed, presses Generate while an API job holds the worker (the status shows queue position 1
and a progress bar), waits for a <video> that the browser has decoded and plays, checks the bytes it plays and
offers for download are the API's video and that the job carries the form's values, then reloads the page and
plays the job again from the recent-jobs table; nothing is fetched from outside the server. Screenshots are kept
under the test's tmp folder (and in $TEST_ARTIFACTS when set). Without chromium the test fails and says how to
install it: it is never skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from wan_serve import ServeConfig
from wan_serve.store import JobStore

INSTALL_HINT = ("run `tools/ensure_test_system.sh` as root (it runs `apt-get install -y chromium chromium-driver`; "
                "`make test` runs it)")
JOB_ID = re.compile(r"video_[0-9a-f]{24}")
PROMPT = "a red circle moving left on a white background"
# The <video> of the result, once the browser has its metadata: what the element reports.
VIDEO_STATE = """
const v = document.querySelector(arguments[0] + ' video');
if (!v || !v.src) return null;
return {src: v.src, readyState: v.readyState, currentTime: v.currentTime,
        duration: isFinite(v.duration) ? v.duration : 0, error: v.error ? v.error.code : null};
"""
PLAY = """
const done = arguments[arguments.length - 1];
const v = document.querySelector('#result-video video');
v.muted = true;
v.play().then(() => done('playing'), (e) => done(String(e)));
"""
# The status box, read at once: the job's state line and its progress bar's value.
STATUS_STATE = """
const state = document.querySelector('#job-status .job-state');
const bar = document.querySelector('#job-status progress.job-progress');
return state ? {state: state.textContent, progress: bar ? bar.getAttribute('value') : null} : null;
"""
FETCH_LENGTH = """
const done = arguments[arguments.length - 1];
fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => done(b.byteLength), e => done(String(e)));
"""


def _chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
        pytest.fail(f"{' and '.join(missing)} not found on PATH: {INSTALL_HINT}", pytrace=False)
    return browser, driver


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless chromium (``--no-sandbox`` when root: its sandbox refuses to run as root)."""
    binary, driver_path = _chromium()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--disable-dev-shm-usage", "--window-size=1280,1300", "--mute-audio",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _keep_screenshot(driver: webdriver.Chrome, folder: Path, name: str) -> Path:
    """Save a screenshot under ``folder`` and, when $TEST_ARTIFACTS is set, copy it there."""
    path = folder / name
    driver.save_screenshot(str(path))
    artifacts = os.environ.get("TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def _wait_video(driver: webdriver.Chrome, selector: str, timeout: float) -> dict[str, Any]:
    """The video state once the browser has decoded a frame (readyState >= 2) of a video with a duration."""
    def ready(d: webdriver.Chrome) -> dict[str, Any] | None:
        state = d.execute_script(VIDEO_STATE, selector)
        return state if state and state["readyState"] >= 2 and state["duration"] > 0 else None

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(ready, f"no playable video in {selector}")


def test_page_generates_plays_and_lists_the_job(wan_processes: Any, browser: webdriver.Chrome,
                                                tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = wan_processes.serve(state_dir=state_dir)
    try:
        browser.get(server.url + "/")
        prompt = WebDriverWait(browser, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), "the page shows no prompt box")[0]
        prompt.send_keys(PROMPT)
        for field, value in (("steps", "2"), ("seed", "1234")):
            box = browser.find_element(By.CSS_SELECTOR, f"#{field} input")
            box.clear()
            box.send_keys(value)
        # A longer job from the API, just before, keeps the one worker busy: the page's job waits behind it.
        blocker = httpx.post(f"{server.url}/v1/videos", timeout=10,
                             json={"prompt": "a blue square", "num_inference_steps": 20, "num_frames": 33}).json()
        browser.find_element(By.CSS_SELECTOR, "#generate").click()

        first = WebDriverWait(browser, 10, poll_frequency=0.05).until(
            lambda d: d.execute_script(STATUS_STATE), "the page shows no job status")
        assert first["state"] == "queued, position 1 in the queue" and first["progress"] == "0", first
        _keep_screenshot(browser, tmp_path, "wan-serve-page-queued.png")

        state = _wait_video(browser, "#result-video", timeout=60)
        assert state["error"] is None
        assert browser.execute_async_script(PLAY) == "playing"
        WebDriverWait(browser, 10, poll_frequency=0.1).until(
            lambda d: d.execute_script(VIDEO_STATE, "#result-video")["currentTime"] > 0, "the video does not play")
        _keep_screenshot(browser, tmp_path, "wan-serve-page-done.png")

        found = JOB_ID.search(browser.find_element(By.CSS_SELECTOR, "#job-status").text)
        assert found, browser.find_element(By.CSS_SELECTOR, "#job-status").text
        job_id = found.group(0)
        # The API reports the same job: completed, and its mp4 is exactly what the browser played.
        job = httpx.get(f"{server.url}/v1/videos/{job_id}", timeout=10).json()
        assert job["status"] == "completed" and job["prompt"] == PROMPT
        content = httpx.get(f"{server.url}/v1/videos/{job_id}/content", timeout=10)
        assert content.headers["content-type"] == "video/mp4"
        assert browser.execute_async_script(FETCH_LENGTH, state["src"]) == len(content.content)
        download = browser.find_element(By.CSS_SELECTOR, "#result-video a[download]")
        assert download.get_attribute("download") == f"{job_id}.mp4"
        assert browser.execute_async_script(FETCH_LENGTH, download.get_attribute("href")) == len(content.content)
        assert state["duration"] == pytest.approx(float(job["seconds"]), abs=0.05)
        # The form's values reached the job (the tiny model's defaults are 64x64, 17 frames, more steps).
        stored = JobStore(ServeConfig(state_dir=str(state_dir)).resolved_db_url())
        try:
            params = stored.get(job_id).params
        finally:
            stored.close()
        assert (params["num_inference_steps"], params["seed"]) == (2, 1234)
        # The page's job counts among the submissions, beside the API's.
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'wan_serve_jobs_submitted_total{model="tiny-shapes"} 2.0' in metrics

        # Past jobs stay listed: a fresh page shows the job in the table; selecting it plays it again.
        browser.get(server.url + "/")
        cell = WebDriverWait(browser, 30).until(
            lambda d: [c for c in d.find_elements(By.XPATH, f"//*[@id='jobs']//*[normalize-space(text())='{job_id}']")
                       if c.is_displayed()],
            "the recent-jobs table does not list the job")[0]
        table = browser.find_element(By.CSS_SELECTOR, "#jobs").text
        assert PROMPT in table and blocker["id"] in table and "completed" in table
        cell.click()
        again = _wait_video(browser, "#result-video", timeout=20)
        assert job_id in browser.find_element(By.CSS_SELECTOR, "#job-status").text
        assert again["duration"] == pytest.approx(state["duration"])

        # Nothing came from outside the server (no CDN, fonts or analytics).
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        outside = [url for url in resources if not url.startswith(server.url + "/")]
        assert not outside, json.dumps(outside)
    except Exception:
        _keep_screenshot(browser, tmp_path, "wan-serve-page-failure.png")
        raise
