"""Where a model's files come from: local paths, or a ModelScope or Hugging Face Hub repository fetched on demand.

:class:`ModelConfig` keeps the seed's (DiffSynth's) field names and meaning. ``path=`` names local
file(s) or a folder; otherwise ``model_id`` + ``origin_file_pattern`` name files of a repository on
the hub that ``download_resource`` (or DiffSynth 2.x's ``download_source``, or
``$DIFFSYNTH_DOWNLOAD_SOURCE``; ModelScope by default) names, which :meth:`ModelConfig.resolve`
looks for under ``local_model_path/model_id/`` and downloads only when some are missing (only
those). A file that is there but cut short (its size differs from the hub's, recorded at download
time in a manifest, or its header or end record shows it truncated; see :mod:`wan_runtime.manifest`)
counts as missing and is fetched again. Offline, it fails within seconds with a
:class:`ModelFilesMissing` that says what is missing or incomplete, where it looked and how to place
it by hand.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import logging
import os
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import torch

from wan_models.configs import CLIP_FILE, T5_FILE, VAE_FILE

from . import hubs, manifest

logger = logging.getLogger(__name__)

__all__ = ["COMMON_FILES", "COMMON_FILES_BY_HUB", "ModelConfig", "ModelFilesMissing", "missing_files",
           "redirect_common_files", "with_download_source"]

# The shared files are identical in every Wan 2.1 repository; fetching them from one place avoids
# downloading the same 11 GB again for each model.
COMMON_FILES: dict[str, str] = {
    T5_FILE: "Wan-AI/Wan2.1-T2V-1.3B",
    VAE_FILE: "Wan-AI/Wan2.1-T2V-1.3B",
    CLIP_FILE: "Wan-AI/Wan2.1-I2V-14B-480P",
}
# Their home repository on each hub (the Wan-AI repositories have the same ids on both).
COMMON_FILES_BY_HUB: dict[str, dict[str, str]] = {
    hubs.MODELSCOPE: COMMON_FILES,
    hubs.HUGGINGFACE: {T5_FILE: "Wan-AI/Wan2.1-T2V-1.3B", VAE_FILE: "Wan-AI/Wan2.1-T2V-1.3B",
                       CLIP_FILE: "Wan-AI/Wan2.1-I2V-14B-480P"},
}

# How long the reachability probe may take before the hub counts as unreachable. The hub clients
# retry for ~20 s when offline; the probe answers in this time instead.
PROBE_TIMEOUT_S = 2.5

# ``name-00001-of-00006.safetensors``: one shard of a checkpoint split across files.
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<suffix>\.[^/]+)$")


class ModelFilesMissing(FileNotFoundError):
    """Model files that are neither on disk (whole) nor downloadable now.

    ``missing`` lists the patterns (or paths) not found or incomplete, ``local_dir`` the absolute
    folder searched.
    """

    def __init__(self, message: str, *, missing: list[str], local_dir: Path | None,
                 model_id: str | None = None) -> None:
        super().__init__(message)
        self.missing = missing
        self.local_dir = local_dir
        self.model_id = model_id


@dataclass
class ModelConfig:
    """One model file set: ``path=`` local file(s)/folder, or ``model_id`` + ``origin_file_pattern``.

    ``origin_file_pattern`` is a glob relative to the repository root (or a list of them); one
    ending in ``/`` names a folder; ``None`` or ``""`` the whole repository. ``download_resource``
    (or its DiffSynth 2.x name ``download_source``) is the hub ``model_id`` lives on: "ModelScope" or
    "HuggingFace" ("hf"), any case; None: ``$DIFFSYNTH_DOWNLOAD_SOURCE``, else ModelScope.
    ``offload_device``/``offload_dtype`` say where and in which dtype the pipeline keeps the loaded
    network (None: the pipeline's).
    """

    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    download_resource: str | None = None
    offload_device: str | torch.device | None = None
    offload_dtype: torch.dtype | None = None
    download_source: str | None = None

    def __post_init__(self) -> None:
        named = {field: hubs.normalize(value, field) for field in ("download_resource", "download_source")
                 if (value := getattr(self, field)) is not None}
        if len(set(named.values())) > 1:
            raise ValueError(f"download_resource={self.download_resource!r} and download_source="
                             f"{self.download_source!r} name different hubs; pass only one of them")

    @property
    def hub(self) -> str:
        """The hub ``model_id`` is fetched from: "ModelScope" or "HuggingFace" (see the class docstring)."""
        value = self.download_source or self.download_resource
        return hubs.normalize(value) if value is not None else hubs.default_source()

    def resolve(self, local_model_path: str | os.PathLike = "./models", skip_download: bool = False,
                use_usp: bool = False, verify: bool = False) -> list[Path]:
        """The local files (or the one folder, for a folder pattern), downloading missing ones.

        Files go to ``local_model_path/model_id/``; whole files are never fetched again, incomplete
        ones are, and ``skip_download=True`` uses only what is on disk. ``verify=True`` also compares
        each file's sha256 with the hub's, where the download manifest has it (reads every byte).
        With ``use_usp=True`` under an initialised ``torch.distributed`` group only rank 0 downloads
        and every rank waits at a barrier. Unlike the seed's ``download_if_necessary`` this does not
        change ``self``.
        """
        if self.path is not None:
            return self._local_paths()
        if not self.model_id:
            raise ValueError("ModelConfig names no model files: pass path=<local file or folder>, or "
                             "model_id=<owner/name> with origin_file_pattern=<glob>")
        local_dir = Path(local_model_path).expanduser().absolute() / self.model_id
        patterns = self._patterns()
        rank = _usp_rank(use_usp)
        missing, incomplete = _check(local_dir, patterns, verify)
        failure: ModelFilesMissing | None = None
        downloaded = False
        if skip_download:
            reason = "skip_download=True"
        elif rank not in (None, 0):
            reason = f"rank {rank} does not download (use_usp=True) and rank 0 did not place them"
        else:
            reason = "the download brought no file matching them: check model_id and origin_file_pattern"
            if missing:
                try:
                    self._download(local_dir, missing, incomplete)
                    downloaded = True
                except ModelFilesMissing as e:
                    failure = e
        if rank is not None:
            _barrier()  # every rank, whatever it found, so that none waits for a rank that skipped it
        if failure is not None:
            raise failure
        missing = missing_files(local_dir, patterns, verify=verify)
        if missing:
            if downloaded and any(missing.values()):
                reason = "the download left them incomplete (interrupted? run it again)"
            raise self._missing_error(local_dir, missing, reason)
        return _matches(local_dir, patterns)

    def _local_paths(self) -> list[Path]:
        paths = [Path(p).expanduser() for p in ([self.path] if isinstance(self.path, (str, os.PathLike))
                                                else self.path)]
        if not paths:
            raise ValueError("ModelConfig(path=[]) names no file")
        absent = [str(p.absolute()) for p in paths if not p.exists()]
        if absent:
            raise ModelFilesMissing(f"model path(s) not found: {', '.join(absent)}; ModelConfig(path=...) uses "
                                    "local files as given and downloads nothing (use model_id= and "
                                    "origin_file_pattern= to download)", missing=absent, local_dir=None)
        return paths

    def _patterns(self) -> list[str]:
        """Patterns as a list; ``[""]`` stands for the whole repository."""
        pattern = self.origin_file_pattern
        patterns = [pattern] if pattern is None or isinstance(pattern, str) else list(pattern)
        if not patterns:
            raise ValueError(f"origin_file_pattern=[] names no file of {self.model_id}; use None for the whole "
                             "repository")
        return [p or "" for p in patterns]

    def _download(self, local_dir: Path, missing: dict[str, str], incomplete: dict[str, str]) -> None:
        """Fetch from the hub the files matching the ``missing`` patterns (whole ones skipped).

        The hub's file list is kept first as the folder's manifest. The ``incomplete`` files, and
        those that fail the new manifest's size check, are deleted so that the hub client fetches
        them again (it would keep a file of the right size).
        """
        hub = self.hub
        unreachable = hubs.offline_reason(hub) or _hub_unreachable(hubs.endpoint(hub), PROBE_TIMEOUT_S)
        if unreachable:
            raise self._missing_error(local_dir, missing, f"{hub} is unreachable: {unreachable}")
        problem = hubs.client_problem(hub)
        if problem:
            raise self._missing_error(local_dir, missing, problem)
        allow = [_allow_pattern(p) for p in missing]
        allow_arg = None if None in allow else allow
        local_dir.mkdir(parents=True, exist_ok=True)
        expected = self._record_manifest(local_dir)
        present = []
        for rel in _present_files(local_dir, allow_arg):
            problem = incomplete.get(rel) or manifest.problem(local_dir / rel, expected.get(rel))
            if problem:
                logger.warning("%s is incomplete (%s): deleting it to download it again", local_dir / rel, problem)
                (local_dir / rel).unlink()
            else:
                present.append(rel)
        logger.info("downloading %s (%s) from %s into %s%s", self.model_id,
                    ", ".join(p or "whole repository" for p in missing), hub, local_dir,
                    f", skipping {len(present)} files already there" if present else "")
        try:
            hubs.download(hub, self.model_id, local_dir, allow_arg, present or None)
        except Exception as e:  # any failure of the hub client leaves the same remedy: place the files by hand
            raise self._missing_error(local_dir, missing, f"download failed: {type(e).__name__}: {e}") from e

    def _record_manifest(self, local_dir: Path) -> dict[str, manifest.Entry]:
        """The hub's file list, written to the folder's manifest; the previous one if the hub does not answer."""
        try:
            entries = hubs.list_files(self.hub, self.model_id)
        except Exception as e:  # the download may still work; sizes are then checked against the old manifest
            logger.warning("could not list the files of %s on %s (%s: %s); downloading without that list",
                           self.model_id, self.hub, type(e).__name__, e)
            return manifest.read(local_dir)
        if entries:
            manifest.write(local_dir, self.model_id, entries)
        return entries

    def _missing_error(self, local_dir: Path, missing: dict[str, str], reason: str) -> ModelFilesMissing:
        what = "; ".join(f"{p or '(whole repository)'}{f' ({detail})' if detail else ''}"
                         for p, detail in missing.items())
        hub = self.hub
        commands = "\n".join(f"    {hubs.command(hub, self.model_id, _allow_pattern(p), local_dir)}" for p in missing)
        message = (f"model files of {self.model_id} missing: {what}\n"
                   f"  looked in: {local_dir}\n"
                   f"  not downloaded because {reason}\n"
                   f"  to place them by hand, run (here, or on a machine with internet access and copy the folder):\n"
                   f"{commands}\n"
                   f"  or copy the files into {local_dir} under their names in the repository")
        return ModelFilesMissing(message, missing=list(missing), local_dir=local_dir, model_id=self.model_id)


def redirect_common_files(configs: list[ModelConfig]) -> list[ModelConfig]:
    """Copies of ``configs`` with the shared T5/VAE/CLIP files taken from one repository each.

    A config whose ``origin_file_pattern`` is exactly one of :data:`COMMON_FILES` gets that file's
    home repository on its hub (:data:`COMMON_FILES_BY_HUB`) as ``model_id`` (logged); the caller's
    configs are left unchanged.
    """
    out = []
    for config in configs:
        pattern = config.origin_file_pattern
        target = None
        if isinstance(pattern, str) and pattern in COMMON_FILES and config.model_id is not None:
            target = COMMON_FILES_BY_HUB[config.hub][pattern]
        if target is not None and config.model_id != target:
            logger.info("redirecting (%s, %s) to (%s, %s): the file is the same in every Wan 2.1 repository; "
                        "pass redirect_common_files=False to keep it", config.model_id,
                        config.origin_file_pattern, target, config.origin_file_pattern)
            out.append(dataclasses.replace(config, model_id=target))
        else:
            out.append(dataclasses.replace(config))
    return out


def with_download_source(configs: Sequence[ModelConfig], source: str | None) -> list[ModelConfig]:
    """Copies of ``configs``, those naming no hub given ``source`` (None: left to the default hub)."""
    hub = hubs.normalize(source) if source is not None else None
    return [dataclasses.replace(c, download_source=hub)
            if hub is not None and c.download_source is None and c.download_resource is None
            else dataclasses.replace(c) for c in configs]


def _allow_pattern(pattern: str) -> str | None:
    """The hub-side pattern for one of ours: a folder's contents, a glob as is, None = everything."""
    if not pattern:
        return None
    return pattern + "*" if pattern.endswith("/") else pattern


def _matches(local_dir: Path, patterns: list[str]) -> list[Path]:
    """What the patterns name on disk: matched files/non-empty folders (sorted), or the folder itself."""
    out: list[Path] = []
    for pattern in patterns:
        if not pattern or pattern.endswith("/"):
            found = [local_dir / pattern] if _has_files(local_dir / pattern) else []
        else:
            found = [local_dir / rel for rel in sorted(glob.glob(pattern, root_dir=local_dir))]
            found = [p for p in found if p.is_file() or _has_files(p)]  # an empty folder is no download
        out.extend(p for p in found if p not in out)
    return out


def missing_files(local_dir: Path, patterns: list[str], *, verify: bool = False) -> dict[str, str]:
    """The patterns not fully on disk under ``local_dir`` -> what is wrong ("" when nothing matches).

    Wrong is: shards of a split checkpoint absent, files the manifest lists under the pattern
    absent, or files that fail :func:`manifest.problem` (size, header; sha256 with ``verify``).
    """
    return _check(local_dir, patterns, verify)[0]


def _check(local_dir: Path, patterns: list[str], verify: bool) -> tuple[dict[str, str], dict[str, str]]:
    """:func:`missing_files`, and the files on disk (relative) that failed a check -> why."""
    expected = manifest.read(local_dir) if local_dir.is_dir() else {}
    missing: dict[str, str] = {}
    incomplete: dict[str, str] = {}
    for pattern in patterns:
        found = _matches(local_dir, [pattern]) if local_dir.is_dir() else []
        if not found:
            missing[pattern] = ""
            continue
        problems = []
        absent = _absent_shards(found)
        if absent:
            more = " ..." if len(absent) > 4 else ""
            problems.append(f"{len(absent)} shards absent: {', '.join(absent[:4])}{more}")
        listed = [rel for rel in expected if _under_pattern(rel, pattern) and not (local_dir / rel).is_file()
                  and rel not in absent]
        if listed:
            problems.append(f"absent: {', '.join(listed[:4])}{' ...' if len(listed) > 4 else ''}")
        for rel in _files_under(local_dir, found):
            problem = manifest.problem(local_dir / rel, expected.get(rel), verify=verify)
            if problem:
                incomplete[rel] = problem
                problems.append(problem if rel == pattern else f"{rel} is {problem}")
        if problems:
            missing[pattern] = "; ".join(problems)
    return missing, incomplete


def _files_under(local_dir: Path, found: list[Path]) -> list[str]:
    """The files (posix, relative to ``local_dir``) that matched paths are or hold, hidden ones left out."""
    files = []
    for path in found:
        inside = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files.extend(p.relative_to(local_dir).as_posix() for p in inside)
    return [rel for rel in files if not any(part.startswith(".") for part in rel.split("/"))]


def _under_pattern(rel: str, pattern: str) -> bool:
    allow = _allow_pattern(pattern)
    return allow is None or fnmatch.fnmatchcase(rel, allow)


def _absent_shards(found: list[Path]) -> list[str]:
    """Sibling shards that ``name-0000i-of-0000n`` files imply but that are not on disk."""
    absent: list[str] = []
    for path in found:
        m = _SHARD.match(path.name)
        if m is None:
            continue
        count, width = int(m["count"]), len(m["index"])
        for i in range(1, count + 1):
            name = f"{m['stem']}-{i:0{width}d}-of-{m['count']}{m['suffix']}"
            if not (path.parent / name).is_file() and name not in absent:
                absent.append(name)
    return absent


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def _present_files(local_dir: Path, allow: list[str] | None) -> list[str]:
    """Files already under ``local_dir`` (posix, relative) that the download would otherwise fetch again."""
    if not local_dir.is_dir():
        return []
    present = [p.relative_to(local_dir).as_posix() for p in sorted(local_dir.rglob("*")) if p.is_file()]
    present = [rel for rel in present if not any(part.startswith(".") for part in rel.split("/"))]
    if allow is None:
        return present
    return [rel for rel in present if any(fnmatch.fnmatchcase(rel, a) for a in allow)]


def _hub_unreachable(endpoint: str, timeout: float) -> str | None:
    """None when a TCP connection to the hub (or to the HTTPS proxy in use) opens within ``timeout``.

    Name resolution has no timeout of its own, so the probe runs in a daemon thread and is abandoned
    when it overruns; otherwise a short reason (e.g. the DNS error) is returned.
    """
    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_url.hostname or "", proxy_url.port or 8080
    errors: list[OSError] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            errors.append(e)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"no connection to {host}:{port} within {timeout:g} s"
    if errors:
        return f"cannot connect to {host}:{port} ({errors[0]})"
    return None


def _usp_rank(use_usp: bool) -> int | None:
    """This process's rank when ``use_usp`` and a process group is up; None otherwise."""
    if not use_usp:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        logger.debug("use_usp=True without an initialised torch.distributed group: downloading as a single process")
        return None
    return dist.get_rank()


def _barrier() -> None:
    """Wait for every rank (NCCL needs the device this rank uses)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
