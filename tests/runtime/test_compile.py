"""Regional torch.compile of the DiT blocks (``WanVideoPipeline.compile``, ``wan generate --compile``).

On the tiny release (2 DiT blocks), float32 on CPU: the compiled pipeline makes the eager video
(final latents within 1e-5 relative; measured ~1e-7, inductor reorders float32 sums), before and
after a LoRA merged into the compiled blocks, with TeaCache on. One compile in the whole file: every
block, step and CFG branch reuses one graph (checked with dynamo's counters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from factories import one_thread_fixture
from wan_models.attention import set_attention_backend
from wan_runtime import ModelConfig, WanVideoPipeline, tiny_release

TOLERANCE = 1e-5  # max |compiled - eager| / max |eager| of the final latents
SIZE = dict(height=32, width=48, num_frames=5, num_inference_steps=3, seed=0, cfg_scale=5.0)

one_thread = one_thread_fixture("module")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return tiny_release.write_release(tmp_path_factory.mktemp("m"), "Wan2.1-T2V-1.3B")


def load(release: Path) -> WanVideoPipeline:
    configs = [ModelConfig(path=str(p)) for p in sorted(release.glob("*.safetensors")) + sorted(release.glob("*.pth"))]
    return WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                            tokenizer_config=ModelConfig(path=str(release / "google" / "umt5-xxl")),
                                            progress_bar_cmd=lambda x: x)


def generate(pipe: WanVideoPipeline, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """Final latents and the decoded frames (uint8)."""
    latents: list[torch.Tensor] = []
    frames = pipe(prompt="a red ball", negative_prompt="blur", progress_bar_cmd=lambda x: x,
                  step_callback=lambda step, t, x: latents.append(x), **SIZE, **kwargs)
    return latents[-1], np.stack([np.asarray(f, dtype=np.int16) for f in frames])


def lora_for(pipe: WanVideoPipeline) -> dict[str, torch.Tensor]:
    """Rank-2 factors for every block's self-attention q (non-zero, so the merge changes the video)."""
    gen, dim = torch.Generator().manual_seed(5), pipe.dit.config.dim
    lora = {}
    for i in range(len(pipe.dit.blocks)):
        lora[f"blocks.{i}.self_attn.q.lora_A.weight"] = torch.randn(2, dim, generator=gen) * 0.5
        lora[f"blocks.{i}.self_attn.q.lora_B.weight"] = torch.randn(dim, 2, generator=gen) * 0.5
    return lora


def assert_same_video(compiled: tuple[torch.Tensor, np.ndarray], eager: tuple[torch.Tensor, np.ndarray]) -> None:
    (latents, frames), (ref_latents, ref_frames) = compiled, eager
    assert ((latents - ref_latents).abs().max() / ref_latents.abs().max()).item() <= TOLERANCE
    assert np.abs(frames - ref_frames).max() <= 1  # at most one uint8 level from rounding


def test_compiled_pipeline_makes_the_eager_video(release: Path) -> None:
    eager, compiled = load(release), load(release)
    # Plain SDPA, traced into the graph (wan_kernels' dispatcher would run outside it: 7 graph pieces).
    set_attention_backend(None)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile()
    assert_same_video(generate(compiled), generate(eager))
    # LoRA merged into the compiled blocks' parameters, and TeaCache calling the blocks itself.
    for pipe in (eager, compiled):
        pipe.load_lora(pipe.dit, lora_for(pipe))
    teacache = dict(tea_cache_l1_thresh=0.05, tea_cache_model_id="Wan2.1-T2V-1.3B")
    with_lora = generate(eager, **teacache)
    assert_same_video(generate(compiled, **teacache), with_lora)
    # One graph for both blocks, every step, both CFG branches and the merged weights: no recompiles.
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["ok"] == 1


def test_compile_refuses_hooks_inside_the_blocks(release: Path, monkeypatch) -> None:
    pipe = load(release)
    pipe.enable_vram_management()
    with pytest.raises(ValueError, match="enable_vram_management"):
        pipe.compile()
    pipe = load(release)
    pipe.compile()
    with pytest.raises(ValueError, match="compile"):
        pipe.enable_vram_management()
    pipe = load(release)
    monkeypatch.setattr(pipe, "sequence_parallel", object())
    with pytest.raises(ValueError, match="use_usp"):
        pipe.compile()
    with pytest.raises(ValueError, match="no DiT"):
        WanVideoPipeline(device="cpu").compile()


@pytest.fixture
def compile_calls(monkeypatch) -> list[dict]:
    """Records ``WanVideoPipeline.compile`` calls (without compiling: the CLI path only is under test)."""
    calls: list[dict] = []
    monkeypatch.setattr(WanVideoPipeline, "compile", lambda self, **kwargs: calls.append(kwargs))
    return calls


def run_generate(*args: str):
    from wan_cli.main import app

    small = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "1", "--device", "cpu",
             "--dtype", "float32", "-q"]
    return CliRunner().invoke(app, ["generate", *small, *args])


@pytest.mark.parametrize("how", ["flag", "config"])
def test_cli_compile_reaches_the_pipeline(how: str, tmp_path: Path, compile_calls: list[dict]) -> None:
    args = ["--compile"]
    if how == "config":
        (tmp_path / "run.toml").write_text("compile = true\n")
        args = ["--config", str(tmp_path / "run.toml")]
    result = run_generate(*args, "-o", str(tmp_path / "a.mp4"))
    assert result.exit_code == 0, result.output
    assert compile_calls == [{}]


@pytest.mark.parametrize("flag", ["--offload", "--usp"])
def test_cli_compile_with_hooks_is_a_usage_error(flag: str, tmp_path: Path, compile_calls: list[dict]) -> None:
    result = run_generate("--compile", flag, "-o", str(tmp_path / "a.mp4"))
    assert result.exit_code == 2 and "--compile" in result.output and flag in result.output
    assert compile_calls == []
