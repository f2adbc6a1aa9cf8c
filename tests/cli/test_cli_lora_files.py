"""``wan convert`` and ``wan info`` of LoRA files, through the real entry point.

A LoRA converted official -> diffusers -> comfy -> official merges into the same weights as the
original (the expected weights are merged from the original factors with explicit ``.alpha``
tensors); its ``wan.base`` / ``wan.training_args`` header survives; ``wan info`` names its layout,
ranks, scale, the DiT it fits and what it was trained for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wan_models import DiTConfig
from wan_runtime.lora import merge_lora
from wan_runtime.lora.layouts import ARGS_KEY, BASE_KEY, save_lora

from factories import random_dit

CONFIG = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=24, freq_dim=16, text_len=8)
BASE = {"family": "wan2.2", "expert": "low", "variant": "t2v", "dim": 32, "num_layers": 2, "model": "Wan2.2-T2V-A14B"}
ARGS = {"lora_rank": 4, "learning_rate": 1e-4}
# layer -> (rank, alpha): per-layer ranks and alphas, none equal to the rank
LAYERS = {"blocks.0.self_attn.q": (4, 3.0), "blocks.1.cross_attn.o": (4, 3.0), "blocks.0.ffn.0": (2, 5.0),
          "blocks.1.ffn.2": (4, 3.0), "head.head": (2, 1.0)}


def lora(seed: int = 2) -> dict[str, torch.Tensor]:
    """Factors in our names, each layer's alpha as an explicit ``.alpha`` tensor, and a bias delta."""
    shapes = {name: p.shape for name, p in random_dit(CONFIG).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer, (rank, alpha) in LAYERS.items():
        out, inp = shapes[f"{layer}.weight"]
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
        state[f"{layer}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.3
        state[f"{layer}.alpha"] = torch.tensor(alpha)
    state["blocks.0.ffn.0.diff_b"] = torch.randn(CONFIG.ffn_dim, generator=gen) * 0.1
    return state


def merged_weights(source) -> dict[str, torch.Tensor]:
    dit = random_dit(CONFIG)
    merge_lora(dit, source)
    return dit.state_dict()


def test_official_diffusers_comfy_official_keeps_every_merged_weight(tmp_path: Path, wan_main) -> None:
    original = lora()
    start = save_lora(tmp_path / "a.safetensors", original, "official",
                      metadata={BASE_KEY: json.dumps(BASE), ARGS_KEY: json.dumps(ARGS)})
    expected = merged_weights(original)
    previous = start
    for step, layout in enumerate(["diffusers", "comfy", "official"]):
        out = tmp_path / f"{step}_{layout}.safetensors"
        result = wan_main("convert", str(previous), str(out), "--to", layout)
        assert result.returncode == 0, result.stderr
        assert f"{layout} LoRA" in result.stdout
        got = merged_weights(out)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{layout}: {key}")
        with safe_open(out, "pt") as f:
            header, keys = f.metadata(), list(f.keys())
        assert json.loads(header[BASE_KEY]) == BASE and json.loads(header[ARGS_KEY]) == ARGS
        prefix = {"diffusers": "transformer.", "comfy": "diffusion_model.", "official": "blocks."}[layout]
        assert all(k.startswith(prefix) or (layout == "official" and k.startswith("head.")) for k in keys)
        previous = out


def test_info_describes_a_lora(tmp_path: Path, wan_main) -> None:
    path = save_lora(tmp_path / "a.safetensors", lora(), "diffusers", metadata={BASE_KEY: json.dumps(BASE)})
    result = wan_main("info", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "LoRA, diffusers (transformer.) layout" in out
    assert "5 low-rank, 1 full deltas" in out
    assert "rank:     4 (3 layers), 2 (2 layers)" in out
    assert "alpha/rank 0.75 (3 layers), 2.5 (1 layer), 0.5 (1 layer)" in out
    assert "from header lora_adapter_metadata" in out
    assert "DiT dim 32, ffn_dim 48, out_dim 16, 2 blocks" in out
    assert "no registry model has these sizes" in out
    assert "DoRA:     no" in out
    assert "trained for: wan2.2 low-noise expert of Wan2.2-T2V-A14B (t2v, dim 32, 2 blocks)" in out


def test_info_names_registry_models_a_lora_fits(tmp_path: Path, wan_main) -> None:
    """A 14B-sized LoRA (attention only) fits Wan 2.1 14B models and the Wan 2.2 A14B experts alike."""
    gen = torch.Generator().manual_seed(0)
    state = {"diffusion_model.blocks.39.self_attn.q.lora_down.weight": torch.randn(2, 5120, generator=gen),
             "diffusion_model.blocks.39.self_attn.q.lora_up.weight": torch.randn(5120, 2, generator=gen),
             "diffusion_model.blocks.39.self_attn.q.alpha": torch.tensor(1.0)}
    save_file(state, str(tmp_path / "big.safetensors"))
    result = wan_main("info", str(tmp_path / "big.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "comfy (diffusion_model.) layout" in result.stdout
    assert "from .alpha tensors" in result.stdout
    matches = next(line for line in result.stdout.splitlines() if line.startswith("matches:"))
    assert "Wan2.1-T2V-14B" in matches and "Wan2.2-T2V-A14B (either expert)" in matches
    assert "Wan2.1-T2V-1.3B" not in matches and "Wan2.2-TI2V-5B" not in matches


def test_a_lora_of_unknown_layers(tmp_path: Path, wan_main) -> None:
    state = {"unet.mid_block.attn.to_q.lora_A.weight": torch.randn(2, 8), "unet.mid_block.attn.to_q.lora_B.weight":
             torch.randn(8, 2)}
    save_file(state, str(tmp_path / "sd.safetensors"))
    info = wan_main("info", str(tmp_path / "sd.safetensors"))
    assert info.returncode == 0, info.stderr
    assert "2 keys name no Wan DiT layer: unet.mid_block.attn.to_q.lora_A.weight" in info.stdout
    assert "no Wan DiT" in info.stdout
    result = wan_main("convert", str(tmp_path / "sd.safetensors"), str(tmp_path / "out.safetensors"), "--to", "comfy")
    assert result.returncode != 0
    assert "name no Wan DiT layer" in result.stderr and "unet.mid_block" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("state, words", [
    ({"blocks.0.modulation.diff": torch.randn(1, 6, 32), "blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 32),
      "blocks.0.self_attn.q.lora_B.weight": torch.randn(32, 2)}, "no place for: blocks.0.modulation.diff"),
    ({"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 32), "blocks.0.self_attn.q.lora_B.weight":
      torch.randn(32, 2), "blocks.0.self_attn.q.lora_magnitude_vector": torch.randn(32)}, "DoRA"),
])
def test_convert_refuses_what_the_layout_cannot_hold(tmp_path: Path, wan_main, state: dict, words: str) -> None:
    save_file(state, str(tmp_path / "in.safetensors"))
    result = wan_main("convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                      "--to", "diffusers")
    assert result.returncode != 0
    assert words in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
