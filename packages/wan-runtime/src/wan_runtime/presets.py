"""Few-step presets: the published settings of the step- and CFG-distilled LoRAs, as data, per registry model.

A :class:`Preset` is what the LoRA's authors run it with: the step count, the time shift, guidance 1 on
every DiT (the distillation removed the negative branch, so one DiT call per step), the Euler sampler,
their timestep list (LightX2V's ``denoising_step_list``, see ``GenerationRequest.denoising_step_list``)
and the LoRA files by Hugging Face repository and file name, per expert, at their strengths. Sources,
read for each entry (our numbers equal theirs):

- Wan 2.1: ModelTC/LightX2V ``configs/distill/wan21/wan_{t2v,i2v}_distill_lora_4step_cfg.json`` and
  ``lightx2v/models/schedulers/wan/step_distill/scheduler.py`` (the list indexes the shifted 1000-step
  schedule at ``1000 - t``, i.e. sigma = shift(t / 1000); the step is Euler).
- Wan 2.2 Lightning: ModelTC/Wan2.2-Lightning ``wan/configs/wan_{t2v,i2v}_A14B.py`` (steps, shift,
  boundary, guidance (1, 1), LoRA file names), ``generate.py`` (``--sample_solver`` euler) and
  ``wan/utils/fm_solvers_euler.py`` (timesteps ``linspace(1000, 0, steps + 1)``, shifted).
- Wan 2.2 LightX2V LoRAs: ModelTC/LightX2V ``configs/distill/wan22/wan_moe_t2v_distill_lora.json`` and
  ``wan_moe_i2v_distill_with_lora.json`` (two steps per expert: ``boundary_step_index`` 2).

No few-step LoRA is published for Wan2.2-TI2V-5B (Wan2.2-Lightning's README lists it as to do), so it
has no preset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wan_models.identity import EXPERTS  # pipe.dit and pipe.dit2 of a Wan 2.2 expert pair

from .model_config import ModelConfig

if TYPE_CHECKING:
    import torch

    from .lora import LoraMerge
    from .pipeline import WanVideoPipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PresetLora:
    """One LoRA file of a preset: its Hugging Face repository and path there, the strength to merge it
    at, and the expert it belongs to (``"high"``/``"low"``; None: the one DiT, or both experts)."""

    repo: str
    filename: str
    strength: float = 1.0
    expert: str | None = None


@dataclass(frozen=True)
class Preset:
    """Few-step settings for one registry model (guidance 1 on every DiT); ``source`` names where the
    numbers were read."""

    name: str
    model: str
    steps: int
    shift: float
    step_list: tuple[float, ...]
    loras: tuple[PresetLora, ...]
    source: str
    sampler: str = "euler"

    def request_kwargs(self, pair: bool) -> dict[str, Any]:
        """The ``pipe(...)`` / :class:`GenerationRequest` arguments of this preset (``pair``: the pipeline
        holds an expert pair, whose low-noise guidance ``cfg_scale_2`` is set to 1 too)."""
        kwargs: dict[str, Any] = dict(num_inference_steps=self.steps, sigma_shift=self.shift, sampler=self.sampler,
                                      cfg_scale=1.0, denoising_step_list=self.step_list)
        if pair:
            kwargs["cfg_scale_2"] = 1.0
        return kwargs


FOUR_STEPS = (1000.0, 750.0, 500.0, 250.0)
LIGHTX2V_21 = "lightx2v/Wan2.1-Distill-Loras"
LIGHTNING = "lightx2v/Wan2.2-Lightning"
LIGHTX2V_22 = "lightx2v/Wan2.2-Distill-Loras"
LIGHTX2V_21_SOURCE = ("ModelTC/LightX2V configs/distill/wan21/wan_{task}_distill_lora_4step_cfg.json, "
                      "lightx2v/models/schedulers/wan/step_distill/scheduler.py")
LIGHTNING_SOURCE = ("ModelTC/Wan2.2-Lightning wan/configs/wan_{task}_A14B.py, generate.py, "
                    "wan/utils/fm_solvers_euler.py")
LIGHTX2V_22_SOURCE = "ModelTC/LightX2V configs/distill/wan22/{config}"


def _pair(repo: str, high: str, low: str) -> tuple[PresetLora, PresetLora]:
    return PresetLora(repo, high, 1.0, "high"), PresetLora(repo, low, 1.0, "low")


def _four_step(name: str, model: str, loras: tuple[PresetLora, ...], source: str) -> Preset:
    return Preset(name, model, steps=4, shift=5.0, step_list=FOUR_STEPS, loras=loras, source=source)


def _lightning_folder(folder: str) -> tuple[PresetLora, PresetLora]:
    return _pair(LIGHTNING, f"{folder}/high_noise_model.safetensors", f"{folder}/low_noise_model.safetensors")


_PRESETS = [
    _four_step("lightning", "Wan2.1-T2V-14B",
               (PresetLora(LIGHTX2V_21, "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"),),
               LIGHTX2V_21_SOURCE.format(task="t2v")),
    _four_step("lightning", "Wan2.1-I2V-14B-480P",
               (PresetLora(LIGHTX2V_21, "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"),),
               LIGHTX2V_21_SOURCE.format(task="i2v")),
    _four_step("lightning", "Wan2.2-T2V-A14B", _lightning_folder("Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"),
               LIGHTNING_SOURCE.format(task="t2v")),
    _four_step("lightning-250928", "Wan2.2-T2V-A14B", _lightning_folder("Wan2.2-T2V-A14B-4steps-lora-250928"),
               LIGHTNING_SOURCE.format(task="t2v")),
    _four_step("lightning", "Wan2.2-I2V-A14B", _lightning_folder("Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"),
               LIGHTNING_SOURCE.format(task="i2v")),
    _four_step("lightx2v", "Wan2.2-T2V-A14B",
               _pair(LIGHTX2V_22, "wan2.2_t2v_A14b_high_noise_lora_rank64_lightx2v_4step_1217.safetensors",
                     "wan2.2_t2v_A14b_low_noise_lora_rank64_lightx2v_4step_1217.safetensors"),
               LIGHTX2V_22_SOURCE.format(config="wan_moe_t2v_distill_lora.json")),
    _four_step("lightx2v", "Wan2.2-I2V-A14B",
               _pair(LIGHTX2V_22, "wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors",
                     "wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors"),
               LIGHTX2V_22_SOURCE.format(config="wan_moe_i2v_distill_with_lora.json")),
]

PRESETS: dict[str, dict[str, Preset]] = {}
for _preset in _PRESETS:
    PRESETS.setdefault(_preset.model, {})[_preset.name] = _preset


def preset_names() -> list[str]:
    """Every preset name of any model, sorted."""
    return sorted({name for presets in PRESETS.values() for name in presets})


def get_preset(model: str | None, name: str) -> Preset:
    """The preset ``name`` of registry model ``model``; a ValueError lists the model's presets (or the
    models having that preset) when there is none."""
    offered = PRESETS.get(model or "", {})
    if name in offered:
        return offered[name]
    if offered:
        raise ValueError(f"{model} has no preset {name!r}; its presets: {', '.join(offered)}")
    having = [m for m, presets in PRESETS.items() if name in presets]
    what = (f"the preset {name!r} exists for {', '.join(having)}" if having
            else f"no model has a preset {name!r}; presets: {', '.join(preset_names())}")
    model_text = f"{model} has no few-step preset" if model else "presets need a registry model (--model NAME)"
    raise ValueError(f"{model_text}; {what}")


def fetch_loras(preset: Preset, models_dir: str | Path) -> list[tuple[Path, float, str | None]]:
    """The preset's LoRA files as ``(path, strength, expert)``, downloaded from the Hugging Face Hub into
    ``models_dir/<repo>/`` when missing (``ModelConfig.resolve``: offline, the error says how to place them)."""
    found = []
    for lora in preset.loras:
        config = ModelConfig(model_id=lora.repo, origin_file_pattern=lora.filename, download_source="huggingface")
        path = config.resolve(models_dir)[0]
        logger.info("preset %s of %s: LoRA %s at strength %g on %s", preset.name, preset.model, path,
                    lora.strength, f"the {lora.expert}-noise expert" if lora.expert else "the DiT")
        found.append((path, lora.strength, lora.expert))
    return found


def expert_module(pipe: WanVideoPipeline, expert: str | None, what: str) -> list[torch.nn.Module]:
    """The DiTs a LoRA for ``expert`` merges into: ``pipe.dit`` for high, ``pipe.dit2`` for low, every
    loaded DiT for None; a ValueError naming ``what`` (the LoRA) when the pipeline holds no pair."""
    if expert is None:
        return [dit for dit in (pipe.dit, pipe.dit2) if dit is not None]
    if expert not in EXPERTS:
        raise ValueError(f"{what}: expert {expert!r} is not one of {', '.join(EXPERTS)}")
    if pipe.dit2 is None:
        raise ValueError(f"{what} names the {expert}-noise expert, but the pipeline holds one DiT, not a Wan 2.2 "
                         "expert pair")
    return [pipe.dit if expert == "high" else pipe.dit2]


def apply_preset(pipe: WanVideoPipeline, preset: Preset, models_dir: str | Path = "./models") -> list[LoraMerge]:
    """Merge the preset's LoRA files (fetched as :func:`fetch_loras` does) into their experts; returns
    the merge records (for ``pipe.unload_lora``). Generate with ``pipe(..., **preset.request_kwargs(pair))``."""
    for lora in preset.loras:  # a pair's preset on one DiT: refused before any download
        expert_module(pipe, lora.expert, f"{preset.name} LoRA {lora.filename}")
    merges = []
    for path, strength, expert in fetch_loras(preset, models_dir):
        for dit in expert_module(pipe, expert, str(path)):
            merges.append(pipe.load_lora(dit, path, alpha=strength))
    return merges
