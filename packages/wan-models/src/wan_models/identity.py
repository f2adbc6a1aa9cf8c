"""Which model family (Wan 2.1 or 2.2) and which A14B expert a checkpoint holds, and what said so.

Shapes tell most DiTs apart (48 latent channels: TI2V-5B; 36 input channels without CLIP: an
I2V-A14B expert; CLIP, reference, camera or VACE parts: Wan 2.1). They cannot tell a Wan2.2-T2V-A14B
expert from Wan2.1-T2V-14B, nor the high-noise expert from the low-noise one. The evidence is
therefore read in this order, the first that speaks deciding:

1. the weights' shapes, where they decide;
2. the official ``config.json`` beside the file (``model_type: ti2v``);
3. diffusers' ``model_index.json`` above a ``transformer/`` or ``transformer_2/`` folder;
4. the folder (``high_noise_model/``, ``low_noise_model/``) and the file name (ComfyUI's
   ``wan2.2_t2v_high_noise_14B_fp16.safetensors``);
5. what the caller expects (a registry entry's family).

When none speaks the checkpoint is read as Wan 2.1 and the guess is logged. A caller's expectation
that contradicts evidence from 1-4 is a :class:`CheckpointError` naming the file, what it is and
what was expected.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import config_json, configs
from .configs import MODELS
from .dit_config import DiTConfig
from .errors import CheckpointError

logger = logging.getLogger(__name__)

FAMILY_NAMES = {"wan2.1": "Wan 2.1", "wan2.2": "Wan 2.2"}
EXPERTS = ("high", "low")  # the noise experts of a Wan 2.2 A14B pair, in the order of configs.EXPERT_FOLDERS
EXPERT_FOLDERS = dict(zip((folder.rstrip("/") for folder in configs.EXPERT_FOLDERS), EXPERTS))
DIFFUSERS_EXPERT_FOLDERS = {"transformer": "high", "transformer_2": "low"}
_NAME_FAMILY = re.compile(r"wan[-_ ]?(2)[._]?([12])(?![0-9])")
_NAME_EXPERT = re.compile(r"(high|low)[-_ ]?noise")


@dataclass(frozen=True)
class Identity:
    """A checkpoint's family ("wan2.1"/"wan2.2"), its expert role ("high"/"low", or None for a
    single-DiT model or a network other than the DiT), and the evidence that decided them."""

    family: str
    expert: str | None = None
    evidence: str = "shapes"
    guessed: bool = False

    def describe(self) -> str:
        """One line for logs and ``wan info``: ``wan2.2, high-noise expert, from folder high_noise_model/``."""
        expert = f", {self.expert}-noise expert" if self.expert else ""
        how = f"GUESSED: {self.evidence}" if self.guessed else f"from {self.evidence}"
        return f"{self.family}{expert}, {how}"


@dataclass(frozen=True)
class _Clue:
    family: str | None
    expert: str | None
    evidence: str


def _official_config_clue(folder: Path) -> _Clue | None:
    path = folder / "config.json"
    data = _json(path)
    if data is None or "_class_name" in data and data["_class_name"] not in ("WanModel", "VaceWanModel"):
        return None
    model_type = data.get("model_type")
    if model_type == "ti2v":
        return _Clue("wan2.2", None, f"{path} (model_type ti2v)")
    if model_type in ("flf2v", "vace"):
        return _Clue("wan2.1", None, f"{path} (model_type {model_type})")
    if model_type == "s2v":
        raise CheckpointError(f"{path}: model_type s2v (Wan2.2-S2V-14B) is not supported yet; "
                              "supported Wan 2.2 models: TI2V-5B, T2V-A14B, I2V-A14B")
    return None


def _json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is none there (a broken file is reported by
    the reader that needs it, :mod:`wan_models.config_json`)."""
    try:
        return config_json.read(path)
    except CheckpointError:
        return None


def _diffusers_clue(folder: Path) -> _Clue | None:
    role = DIFFUSERS_EXPERT_FOLDERS.get(folder.name)
    index_path = folder.parent / "model_index.json"
    index = _json(index_path) if role else None
    if index is None:
        return None
    two_experts = bool(index.get("transformer_2")) and index["transformer_2"] != [None, None]
    if two_experts or index.get("boundary_ratio") is not None:
        return _Clue("wan2.2", role if two_experts else None, f"{index_path} ({folder.name}/ of a two-expert pipeline)")
    if index.get("expand_timesteps"):
        return _Clue("wan2.2", None, f"{index_path} (expand_timesteps)")
    return None


def _path_clue(path: Path) -> _Clue | None:
    for parent in path.parents:
        if parent.name in EXPERT_FOLDERS:
            return _Clue("wan2.2", EXPERT_FOLDERS[parent.name], f"folder {parent.name}/")
    name = path.name.lower()
    family = _NAME_FAMILY.search(name)
    expert = _NAME_EXPERT.search(name)
    if family or expert:
        found = f"wan2.{family[2]}" if family else "wan2.2"  # only Wan 2.2 has noise experts
        return _Clue(found, expert[1] if expert else None, f"file name {path.name}")
    return None


def path_expert(path: Path) -> str | None:
    """The expert ("high"/"low") a file's path names by the loader's rules (a diffusers
    ``transformer_2/`` folder, ``high_noise_model/``, a ComfyUI file name), reading at most a
    ``model_index.json``, never the weights; None when the path says nothing."""
    for folder in (path, path.parent):
        clue = _diffusers_clue(folder)
        if clue is not None and clue.expert:
            return clue.expert
    clue = _path_clue(path)
    return clue.expert if clue is not None else None


def _shapes_clue(config: DiTConfig) -> _Clue | None:
    """What the weights' shapes (read into ``config``, family set where they decide) say."""
    if config.family == "wan2.2":
        why = "48 latent channels" if config.out_dim == 48 else f"{config.in_dim} input channels without CLIP"
        return _Clue("wan2.2", None, f"its shapes ({why})")
    parts = [name for name, present in (("CLIP branch", config.image_input), ("VACE blocks", config.vace_layers),
                                        ("camera adapter", config.camera_in_dim is not None),
                                        ("reference conv", config.ref_conv)) if present]
    if parts:
        return _Clue("wan2.1", None, f"its shapes ({', '.join(parts)}: Wan 2.1 only)")
    as_21 = [spec.name for spec in MODELS.values() if spec.config == config]
    as_22 = [spec.name for spec in MODELS.values() if spec.config == config.replace(family="wan2.2")]
    if as_21 and not as_22:
        return _Clue("wan2.1", None, f"its shapes (those of {as_21[0]}, which no Wan 2.2 model has)")
    return None


def identify(files: Sequence[Path], config: DiTConfig, *, expected: str | None = None,
             source: str = "checkpoint") -> Identity:
    """The identity of the DiT in ``files``, whose shapes read as ``config``; ``expected`` is the
    family the caller asks for (None: no expectation)."""
    if expected is not None and expected not in FAMILY_NAMES:
        raise ValueError(f"unknown family {expected!r}; expected one of {', '.join(FAMILY_NAMES)}")
    folder = files[0].parent
    clues = [c for c in (_shapes_clue(config), _official_config_clue(folder), _diffusers_clue(folder),
                         _path_clue(files[0])) if c]
    family_clue = next((c for c in clues if c.family), None)
    expert_clue = next((c for c in clues if c.expert), None)
    if family_clue is None:
        if expected is not None:
            return Identity(expected, None, "the family asked for")
        logger.info("%s: nothing tells whether this is a Wan 2.1 DiT or a Wan 2.2 T2V expert (same shapes); "
                    "reading it as Wan 2.1 (ask for family='wan2.2', or keep the file in high_noise_model/ "
                    "or low_noise_model/, to read it as a Wan 2.2 expert)", source)
        return Identity("wan2.1", None, "nothing tells Wan 2.1 from a Wan 2.2 T2V expert", guessed=True)
    family = family_clue.family
    for clue in clues:
        if clue.family and clue.family != family:
            logger.warning("%s: %s says %s, but %s says %s; following the latter", source, clue.evidence,
                           FAMILY_NAMES[clue.family], family_clue.evidence, FAMILY_NAMES[family])
    if expected is not None and expected != family:
        raise CheckpointError(f"{source} is a {FAMILY_NAMES[family]} DiT (from {family_clue.evidence}), "
                              f"but a {FAMILY_NAMES[expected]} DiT was expected")
    expert = expert_clue.expert if expert_clue and family == "wan2.2" else None
    evidence = family_clue.evidence
    if expert_clue and expert and expert_clue is not family_clue:
        evidence += f"; expert from {expert_clue.evidence}"
    return Identity(family, expert, evidence)
