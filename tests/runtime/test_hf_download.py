"""Downloads from the Hugging Face Hub: a local fake Hub (the HTTP routes huggingface_hub's real
``snapshot_download`` and ``list_repo_tree`` call) proves that only missing files are fetched into the
released layout with the manifest written, that truncated files are fetched again, that offline
fails fast with the ``hf download`` command, and that ``download_source``/the env variable/``wan
download --source``/``from_pretrained`` choose the hub; the registry keeps each model's id per hub."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import wan_models
from wan_runtime.sources import registry_source
from wan_models.configs import CLIP_FILE, DIT_FILES, T5_FILE, T5_TOKENIZER, VAE_FILE
from wan_runtime import hubs, manifest, tiny_release
from wan_runtime.model_config import (
    ModelConfig,
    ModelFilesMissing,
    redirect_common_files,
    with_download_source,
)

T2V = "Wan-AI/Wan2.1-T2V-1.3B"
DIT = "diffusion_pytorch_model.safetensors"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                   "no_proxy", "NO_PROXY")
LFS_SUFFIXES = (".safetensors", ".pth", ".model")  # stored in LFS on the Hub: their listing carries a sha256


class FakeHub(ThreadingHTTPServer):
    """The Hub's routes snapshot_download uses: revision info, the recursive tree, and /resolve/ files."""

    daemon_threads = True

    def __init__(self, repos: dict[str, Path]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.downloads: list[str] = []  # "repo/file" of every file body served

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, format: str, *args) -> None:  # the test output stays quiet
        pass

    def _json(self, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _repo(self, parts: list[str]) -> tuple[str | None, list[str]]:
        for n in (2, 1):
            repo = "/".join(parts[:n])
            if repo in self.server.repos:
                return repo, parts[n:]
        return None, parts

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            repo, rest = self._repo(parts[2:])
            if repo is None:
                return self._not_found()
            if rest[:1] == ["revision"]:
                return self._json({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f}
                                                                           for f in self.server.files(repo)]})
            if rest[:1] == ["tree"]:
                return self._json(self._tree(repo))
            return self._not_found()
        repo, rest = self._repo(parts)
        if repo is None or rest[:1] != ["resolve"] or len(rest) < 3:
            return self._not_found()
        path = self.server.repos[repo] / "/".join(rest[2:])
        if not path.is_file():
            return self._not_found()
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.server.downloads.append(f"{repo}/{'/'.join(rest[2:])}")
            self.wfile.write(data)

    def _tree(self, repo: str) -> list[dict]:
        entries, folders = [], set()
        for rel in self.server.files(repo):
            data = (self.server.repos[repo] / rel).read_bytes()
            entry = {"type": "file", "path": rel, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if rel.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
            folders.update("/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1))
        return entries + [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The tiny Wan2.1-T2V-1.3B release, as the Hub's repository holds it."""
    return tiny_release.write_release(tmp_path_factory.mktemp("hub"), "Wan2.1-T2V-1.3B")


@pytest.fixture
def hf_env(monkeypatch, tmp_path) -> None:
    """No proxy, no offline switch, no hub chosen by the environment, a private huggingface_hub cache."""
    for name in PROXY_VARIABLES + ("HF_HUB_OFFLINE", hubs.ENV_VAR, "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setitem(sys.modules, "modelscope", None)  # any call into modelscope would fail


@pytest.fixture
def hub(release, hf_env, monkeypatch):
    server = FakeHub({T2V: release, "alibaba-pai/Wan2.1-Fun-1.3B-InP": release})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- downloads


def test_missing_files_come_from_the_hub_into_the_released_layout(tmp_path, hub, release):
    models = tmp_path / "models"
    (models / T2V).mkdir(parents=True)
    (models / T2V / VAE_FILE).write_bytes((release / VAE_FILE).read_bytes())  # already there, whole
    configs = [ModelConfig(model_id=T2V, origin_file_pattern=p, download_source="huggingface")
               for p in (DIT_FILES, T5_FILE, VAE_FILE, T5_TOKENIZER)]
    paths = [config.resolve(models) for config in configs]
    assert paths == [[models / T2V / DIT], [models / T2V / T5_FILE], [models / T2V / VAE_FILE],
                     [models / T2V / T5_TOKENIZER]]
    for rel in (DIT, T5_FILE, VAE_FILE):
        assert (models / T2V / rel).read_bytes() == (release / rel).read_bytes()
    tokenizer = sorted(p.name for p in (models / T2V / T5_TOKENIZER).iterdir())
    assert tokenizer == sorted(p.name for p in (release / T5_TOKENIZER).iterdir())
    # only the missing files were fetched: the VAE never, nothing twice
    fetched = [d.removeprefix(T2V + "/") for d in hub.downloads]
    assert VAE_FILE not in fetched and len(fetched) == len(set(fetched))
    assert sorted(fetched) == sorted([DIT, T5_FILE] + [f"{T5_TOKENIZER}{n}" for n in tokenizer])
    # the Hub's listing is the folder's manifest: every file with its size, LFS files with their sha256
    entries = manifest.read(models / T2V)
    assert sorted(entries) == hub.files(T2V)
    data = (release / DIT).read_bytes()
    assert entries[DIT] == manifest.Entry(len(data), hashlib.sha256(data).hexdigest())
    assert entries["config.json"] == manifest.Entry((release / "config.json").stat().st_size, None)
    # all there now: nothing more is fetched (not even the probe runs)
    count = len(hub.downloads)
    assert [config.resolve(models, verify=True) for config in configs] == paths
    assert len(hub.downloads) == count


def test_a_truncated_file_is_fetched_again_from_the_hub(tmp_path, hub, release):
    config = ModelConfig(model_id=T2V, origin_file_pattern=DIT_FILES, download_resource="HF")
    config.resolve(tmp_path)
    whole = (release / DIT).read_bytes()
    (tmp_path / T2V / DIT).write_bytes(whole[:1000])  # an interrupted copy
    with pytest.raises(ModelFilesMissing, match=f"{DIT} is truncated: 1,000 of"):
        config.resolve(tmp_path, skip_download=True)
    assert config.resolve(tmp_path) == [tmp_path / T2V / DIT]
    assert (tmp_path / T2V / DIT).read_bytes() == whole
    assert hub.downloads.count(f"{T2V}/{DIT}") == 2


def test_the_hub_repository_id_names_the_folder(tmp_path, hub, release):
    config = ModelConfig(model_id="alibaba-pai/Wan2.1-Fun-1.3B-InP", origin_file_pattern=VAE_FILE,
                         download_source="HuggingFace")
    assert config.resolve(tmp_path) == [tmp_path / "alibaba-pai/Wan2.1-Fun-1.3B-InP" / VAE_FILE]


def test_offline_fails_fast_with_the_hf_command(tmp_path, hf_env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed local port: the real probe runs
    start = time.perf_counter()
    with pytest.raises(ModelFilesMissing) as info:
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE, download_source="hf").resolve(tmp_path)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "HuggingFace is unreachable: cannot connect to 127.0.0.1:9" in message
    assert f"hf download {T2V} --include {VAE_FILE} --local-dir {tmp_path / T2V}" in message
    assert info.value.missing == [VAE_FILE] and info.value.local_dir == tmp_path / T2V


def test_hf_hub_offline_fails_fast(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesMissing, match="HuggingFace is unreachable: HF_HUB_OFFLINE is set"):
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE, download_source="hf").resolve(tmp_path)
    assert hub.downloads == []


def test_a_file_the_repository_lacks_is_reported(tmp_path, hub):
    with pytest.raises(ModelFilesMissing, match="brought no file matching") as info:
        ModelConfig(model_id=T2V, origin_file_pattern="no_such_file.pth", download_source="hf").resolve(tmp_path)
    assert "hf download" in str(info.value) and hub.downloads == []


# ---------------------------------------------------------------- choosing the hub


def test_spellings_and_the_default(hf_env, monkeypatch):
    for value in ("HuggingFace", "huggingface", "HF", "hf", " Hf "):
        assert ModelConfig(model_id=T2V, download_resource=value).hub == hubs.HUGGINGFACE
        assert ModelConfig(model_id=T2V, download_source=value).hub == hubs.HUGGINGFACE
    assert ModelConfig(model_id=T2V, download_source="MODELSCOPE").hub == hubs.MODELSCOPE
    assert ModelConfig(model_id=T2V).hub == hubs.MODELSCOPE
    monkeypatch.setenv(hubs.ENV_VAR, "huggingface")
    assert ModelConfig(model_id=T2V).hub == hubs.HUGGINGFACE
    assert ModelConfig(model_id=T2V, download_source="modelscope").hub == hubs.MODELSCOPE  # the field wins


def test_unknown_values_are_clear_errors(hf_env, monkeypatch):
    expected = "expected one of 'ModelScope', 'HuggingFace', 'hf'"
    with pytest.raises(ValueError, match=f"download_source='civitai' is not a hub; {expected}"):
        ModelConfig(model_id=T2V, download_source="civitai")
    with pytest.raises(ValueError, match=f"download_resource='' is not a hub; {expected}"):
        ModelConfig(model_id=T2V, download_resource="")
    with pytest.raises(ValueError, match="name different hubs"):
        ModelConfig(model_id=T2V, download_resource="ModelScope", download_source="huggingface")
    monkeypatch.setenv(hubs.ENV_VAR, "gitee")
    with pytest.raises(ValueError, match=rf"\$DIFFSYNTH_DOWNLOAD_SOURCE='gitee' is not a hub; {expected}"):
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve("unused", skip_download=True)


def test_with_download_source_fills_only_configs_naming_no_hub(hf_env):
    configs = [ModelConfig(model_id=T2V), ModelConfig(model_id=T2V, download_resource="ModelScope"),
               ModelConfig(path="a.pth")]
    out = with_download_source(configs, "hf")
    assert [c.hub for c in out] == [hubs.HUGGINGFACE, hubs.MODELSCOPE, hubs.HUGGINGFACE]
    assert configs[0].download_source is None and all(a is not b for a, b in zip(out, configs))
    assert [c.hub for c in with_download_source(configs, None)] == [hubs.MODELSCOPE] * 3


def test_from_pretrained_passes_download_source_to_its_configs(hf_env, monkeypatch):
    from wan_runtime.model_config import ModelConfig as Config
    from wan_runtime.pipeline import WanVideoPipeline

    seen = []

    def resolve(self, *args, **kwargs):
        seen.append((self.model_id, self.hub))
        raise ModelFilesMissing("stop here", missing=[], local_dir=None)

    monkeypatch.setattr(Config, "resolve", resolve)
    config = ModelConfig(model_id="alibaba-pai/Wan2.1-Fun-1.3B-InP", origin_file_pattern=T5_FILE)
    with pytest.raises(ModelFilesMissing, match="stop here"):
        WanVideoPipeline.from_pretrained(device="cpu", model_configs=[config], download_source="huggingface",
                                         progress_bar_cmd=lambda x: x)
    assert seen == [(T2V, hubs.HUGGINGFACE)]  # redirected to the shared files' home, on the same hub
    assert config.download_source is None


def test_redirects_keep_the_hub(hf_env):
    configs = [ModelConfig(model_id="alibaba-pai/Wan2.1-Fun-1.3B-InP", origin_file_pattern=p, download_source="hf")
               for p in (DIT_FILES, T5_FILE, CLIP_FILE)]
    out = redirect_common_files(configs)
    assert [c.model_id for c in out] == ["alibaba-pai/Wan2.1-Fun-1.3B-InP", T2V, "Wan-AI/Wan2.1-I2V-14B-480P"]
    assert {c.hub for c in out} == {hubs.HUGGINGFACE}


# ---------------------------------------------------------------- the registry and the CLI


def test_registry_ids_per_hub():
    fun = [spec for name, spec in wan_models.MODELS.items() if name.startswith("Wan2.1-Fun-")]
    assert len(fun) == 8
    for spec in fun:
        assert spec.model_id == f"PAI/{spec.name}" and spec.hf_id == f"alibaba-pai/{spec.name}"
    preview = wan_models.get_model_spec("Wan2.1-VACE-1.3B-Preview")
    assert (preview.model_id, preview.hf_id) == ("iic/VACE-Wan2.1-1.3B-Preview", "ali-vilab/VACE-Wan2.1-1.3B-Preview")
    for spec in wan_models.MODELS.values():
        if spec.model_id.startswith(("Wan-AI/", "DiffSynth-Studio/")):
            assert spec.hf_id == spec.model_id


def test_registry_source_uses_the_hubs_ids(hf_env, monkeypatch):
    source = registry_source("Wan2.1-Fun-V1.1-1.3B-Control-Camera", "hf")
    assert {c.model_id for c in source.model_configs + [source.tokenizer_config]} == \
        {"alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control-Camera"}
    assert {c.hub for c in source.model_configs} == {hubs.HUGGINGFACE}
    assert registry_source("Wan2.1-Fun-V1.1-1.3B-Control-Camera").tokenizer_config.model_id == \
        "PAI/Wan2.1-Fun-V1.1-1.3B-Control-Camera"
    speed = registry_source("Wan2.1-1.3B-speedcontrol-v1", "huggingface")
    assert [c.model_id for c in speed.model_configs][-1] == "DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1"
    monkeypatch.setenv(hubs.ENV_VAR, "HuggingFace")
    assert registry_source("Wan2.1-VACE-1.3B-Preview").tokenizer_config.model_id == \
        "ali-vilab/VACE-Wan2.1-1.3B-Preview"
    with pytest.raises(ValueError, match="--source='s3' is not a hub"):
        registry_source("Wan2.1-T2V-1.3B", "s3")


def _wan(capsys, *args: str) -> tuple[int, str, str]:
    """``wan ARGS`` in this process (exit code, stdout, stderr): the fake Hub runs in this process too."""
    from wan_cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_wan_download_source_huggingface(tmp_path, hub, release, capsys, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")  # ModelScope offline: a closed local port
    code, out, err = _wan(capsys, "download", "Wan2.1-T2V-1.3B", "--local-dir", str(tmp_path), "--source", "hf")
    assert code == 0, err
    assert out.splitlines()[-1] == f"Wan2.1-T2V-1.3B is complete under {tmp_path}"
    for rel in (DIT, T5_FILE, VAE_FILE):
        assert (tmp_path / T2V / rel).read_bytes() == (release / rel).read_bytes()
    # the env variable chooses the hub when --source is not given; --source wins over it
    monkeypatch.setenv(hubs.ENV_VAR, "huggingface")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, out, err = _wan(capsys, "download", "Wan2.1-T2V-14B", "--local-dir", str(tmp_path))
    assert code == 1 and "HuggingFace is unreachable" in err and "hf download Wan-AI/Wan2.1-T2V-14B" in err
    code, out, err = _wan(capsys, "download", "Wan2.1-T2V-14B", "--local-dir", str(tmp_path), "--source", "ModelScope")
    assert code == 1 and "ModelScope is unreachable" in err and "modelscope download --model" in err
    code, out, err = _wan(capsys, "download", "Wan2.1-T2V-1.3B", "--source", "s3")
    assert code == 2 and "--source='s3' is not a hub; expected one of 'ModelScope', 'HuggingFace', 'hf'" in err
