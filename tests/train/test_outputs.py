"""The outputs of a run: the folder checked before anything loads, a full disk or a kill while a
checkpoint is written leaves no half-written file and ends with one error line, never a traceback.

The write failures are real: ``python -m wan_train`` runs in a subprocess under a file size limit
(``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored), so writes past the limit fail with ``EFBIG`` just as
they fail with ``ENOSPC`` on a full disk, in the same write calls.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from wan_train import main
from wan_train.args import TrainingError
from wan_train.state import STATE_DIR, _load_own

from train.support import model_paths, train_argv

LORA = ("--lora_base_model", "dit", "--lora_rank", "4")


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and unfinished resume states under ``folder``."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".wan-write-check" in p.name]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable", "cannot be created"])
def test_output_folder_checked_before_anything_loads(case: str, release: Path, dataset: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The output folder is created and a file written in it first: its error comes before the missing
    model file's and the dataset's, so no time goes into loading or checking first."""
    (tmp_path / "file").write_text("x")
    # The tests run as root, which writes into a chmod 0o555 folder all the same. sysfs takes no new files
    # or folders from anyone (EACCES / EPERM, or EROFS where /sys is mounted read-only): a folder that is
    # really not writable, with no mount needed.
    output, expected = {
        "a file": (tmp_path / "file", f"--output_path {tmp_path / 'file'} is a file, not a folder"),
        "under a file": (tmp_path / "file" / "out", f"--output_path {tmp_path / 'file' / 'out'}: cannot create the "
                                                     "folder (Not a directory)"),
        "not writable": (Path("/sys"), "--output_path /sys: cannot write files in this folder ("),
        "cannot be created": (Path("/sys/wan-train-output"), "--output_path /sys/wan-train-output: cannot create "
                                                              "the folder ("),
    }[case]
    argv = train_argv(release, dataset, output, *LORA, metadata="missing.csv",
                      paths=model_paths(release, tmp_path / "missing.safetensors"))
    with caplog.at_level(logging.ERROR, logger="wan_train"), pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and expected in errors[0] and "missing" not in caplog.text, errors

    caplog.clear()
    cache = tmp_path / "file" / "cache"
    with caplog.at_level(logging.ERROR, logger="wan_train"), pytest.raises(SystemExit):
        main(train_argv(release, dataset, tmp_path / "out", "--cache_latents", str(cache)))
    assert f"--cache_latents {cache}: cannot create the folder (Not a directory)" in caplog.text
    assert not (tmp_path / "out").exists()


def test_other_input_errors_are_one_line(release: Path, dataset: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """An OSError from a library (here the runtime's: a tokenizer folder without a tokenizer) reaching
    ``main`` is one error line and status 2, not a traceback."""
    (tmp_path / "tokenizer").mkdir()
    with caplog.at_level(logging.ERROR, logger="wan_train"), pytest.raises(SystemExit) as info:
        main(train_argv(release, dataset, tmp_path / "out", *LORA, "--tokenizer_path", str(tmp_path / "tokenizer")))
    assert info.value.code == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(tmp_path / "tokenizer") in errors[0].getMessage() and not errors[0].exc_info


def _file_size_limit(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process; ignored, writes fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


# Sizes in this run (LoRA rank 4 of the tiny DiT): a log line 82 bytes, epoch-0.safetensors 25 kB, the resume
# state's weights.safetensors 26 kB and optimizer.pt 76 kB.
@pytest.mark.parametrize("written, limit", [("train_log.jsonl", 40), ("epoch-0.safetensors", 10_000),
                                            ("optimizer.pt", 40_000)])
def test_full_disk_while_writing(written: str, limit: int, release: Path, dataset: Path, tmp_path: Path) -> None:
    """The write of ``written`` fails part-way: status 2, one error line naming it, no traceback, nothing
    half-written left (the log keeps whole lines only, the unfinished resume state folder is removed)."""
    out = tmp_path / "out"
    argv = train_argv(release, dataset, out, *LORA, metadata="one.csv")
    run = subprocess.run([sys.executable, "-m", "wan_train", *argv], capture_output=True, text=True, timeout=300,
                         preexec_fn=_file_size_limit(limit))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = error_lines(run.stderr)
    assert len(errors) == 1, errors
    assert f"cannot write {out}" in errors[0] and f"{written} (" in errors[0], errors[0]
    assert "the disk may be full" in errors[0] and "or a file size limit reached" in errors[0]
    assert not leftovers(out), leftovers(out)
    log = (out / "train_log.jsonl").read_text()
    assert all(json.loads(line) for line in log.splitlines()) and log.endswith("\n") == bool(log)
    if written == "train_log.jsonl":
        assert log == "" and not (out / "epoch-0.safetensors").exists()
    elif written == "epoch-0.safetensors":
        assert len(log.splitlines()) == 1 and not (out / "epoch-0.safetensors").exists()
    else:  # the checkpoint is complete; the resume state was not, so there is none
        assert len([key for key in load_file(out / "epoch-0.safetensors") if key.endswith(".weight")]) == 40
        assert list((out / STATE_DIR).iterdir()) == []


# python -m wan_train with its checkpoint write held up once the temporary file is written, just
# before the rename, so that the signal arrives at a known moment of the write.
PAUSED_SAVE = """
import runpy, sys, time
import safetensors.torch
import wan_train.state as state

def paused_save_file(tensors, path, metadata=None):
    real_save_file(tensors, path, metadata=metadata)
    print("WRITTEN", path, flush=True)
    time.sleep(300)

# state's own import and the module's (wan_runtime.lora.layouts.save_lora imports it when it writes)
real_save_file = state.save_file
state.save_file = safetensors.torch.save_file = paused_save_file
sys.argv[0] = "wan_train"
runpy.run_module("wan_train", run_name="__main__")
"""


@pytest.mark.parametrize("signum, status, message", [(signal.SIGTERM, 143, "terminated (SIGTERM): stopped"),
                                                     (signal.SIGINT, 130, "interrupted: stopped")])
def test_signal_during_checkpoint_write_removes_it(signum: int, status: int, message: str, release: Path,
                                                   dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = train_argv(release, dataset, out, *LORA, metadata="one.csv")
    with subprocess.Popen([sys.executable, "-c", PAUSED_SAVE, *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            line = "other output (DeepSpeed prints a warning on stdout)"
            while line and not line.startswith("WRITTEN "):
                line = process.stdout.readline()
            assert line, process.communicate(timeout=60)[1]
            temporary = Path(line.split(" ", 1)[1].strip())
            assert temporary.parent == out and temporary.name.startswith(".epoch-0.safetensors.")
            assert temporary.is_file()
            os.kill(process.pid, signum)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == 1 and message in errors[0], errors
    assert not temporary.exists() and not (out / "epoch-0.safetensors").exists()
    assert not leftovers(out), leftovers(out)


def test_a_damaged_resume_file_is_one_line_without_torchs_advice(tmp_path: Path) -> None:
    """A resume file holding a foreign class (or cut short) is refused without suggesting weights_only=False."""
    foreign = tmp_path / "optimizer.pt"
    foreign.write_bytes(pickle.dumps(Path("x")))  # a pickle of a non-tensor class, as a tampered file would be
    cut = tmp_path / "rng-0.pt"
    torch.save({"python": [1, 2, 3]}, cut)
    cut.write_bytes(cut.read_bytes()[:60])
    for path in (foreign, cut):
        with pytest.raises(TrainingError) as error:
            _load_own(path)
        message = str(error.value)
        assert message.startswith(f"--resume: cannot read {path}: ") and "weights_only" not in message
