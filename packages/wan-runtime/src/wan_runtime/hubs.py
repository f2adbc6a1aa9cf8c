"""The two hubs model files come from, ModelScope and the Hugging Face Hub: names, endpoints, clients.

:func:`normalize` turns any accepted spelling into ``"ModelScope"`` or ``"HuggingFace"`` (DiffSynth's
``download_source`` values), :func:`default_source` reads ``$DIFFSYNTH_DOWNLOAD_SOURCE`` (DiffSynth
2.x's variable). :func:`list_files`, :func:`download` and :func:`command` are what
:class:`wan_runtime.model_config.ModelConfig` asks of a hub; each client is imported only when used.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from . import manifest

__all__ = ["ACCEPTED", "ENV_VAR", "HUGGINGFACE", "MODELSCOPE", "client_problem", "command", "default_source",
           "download", "endpoint", "list_files", "normalize", "offline_reason"]

MODELSCOPE = "ModelScope"
HUGGINGFACE = "HuggingFace"
# DiffSynth-Studio 2.x chooses the hub of a ModelConfig without download_source with this variable.
ENV_VAR = "DIFFSYNTH_DOWNLOAD_SOURCE"
_SPELLINGS = {"modelscope": MODELSCOPE, "huggingface": HUGGINGFACE, "hf": HUGGINGFACE}
ACCEPTED = ("ModelScope", "HuggingFace", "hf")
DEFAULT_ENDPOINTS = {MODELSCOPE: "https://modelscope.cn", HUGGINGFACE: "https://huggingface.co"}
_TRUE = {"1", "on", "yes", "true"}


def normalize(value: str, what: str = "download_source") -> str:
    """``"ModelScope"`` or ``"HuggingFace"`` for any case of an accepted spelling; ValueError otherwise."""
    hub = _SPELLINGS.get(value.strip().lower()) if isinstance(value, str) else None
    if hub is None:
        raise ValueError(f"{what}={value!r} is not a hub; expected one of {', '.join(map(repr, ACCEPTED))} "
                         "(any letter case)")
    return hub


def default_source() -> str:
    """The hub of a config that names none: ``$DIFFSYNTH_DOWNLOAD_SOURCE``, else ModelScope."""
    value = os.environ.get(ENV_VAR, "").strip()
    return normalize(value, f"${ENV_VAR}") if value else MODELSCOPE


def endpoint(hub: str) -> str:
    """The address the hub's client will use (``MODELSCOPE_ENDPOINT``/``MODELSCOPE_DOMAIN``, ``HF_ENDPOINT``)."""
    if hub == HUGGINGFACE:
        value = os.environ.get("HF_ENDPOINT", "").strip()
    else:
        value = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN", "").strip()
    if not value:
        return DEFAULT_ENDPOINTS[hub]
    return (value if "://" in value else "https://" + value).rstrip("/")


def offline_reason(hub: str) -> str | None:
    """Why the hub's client would not go online although the hub may be reachable (``HF_HUB_OFFLINE``)."""
    if hub == HUGGINGFACE and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set (unset it to download)"
    return None


def client_problem(hub: str) -> str | None:
    """None when the hub's client package imports; otherwise what is wrong and how to install it."""
    try:
        if hub == HUGGINGFACE:
            import huggingface_hub  # noqa: F401
        else:
            import modelscope  # noqa: F401
    except ImportError as e:
        package = "huggingface_hub" if hub == HUGGINGFACE else "modelscope"
        return f"the {package} package is not importable ({e}); pip install {package}"
    return None


def list_files(hub: str, repo_id: str) -> dict[str, manifest.Entry]:
    """The files of ``repo_id`` on ``hub`` with sizes and, where given, sha256 (raises what the client raises)."""
    if hub != HUGGINGFACE:
        return manifest.fetch(repo_id)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    entries = {}
    for item in HfApi(endpoint=endpoint(hub)).list_repo_tree(repo_id, recursive=True):
        if isinstance(item, RepoFile):  # the Hub gives a sha256 only for LFS files (git's sha1 otherwise)
            size = item.size if isinstance(item.size, int) and not isinstance(item.size, bool) else None
            entries[item.path] = manifest.Entry(size, item.lfs.sha256.lower() if item.lfs else None)
    return entries


def download(hub: str, repo_id: str, local_dir: Path, allow: list[str] | None, ignore: list[str] | None) -> None:
    """Fetch the files of ``repo_id`` matching ``allow`` (None: all) but not ``ignore`` into ``local_dir``."""
    if hub == HUGGINGFACE:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=allow, ignore_patterns=ignore,
                          endpoint=endpoint(hub))
    else:
        from modelscope import snapshot_download

        snapshot_download(repo_id, local_dir=str(local_dir), allow_file_pattern=allow, ignore_file_pattern=ignore)


def command(hub: str, repo_id: str, allow: str | None, local_dir: Path) -> str:
    """The shell command that fetches the files matching ``allow`` (None: all) of ``repo_id`` by hand."""
    include = "" if allow is None else " --include " + shlex.quote(allow)
    if hub == HUGGINGFACE:
        return f"hf download {repo_id}{include} --local-dir {shlex.quote(str(local_dir))}"
    return f"modelscope download --model {repo_id}{include} --local_dir {shlex.quote(str(local_dir))}"
