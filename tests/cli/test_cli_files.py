"""``wan models``/``download``/``info``/``convert`` on damaged files, through the real entry point:
truncated and foreign files, NaN weights, a corrupt config.json, a missing folder and a full disk.
Each failure is one ``error:`` line naming the file, with no traceback and nothing half-written."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from wan_runtime import manifest, tiny_release

T2V = "Wan-AI/Wan2.1-T2V-1.3B"
DIT = "diffusion_pytorch_model.safetensors"
VAE = "Wan2.1_VAE.pth"
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def wan(*args: str, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MODELSCOPE_ENDPOINT="http://127.0.0.1:9")  # offline: a closed local port
    return subprocess.run([sys.executable, "-m", "wan_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=preexec_fn)


def one_error(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed command (asserting there is no traceback)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def release_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_release.write_release(root, "Wan2.1-T2V-1.3B")
    return root


@pytest.fixture
def models(release_root, tmp_path) -> Path:
    """A models folder holding a copy of the tiny T2V release, free to damage."""
    shutil.copytree(release_root, tmp_path / "models")
    return tmp_path / "models"


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_models_marks_truncated_files_incomplete(models) -> None:
    repo = models / T2V
    dit_size = (repo / DIT).stat().st_size
    _cut(repo / DIT, 100_000)
    _cut(repo / VAE, 2_000)
    result = wan("models", "--local-dir", str(models))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "(+ present, ! incomplete, - missing)" in lines[0]
    row = next(line for line in lines if line.startswith("Wan2.1-T2V-1.3B "))
    assert "!diffusion_pytorch_model*.safetensors" in row and "!Wan2.1_VAE.pth" in row
    assert "+models_t5_umt5-xxl-enc-bf16.pth" in row and "+google/umt5-xxl/" in row
    notes = [line for line in lines if line.startswith("! ")]
    assert notes == [
        f"! {models / T2V / 'diffusion_pytorch_model*.safetensors'}: {DIT} is truncated: 100,000 of the "
        f"{dit_size:,} bytes its header describes (`wan download` fetches it again)",
        f"! {models / T2V / VAE}: truncated: a zip archive without its end record (2,000 bytes) "
        "(`wan download` fetches it again)"]  # the shared VAE is listed once, though every row needs it


def test_models_on_a_folder_that_does_not_exist_is_an_error(tmp_path) -> None:
    result = wan("models", "--local-dir", str(tmp_path / "modles"))
    assert one_error(result) == f"error: --local-dir {tmp_path / 'modles'}: no such folder"
    assert result.stdout == ""


def test_download_never_calls_an_incomplete_model_complete(models) -> None:
    repo = models / T2V
    whole = (repo / DIT).read_bytes()
    _cut(repo / DIT, 100_000)
    result = wan("download", "Wan2.1-T2V-1.3B", "--local-dir", str(models))
    assert "is complete" not in result.stdout
    assert f"missing: diffusion_pytorch_model*.safetensors ({DIT} is truncated: 100,000 of the {len(whole):,} bytes" \
        in one_error(result)
    assert "ModelScope is unreachable" in result.stderr
    (repo / DIT).write_bytes(whole)
    result = wan("download", "Wan2.1-T2V-1.3B", "--local-dir", str(models))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"Wan2.1-T2V-1.3B is complete under {models}"


def test_download_verify_checks_the_hubs_sha256(models) -> None:
    repo = models / T2V
    entries = {rel: manifest.Entry(p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
               for p in repo.rglob("*") if p.is_file() and not (rel := p.relative_to(repo).as_posix()).startswith(".")}
    manifest.write(repo, T2V, entries)
    result = wan("download", "Wan2.1-T2V-1.3B", "--local-dir", str(models), "--verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"Wan2.1-T2V-1.3B is complete under {models} (sha256 verified for 7 of 7 files)"
    data = bytearray((repo / DIT).read_bytes())
    data[-5] ^= 0x01  # a flipped bit in the weights: same size, same header
    (repo / DIT).write_bytes(bytes(data))
    assert wan("download", "Wan2.1-T2V-1.3B", "--local-dir", str(models)).returncode == 0  # cheap checks pass
    result = wan("download", "Wan2.1-T2V-1.3B", "--local-dir", str(models), "--verify")
    assert f"missing: diffusion_pytorch_model*.safetensors ({DIT} is corrupt: its sha256 differs from the hub's)" \
        in one_error(result)


def test_info_reports_non_finite_tensors(models) -> None:
    path = models / T2V / DIT
    result = wan("info", str(path))
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "finite:   all finite"
    sd = load_file(path)
    key = "blocks.0.cross_attn.k.weight"
    sd[key].view(-1)[:2] = float("nan")
    sd[key].view(-1)[5] = float("inf")
    save_file(sd, str(path))
    result = wan("info", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (f"finite:   NO: 1 tensor holds NaN/inf values: {key} "
                                              f"(3 of {sd[key].numel():,} values)")
    # Loading it for generation refuses it, naming the file, the tensor and the count.
    result = wan("generate", "-m", str(models / T2V), "-p", "a cat", "--height", "32", "--width", "32", "--frames",
                 "5", "--steps", "1", "--device", "cpu", "--dtype", "float32", "-q", "-o", str(models / "x.mp4"))
    assert one_error(result) == f"error: {path}: 1 tensor holds NaN/inf values: {key} (3 of {sd[key].numel():,} values)"
    assert not (models / "x.mp4").exists()


def test_info_names_foreign_files_and_corrupt_configs(models) -> None:
    noise = models / "noise.pth"
    noise.write_bytes(os.urandom(5000))
    error = one_error(wan("info", str(noise)))
    assert error == f"error: {noise}: not a torch checkpoint (neither a zip archive nor a pickle)"
    config = models / T2V / "config.json"
    config.write_text('{"dim": 32, "num_heads": 2,\n}')
    error = one_error(wan("info", str(models / T2V / DIT)))
    assert error == f"error: {config}: not valid JSON: Expecting property name enclosed in double quotes at line 2, column 1"
    config.write_text('{"num_heads": 3}')
    error = one_error(wan("info", str(models / T2V / DIT)))
    assert error == (f'error: {config}: "num_heads": 3 does not fit the weights of {models / T2V / DIT} '
                     "(dim 32 is not divisible by num_heads 3)")


def _full_disk_at(limit: int) -> Callable[[], None]:
    def apply() -> None:  # writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("to, name, existing", [("comfy", "dit_comfy.safetensors", False),
                                                ("diffusers", "transformer", False),
                                                ("diffusers", "transformer", True)])
def test_convert_on_a_full_disk_leaves_nothing_behind(models, tmp_path, to, name, existing) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / name
    if existing:  # an earlier conversion's folder: left as it was
        target.mkdir()
        (target / "config.json").write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = wan("convert", str(models / T2V / DIT), str(target), "--to", to, preexec_fn=_full_disk_at(50_000))
    assert one_error(result) == f"error: could not write {target}: File too large (is the disk full?)"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not existing or (target / "config.json").read_text() == "{}"
    result = wan("convert", str(models / T2V / DIT), str(target), "--to", to)  # with room, it works
    assert result.returncode == 0, result.stderr
    assert (target / DIT).is_file() if to == "diffusers" else target.is_file()


def test_write_errors_ask_about_the_disk_only_when_it_is_full() -> None:
    from safetensors import SafetensorError

    from wan_cli.convert import _write_error

    target = Path("out.safetensors")
    new = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    old = SafetensorError('Error while serializing: IoError(Os { code: 122, kind: FilesystemQuotaExceeded, '
                          'message: "Disk quota exceeded" })')
    assert str(_write_error(target, new)) == "could not write out.safetensors: No space left on device (is the disk full?)"
    assert str(_write_error(target, old)) == "could not write out.safetensors: Disk quota exceeded (is the disk full?)"
    denied = PermissionError(13, "Permission denied")
    assert str(_write_error(target, denied)) == "could not write out.safetensors: Permission denied"
