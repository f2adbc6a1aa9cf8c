"""Model sources: a registry name (files fetched into the models folder) or a local model folder, as the
``ModelConfig``s the pipeline loads (shared by `wan generate`, `wan download` and wan-serve)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import wan_models
from wan_models.configs import CLIP_FILE, DIT_FILES, EXPERT_FOLDERS, T5_FILE, T5_TOKENIZER, VAE22_FILE, VAE_FILE
from wan_models.loading import read_checkpoint

from . import hubs
from .model_config import ModelConfig

# Expert DiTs high-noise first; each DiT's config.json travels with it (the loader reads it from beside the files).
NETWORK_PATTERNS = (DIT_FILES, *(folder + DIT_FILES for folder in EXPERT_FOLDERS), T5_FILE, VAE_FILE, VAE22_FILE,
                    CLIP_FILE, "model.safetensors")


@dataclass
class ModelSource:
    """The ``ModelConfig``s of one model and of its tokenizer folder."""

    name: str
    model_configs: list[ModelConfig]
    tokenizer_config: ModelConfig


def registry_source(name: str, source: str | None = None) -> ModelSource:
    """Files of registry entry ``name`` on hub ``source`` (None: ``$DIFFSYNTH_DOWNLOAD_SOURCE``, else
    ModelScope), under that hub's repository id; a speed-control entry adds its base model."""
    hub = hubs.normalize(source, "--source") if source is not None else hubs.default_source()

    def configs_of(spec: wan_models.ModelSpec, patterns: tuple[str, ...]) -> list[ModelConfig]:
        repo = spec.hf_id if hub == hubs.HUGGINGFACE else spec.model_id
        configs = []
        for pattern in patterns:
            if pattern.endswith("config.json"):  # fetched with the DiT beside it
                continue
            sibling = pattern.rsplit("/", 1)[0] + "/config.json" if "/" in pattern else "config.json"
            wanted = [pattern, sibling] if pattern.endswith(DIT_FILES) and sibling in patterns else pattern
            configs.append(ModelConfig(model_id=repo, origin_file_pattern=wanted, download_resource=hub))
        return configs

    spec = wan_models.get_model_spec(name)
    configs = configs_of(spec, tuple(p for p in spec.files if not p.endswith("/")))
    if spec.base_model is not None:
        base = wan_models.get_model_spec(spec.base_model)
        configs = configs_of(base, tuple(p for p in base.files if not p.endswith("/"))) + configs
        spec = base
    return ModelSource(name, configs, configs_of(spec, (T5_TOKENIZER,))[0])


def folder_source(folder: Path) -> ModelSource:
    """Every network file found in a local folder laid out like a released repository."""
    configs = []
    for pattern in NETWORK_PATTERNS:
        found = sorted(folder.glob(pattern))
        if found:
            configs.append(ModelConfig(path=[str(p) for p in found]))
    if not configs:
        raise FileNotFoundError(f"{folder} holds no Wan model file (looked for {', '.join(NETWORK_PATTERNS)})")
    tokenizer = folder / T5_TOKENIZER
    if not tokenizer.is_dir():
        raise FileNotFoundError(f"{folder} has no tokenizer folder {T5_TOKENIZER} (the umT5 tokenizer files)")
    return ModelSource(str(folder), configs, ModelConfig(path=str(tokenizer)))


def resolve_model(model: str) -> ModelSource:
    """A registry name or an existing folder; anything else is an error listing the names."""
    if Path(model).is_dir():
        return folder_source(Path(model))
    if model in wan_models.MODELS:
        return registry_source(model)
    raise unknown_model(model)


def unknown_model(model: str) -> ValueError:
    """The error for a ``--model`` value that is neither a folder nor a registry name, listing the names."""
    return ValueError(f"--model {model!r} is neither a folder nor a known model; known models: "
                      f"{', '.join(wan_models.MODELS)} (see `wan models`)")


def folder_dit_files(folder: Path) -> list[Path]:
    """A model folder's DiT files: its own, or an expert pair's high-noise expert's (both share one config)."""
    return sorted(folder.glob(DIT_FILES)) or sorted((folder / EXPERT_FOLDERS[0]).glob(DIT_FILES))


def folder_entry(folder: Path, config: wan_models.DiTConfig | None = None) -> tuple[str | None, list[str]]:
    """The registry entry whose DiT config a model folder's DiT has (its name picks among entries sharing
    one config), and every entry of that config; None when none matches or the name cannot tell them apart.
    ``config``: the folder's DiT config when the caller has read it already (else it is read here)."""
    if config is None:
        files = folder_dit_files(folder)
        if not files:
            return None, []
        try:
            config = read_checkpoint(files, network="dit").config
        except (ValueError, OSError):  # an unreadable DiT: loading it reports why
            return None, []
    candidates = [name for name, spec in wan_models.MODELS.items() if spec.config == config]
    named = [name for name in candidates if folder.name.lower() in
             {name.lower(), *(repo.rsplit("/", 1)[-1].lower()
                              for repo in (wan_models.MODELS[name].model_id, wan_models.MODELS[name].hf_id))}]
    if len(named) == 1:
        return named[0], candidates
    if len({wan_models.MODELS[name].sampling for name in candidates}) == 1:  # the same settings either way
        return candidates[0], candidates
    return None, candidates
