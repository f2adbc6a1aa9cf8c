"""ModelConfig: local paths, patterns resolved in the released layout, downloads of only what is missing,
truncated files counted as missing (download manifest, headers), the offline error, common-file
redirects and rank-0-only downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save as safetensors_bytes

from wan_runtime import tiny_release
from wan_models.configs import CLIP_FILE, DIT_FILES, T5_FILE, T5_TOKENIZER, VAE_FILE
from wan_runtime import manifest, model_config
from wan_runtime.model_config import ModelConfig, ModelFilesMissing, missing_files, redirect_common_files

T2V = "Wan-AI/Wan2.1-T2V-1.3B"
DIT = "diffusion_pytorch_model.safetensors"
I2V = "Wan-AI/Wan2.1-I2V-14B-480P"
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                   "no_proxy", "NO_PROXY")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_release.write_release(root, "Wan2.1-T2V-1.3B")
    tiny_release.write_release(root, "Wan2.1-I2V-14B-480P", shards=3)
    return root


ORIGINS = ("local", "downloaded")


def _content(rel: str, origin: str) -> bytes:
    """What a real file of this name could hold (a tiny .safetensors, a torch zip, text), marked with ``origin``."""
    marker = torch.full((4,), float(ORIGINS.index(origin)))
    if rel.endswith(".safetensors"):
        return safetensors_bytes({"w": marker})
    if rel.endswith(".pth"):
        buffer = io.BytesIO()
        torch.save({"w": marker}, buffer)
        return buffer.getvalue()
    return origin.encode()


def _origin(path: Path) -> str:
    """Which :func:`_content` wrote ``path``."""
    if path.suffix in (".safetensors", ".pth"):
        from wan_models import read_state_dict

        return ORIGINS[int(read_state_dict(path)["w"][0])]
    return path.read_text()


class FakeHub:
    """Stands in for ``modelscope.snapshot_download`` and ``HubApi().get_model_files``: records each
    download and writes the files asked for; lists each file's size and sha256."""

    def __init__(self, repo_files: list[str], fail: Exception | None = None) -> None:
        self.repo_files = repo_files
        self.fail = fail
        self.calls: list[dict] = []
        self.cut: dict[str, int] = {}  # file -> bytes a download writes of it (a download cut short)

    def snapshot_download(self, model_id, local_dir=None, allow_file_pattern=None, ignore_file_pattern=None,
                          **kwargs) -> str:
        import fnmatch

        self.calls.append(dict(model_id=model_id, local_dir=local_dir, allow_file_pattern=allow_file_pattern,
                               ignore_file_pattern=ignore_file_pattern, **kwargs))
        if self.fail is not None:
            raise self.fail
        for rel in self.repo_files:
            allowed = allow_file_pattern is None or any(fnmatch.fnmatch(rel, p) for p in allow_file_pattern)
            ignored = any(fnmatch.fnmatch(rel, p) for p in ignore_file_pattern or [])
            if allowed and not ignored:
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / rel).write_bytes(_content(rel, "downloaded")[: self.cut.get(rel)])
        return local_dir

    def get_model_files(self, model_id, recursive=False, **kwargs) -> list[dict]:
        assert recursive
        files = [{"Path": rel, "Size": len(data := _content(rel, "downloaded")),
                  "Sha256": hashlib.sha256(data).hexdigest()} for rel in self.repo_files]
        return files + [{"Path": "google", "Type": "tree", "Size": 0}]


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    """A reachable fake hub holding a T2V-like repository."""
    fake = FakeHub(["diffusion_pytorch_model.safetensors", "config.json", T5_FILE, VAE_FILE,
                    "google/umt5-xxl/spiece.model", "google/umt5-xxl/tokenizer.json"])
    module = types.ModuleType("modelscope")
    module.snapshot_download = fake.snapshot_download
    module.HubApi = lambda: fake
    monkeypatch.setitem(sys.modules, "modelscope", module)
    monkeypatch.setattr(model_config, "_hub_unreachable", lambda endpoint, timeout: None)
    return fake


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_content(name, "local"))


# ---------------------------------------------------------------- local paths


def test_path_single_file_list_and_folder(models_root):
    repo = models_root / T2V
    assert ModelConfig(path=str(repo / VAE_FILE)).resolve() == [repo / VAE_FILE]
    files = [str(repo / T5_FILE), str(repo / VAE_FILE)]
    assert ModelConfig(path=files).resolve() == [repo / T5_FILE, repo / VAE_FILE]
    assert ModelConfig(path=str(repo / T5_TOKENIZER)).resolve() == [repo / "google" / "umt5-xxl"]


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFilesMissing, match="model path.*not found") as info:
        ModelConfig(path=[str(tmp_path / "nope.pth")]).resolve()
    assert str(tmp_path / "nope.pth") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_config_without_files_is_rejected():
    with pytest.raises(ValueError, match="names no model files"):
        ModelConfig().resolve()
    with pytest.raises(ValueError, match="names no file"):
        ModelConfig(model_id=T2V, origin_file_pattern=[]).resolve(skip_download=True)


# ---------------------------------------------------------------- patterns in the released layout


def test_patterns_resolve_in_the_released_layout(models_root):
    def resolve(model_id, pattern):
        return ModelConfig(model_id=model_id, origin_file_pattern=pattern).resolve(models_root, skip_download=True)

    t2v, i2v = models_root / T2V, models_root / I2V
    assert resolve(T2V, DIT_FILES) == [t2v / "diffusion_pytorch_model.safetensors"]
    assert resolve(I2V, DIT_FILES) == [i2v / f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert resolve(I2V, CLIP_FILE) == [i2v / CLIP_FILE]
    assert resolve(T2V, [T5_FILE, VAE_FILE]) == [t2v / T5_FILE, t2v / VAE_FILE]
    # A pattern ending in "/" is a folder; the seed's default tokenizer pattern "google/*" matches it too.
    assert resolve(T2V, T5_TOKENIZER) == [t2v / "google" / "umt5-xxl"]
    assert resolve(T2V, "google/*") == [t2v / "google" / "umt5-xxl"]
    assert resolve(T2V, None) == resolve(T2V, "") == [t2v]


def test_relative_local_model_path_is_made_absolute(models_root, monkeypatch):
    monkeypatch.chdir(models_root)
    found = ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve("./", skip_download=True)
    assert found == [models_root / T2V / VAE_FILE] and found[0].is_absolute()


def test_skip_download_with_missing_files_says_what_where_and_how(tmp_path):
    _touch(tmp_path / T2V, VAE_FILE)
    config = ModelConfig(model_id=T2V, origin_file_pattern=[VAE_FILE, T5_FILE, T5_TOKENIZER])
    start = time.perf_counter()
    with pytest.raises(ModelFilesMissing) as info:
        config.resolve(tmp_path, skip_download=True)
    logging.getLogger(__name__).info("missing-files error after %.3f s", time.perf_counter() - start)
    message, local_dir = str(info.value), (tmp_path / T2V).absolute()
    assert info.value.missing == [T5_FILE, T5_TOKENIZER]
    assert info.value.local_dir == local_dir and info.value.model_id == T2V
    assert f"looked in: {local_dir}" in message and "skip_download=True" in message
    assert f"modelscope download --model {T2V} --include {T5_FILE} --local_dir {local_dir}" in message
    assert "--include 'google/umt5-xxl/*'" in message
    assert VAE_FILE not in message.split("looked in")[0]


def test_a_missing_shard_counts_as_missing(models_root, tmp_path):
    repo = tmp_path / I2V
    _touch(repo, *(f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 3)))
    with pytest.raises(ModelFilesMissing, match="1 shards absent: diffusion_pytorch_model-00002-of-00003"):
        ModelConfig(model_id=I2V, origin_file_pattern=DIT_FILES).resolve(tmp_path, skip_download=True)


# ---------------------------------------------------------------- downloads


def test_downloads_only_the_missing_files_into_root_model_id(tmp_path, hub):
    repo = tmp_path / T2V
    _touch(repo, VAE_FILE, "google/umt5-xxl/spiece.model")
    config = ModelConfig(model_id=T2V, origin_file_pattern=[DIT_FILES, VAE_FILE, T5_FILE])
    found = config.resolve(tmp_path)
    assert found == [repo / "diffusion_pytorch_model.safetensors", repo / VAE_FILE, repo / T5_FILE]
    assert len(hub.calls) == 1
    call = hub.calls[0]
    assert call["model_id"] == T2V and call["local_dir"] == str(repo.absolute())
    assert call["allow_file_pattern"] == [DIT_FILES, T5_FILE]
    assert _origin(repo / VAE_FILE) == "local"
    assert config.path is None  # resolve() leaves the config as it was


def test_download_skips_present_files_of_a_folder_or_shard_set(tmp_path, hub):
    repo = tmp_path / T2V
    _touch(repo, "google/umt5-xxl/spiece.model")
    # The folder is present (non-empty): nothing is fetched.
    ModelConfig(model_id=T2V, origin_file_pattern=T5_TOKENIZER).resolve(tmp_path)
    assert hub.calls == []
    # A split checkpoint with a shard missing: the pattern is fetched, the shard on disk is ignored.
    hub.repo_files += [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    _touch(repo, "diffusion_pytorch_model-00001-of-00002.safetensors")
    found = ModelConfig(model_id=T2V, origin_file_pattern="diffusion_pytorch_model-*.safetensors").resolve(tmp_path)
    assert [p.name for p in found] == [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert hub.calls[-1]["allow_file_pattern"] == ["diffusion_pytorch_model-*.safetensors"]
    assert hub.calls[-1]["ignore_file_pattern"] == ["diffusion_pytorch_model-00001-of-00002.safetensors"]
    assert _origin(repo / "diffusion_pytorch_model-00001-of-00002.safetensors") == "local"


def test_download_of_a_folder_pattern_and_the_whole_repository(tmp_path, hub):
    repo = tmp_path / T2V
    (repo / "google" / "umt5-xxl").mkdir(parents=True)  # an empty folder left by an aborted download
    assert ModelConfig(model_id=T2V, origin_file_pattern="google/*").resolve(tmp_path) == [repo / "google" / "umt5-xxl"]
    assert hub.calls[-1]["allow_file_pattern"] == ["google/*"] and hub.calls[-1]["ignore_file_pattern"] is None
    hub.calls.clear()
    (repo / "google" / "umt5-xxl" / "tokenizer.json").unlink()
    (repo / "google" / "umt5-xxl" / "spiece.model").unlink()
    tokenizer = ModelConfig(model_id=T2V, origin_file_pattern=T5_TOKENIZER)
    assert tokenizer.resolve(tmp_path) == [repo / "google" / "umt5-xxl"]
    assert hub.calls[-1]["allow_file_pattern"] == ["google/umt5-xxl/*"]
    assert ModelConfig(model_id=T2V).resolve(tmp_path / "other") == [tmp_path / "other" / T2V]
    assert hub.calls[-1]["allow_file_pattern"] is None


def test_nothing_is_downloaded_when_all_files_are_present(models_root, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the hub was contacted although every file is on disk")

    monkeypatch.setattr(model_config, "_hub_unreachable", boom)
    monkeypatch.setitem(sys.modules, "modelscope", None)  # importing it would fail
    config = ModelConfig(model_id=T2V, origin_file_pattern=[DIT_FILES, T5_FILE, VAE_FILE, T5_TOKENIZER])
    assert len(config.resolve(models_root)) == 4


def test_download_failure_becomes_the_missing_files_error(tmp_path, hub):
    hub.fail = ConnectionError("connection reset")
    with pytest.raises(ModelFilesMissing, match="download failed: ConnectionError: connection reset"):
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path)


def test_a_pattern_the_repository_lacks_is_reported(tmp_path, hub):
    with pytest.raises(ModelFilesMissing, match="brought no file matching"):
        ModelConfig(model_id=T2V, origin_file_pattern="no_such_file.pth").resolve(tmp_path)


def test_offline_fails_fast_without_calling_modelscope(tmp_path, monkeypatch):
    # A closed local port stands in for an unreachable hub: the real probe runs, no network needed.
    for proxy in PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "modelscope", None)
    start = time.perf_counter()
    with pytest.raises(ModelFilesMissing) as info:
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path)
    logging.getLogger(__name__).info("offline error after %.3f s", time.perf_counter() - start)
    assert "ModelScope is unreachable: cannot connect to 127.0.0.1:9" in str(info.value)
    assert f"--include {VAE_FILE}" in str(info.value)


def test_the_probe_goes_to_the_proxy_when_one_is_set(monkeypatch):
    for proxy in PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    reason = model_config._hub_unreachable("https://modelscope.cn", timeout=2.5)
    assert reason is not None and reason.startswith("cannot connect to 127.0.0.1:9")


def test_an_unknown_hub_is_rejected(tmp_path, hub):
    # ModelScope and the Hugging Face Hub are the hubs (tests/runtime/test_hf_download.py covers the latter).
    with pytest.raises(ValueError, match="download_resource='S3' is not a hub; expected one of 'ModelScope'"):
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE, download_resource="S3").resolve(tmp_path)
    assert hub.calls == []


# ---------------------------------------------------------------- incomplete files


def test_download_keeps_the_hubs_file_list_as_manifest(tmp_path, hub):
    ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path)
    entries = manifest.read(tmp_path / T2V)
    assert sorted(entries) == sorted(hub.repo_files)  # the folder entry is left out
    data = _content(VAE_FILE, "downloaded")
    assert entries[VAE_FILE] == manifest.Entry(len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / T2V / manifest.NAME).is_file()
    assert manifest.from_listing([{"Path": "a.bin", "Size": 3, "Sha256": "not a hash"}, {"Path": "", "Size": 1},
                                  {"Path": "b", "Size": True}]) == {"a.bin": manifest.Entry(3), "b": manifest.Entry(None)}


def test_a_truncated_file_is_downloaded_again(tmp_path, hub):
    repo = tmp_path / T2V
    _touch(repo, VAE_FILE, DIT)
    (repo / VAE_FILE).write_bytes((repo / VAE_FILE).read_bytes()[:-30])  # no manifest yet: its zip end record is gone
    found = ModelConfig(model_id=T2V, origin_file_pattern=[VAE_FILE, DIT]).resolve(tmp_path)
    assert found == [repo / VAE_FILE, repo / DIT]
    assert hub.calls[-1]["allow_file_pattern"] == [VAE_FILE] and hub.calls[-1]["ignore_file_pattern"] is None
    assert _origin(repo / VAE_FILE) == "downloaded" and _origin(repo / DIT) == "local"
    # With the manifest, a text file cut short is caught by its size.
    spiece, tokenizer = repo / "google/umt5-xxl/spiece.model", repo / "google/umt5-xxl/tokenizer.json"
    tokenizer.parent.mkdir(parents=True)
    tokenizer.write_text("downloaded")
    spiece.write_text("dow")
    assert missing_files(repo, [T5_TOKENIZER]) == {T5_TOKENIZER: "google/umt5-xxl/spiece.model is truncated: 3 of 10 bytes"}
    ModelConfig(model_id=T2V, origin_file_pattern=T5_TOKENIZER).resolve(tmp_path)
    assert spiece.read_text() == "downloaded"
    assert hub.calls[-1]["ignore_file_pattern"] == ["google/umt5-xxl/tokenizer.json"]


def test_a_download_cut_short_is_never_complete(tmp_path, hub):
    hub.cut[VAE_FILE] = 100
    with pytest.raises(ModelFilesMissing) as info:
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path)
    size = len(_content(VAE_FILE, "downloaded"))
    assert f"missing: {VAE_FILE} (truncated: 100 of {size:,} bytes)" in str(info.value)
    assert "not downloaded because the download left them incomplete (interrupted? run it again)" in str(info.value)
    assert info.value.missing == [VAE_FILE]


def test_offline_the_error_names_the_truncated_file_and_its_size(models_root, tmp_path):
    repo = tmp_path / I2V
    shutil.copytree(models_root / I2V, repo)
    shard = repo / "diffusion_pytorch_model-00002-of-00003.safetensors"
    whole = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:40_000])
    config = ModelConfig(model_id=I2V, origin_file_pattern=[DIT_FILES, VAE_FILE])
    with pytest.raises(ModelFilesMissing) as info:
        config.resolve(tmp_path, skip_download=True)
    assert info.value.missing == [DIT_FILES]
    assert (f"missing: {DIT_FILES} ({shard.name} is truncated: 40,000 of the {whole:,} bytes its header describes)"
            in str(info.value))
    # With a manifest, the size it lists is the one compared.
    manifest.write(repo, I2V, {shard.name: manifest.Entry(whole)})
    with pytest.raises(ModelFilesMissing, match=rf"{shard.name} is truncated: 40,000 of {whole:,} bytes\)"):
        config.resolve(tmp_path, skip_download=True)


def test_verify_compares_the_sha256(tmp_path, hub):
    ModelConfig(model_id=T2V, origin_file_pattern=DIT).resolve(tmp_path)
    path = tmp_path / T2V / DIT
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, same header: only the hash tells
    path.write_bytes(bytes(data))
    assert ModelConfig(model_id=T2V, origin_file_pattern=DIT).resolve(tmp_path, skip_download=True) == [path]
    with pytest.raises(ModelFilesMissing, match=r"missing: diffusion_pytorch_model.safetensors \(corrupt: its sha256 "
                                                r"differs from the hub's\)"):
        ModelConfig(model_id=T2V, origin_file_pattern=DIT).resolve(tmp_path, skip_download=True, verify=True)
    ModelConfig(model_id=T2V, origin_file_pattern=DIT).resolve(tmp_path, verify=True)  # fetched again
    assert path.read_bytes() == _content(DIT, "downloaded")


def test_files_the_manifest_lists_must_all_be_there(tmp_path, hub):
    repo = tmp_path / T2V
    ModelConfig(model_id=T2V, origin_file_pattern=T5_TOKENIZER).resolve(tmp_path)
    (repo / "google/umt5-xxl/tokenizer.json").unlink()  # a folder download interrupted half-way
    assert missing_files(repo, [T5_TOKENIZER, VAE_FILE]) == {
        T5_TOKENIZER: "absent: google/umt5-xxl/tokenizer.json", VAE_FILE: ""}


def test_a_hub_without_file_list_still_downloads(tmp_path, hub, caplog):
    def refuse(*args, **kwargs):
        raise ConnectionError("listing refused")

    hub.get_model_files = refuse
    with caplog.at_level(logging.WARNING, logger="wan_runtime.model_config"):
        assert ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path)
    assert "could not list the files of Wan-AI/Wan2.1-T2V-1.3B on ModelScope (ConnectionError: listing refused)" in (
        caplog.text)
    assert not (tmp_path / T2V / manifest.NAME).exists()


# ---------------------------------------------------------------- use_usp


def test_use_usp_other_ranks_do_not_download_but_wait(tmp_path, hub, monkeypatch):
    barriers = []
    monkeypatch.setattr(model_config, "_usp_rank", lambda use_usp: 1 if use_usp else None)
    monkeypatch.setattr(model_config, "_barrier", lambda: barriers.append(1))
    with pytest.raises(ModelFilesMissing, match="rank 1 does not download"):
        ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path, use_usp=True)
    assert hub.calls == [] and barriers == [1]
    _touch(tmp_path / T2V, VAE_FILE)  # as rank 0 would have done before the barrier
    assert ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path, use_usp=True)
    assert barriers == [1, 1]


def test_use_usp_rank0_downloads_then_meets_the_barrier(tmp_path, hub):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        found = ModelConfig(model_id=T2V, origin_file_pattern=VAE_FILE).resolve(tmp_path, use_usp=True)
    finally:
        dist.destroy_process_group()
    assert found == [tmp_path / T2V / VAE_FILE] and len(hub.calls) == 1


# ---------------------------------------------------------------- redirects


def test_redirect_common_files(caplog):
    configs = [ModelConfig(model_id="PAI/Wan2.1-Fun-1.3B-InP", origin_file_pattern=DIT_FILES),
               ModelConfig(model_id="PAI/Wan2.1-Fun-1.3B-InP", origin_file_pattern=T5_FILE),
               ModelConfig(model_id="PAI/Wan2.1-Fun-1.3B-InP", origin_file_pattern=VAE_FILE),
               ModelConfig(model_id="PAI/Wan2.1-Fun-1.3B-InP", origin_file_pattern=CLIP_FILE),
               ModelConfig(model_id=T2V, origin_file_pattern=T5_FILE),
               ModelConfig(path="local/" + T5_FILE)]
    before = [dataclasses.replace(c) for c in configs]
    with caplog.at_level(logging.INFO, logger="wan_runtime.model_config"):
        out = redirect_common_files(configs)
    assert [c.model_id for c in out] == ["PAI/Wan2.1-Fun-1.3B-InP", T2V, T2V, I2V, T2V, None]
    assert [c.origin_file_pattern for c in out] == [c.origin_file_pattern for c in before]
    assert configs == before and all(a is not b for a, b in zip(out, configs))
    redirects = [r.getMessage() for r in caplog.records if "redirecting" in r.getMessage()]
    assert len(redirects) == 3 and CLIP_FILE in redirects[2] and I2V in redirects[2]
