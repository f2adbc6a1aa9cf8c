"""The pipeline switches wan_kernels on when it is installed, and says what FP8 needs."""

from __future__ import annotations

import builtins

import pytest
import torch

import wan_kernels
import wan_models
from wan_runtime import ModelConfig, WanVideoPipeline, tiny_release
from wan_runtime.acceleration import enable_kernels


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return tiny_release.write_release(tmp_path_factory.mktemp("m"), "Wan2.1-T2V-1.3B")


def load(release, **kwargs) -> WanVideoPipeline:
    configs = [ModelConfig(path=str(p)) for p in sorted(release.glob("*.safetensors")) + sorted(release.glob("*.pth"))]
    return WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                            tokenizer_config=ModelConfig(path=str(release / "google" / "umt5-xxl")),
                                            **kwargs)


def test_from_pretrained_installs_kernels(release) -> None:
    try:
        pipe = load(release, attention_backend="math")
        assert pipe.attention_backend == "math"
        assert wan_models.get_attention_backend() is not wan_models.attention.sdpa_attention
        video = pipe(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=1, seed=0,
                     output_type="latent", progress_bar_cmd=lambda x: x)
        assert wan_kernels.attention_report().calls.get("math", 0) > 0 and torch.isfinite(video).all()
    finally:
        wan_kernels.disable()
    assert wan_models.get_attention_backend() is wan_models.attention.sdpa_attention


def test_cpu_pipeline_gets_the_cpu_path_and_the_same_latents(release) -> None:
    from wan_kernels.cpu import InplaceGeluMLP

    kwargs = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, seed=0,
                  output_type="latent", progress_bar_cmd=lambda x: x)
    try:
        pipe = load(release)
        assert isinstance(pipe.dit.blocks[0].ffn, InplaceGeluMLP)
        assert wan_models.ops.get_op("modulate") is not wan_models.ops.DEFAULTS["modulate"]
        fast = pipe(**kwargs)
        wan_kernels.disable()  # back to the reference ops (the in-place GELU is bit-identical)
        plain = pipe(**kwargs)
    finally:
        wan_kernels.disable()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)  # float32 rounding, two steps


def test_fp8_dit(release) -> None:
    try:
        pipe = load(release)
        report = pipe.quantize_fp8()
        assert report.quantized and all(name.startswith("blocks.") for name in report.quantized)
        assert isinstance(pipe.dit.blocks[0].ffn[0], wan_kernels.FP8Linear)
    finally:
        wan_kernels.disable()


def test_without_the_package(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_kernels(name, *args, **kwargs):
        if name == "wan_kernels":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kernels)
    assert enable_kernels(None) == "sdpa"
    with pytest.raises(ValueError, match="flash2.*pip install 'wan-runtime\\[kernels\\]'"):
        enable_kernels("flash2")
