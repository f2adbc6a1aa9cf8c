"""Tiny random networks, inputs and fixtures shared by the tests of every package."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from wan_models import DiTConfig, WanDiT

TINY_DIT = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=24, freq_dim=16, text_len=8)


def random_weights(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random, non-zero values for every tensor of ``module`` (which may be meta-built)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in module.state_dict().items()}


def meta_dit(config: DiTConfig = TINY_DIT) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(config)


def random_dit(config: DiTConfig = TINY_DIT, seed: int = 0) -> WanDiT:
    model = meta_dit(config)
    model.load_state_dict(random_weights(model, seed), assign=True)
    return model.eval()


def dit_inputs(config: DiTConfig = TINY_DIT, batch: int = 1, seed: int = 1,
               grid: tuple[int, int, int] = (3, 4, 6)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, timestep, context)`` of fresh random values for a DiT of ``config``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_dim, *grid, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    ctx = torch.randn(batch, config.text_len, config.text_dim, generator=gen)
    return x, t, ctx


def one_thread_fixture(scope: str) -> Any:
    """An autouse fixture giving its ``scope`` one intra-op torch thread: tiny tensors gain nothing
    from more, and on a busy machine waiting threads made test_pipeline_e2e about 10x slower
    (measured: 13 s vs 150 s)."""

    @pytest.fixture(scope=scope, autouse=True)
    def one_thread() -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    return one_thread


def load_tiny_pipeline(folder, dits, vae: str = "Wan2.1_VAE.pth"):
    """A float32 CPU pipeline from a tiny release ``folder`` (``wan_runtime.tiny_release``): the DiT files or
    folders ``dits`` (in the order given), its T5, the VAE file ``vae`` and its tokenizer; nothing downloaded."""
    from wan_models.configs import T5_FILE, T5_TOKENIZER
    from wan_runtime import WanVideoPipeline
    from wan_runtime.model_config import ModelConfig

    configs = [ModelConfig(path=str(p)) for p in dits]
    configs += [ModelConfig(path=str(folder / T5_FILE)), ModelConfig(path=str(folder / vae))]
    return WanVideoPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                            tokenizer_config=ModelConfig(path=str(folder / T5_TOKENIZER)),
                                            local_model_path=str(folder / "nowhere"), skip_download=True,
                                            progress_bar_cmd=lambda x: x)


def tiny_releases(tmp_path_factory, *names: str):
    """A fresh models root holding the tiny release of each registry model in ``names``."""
    from wan_runtime import tiny_release

    root = tmp_path_factory.mktemp("models")
    for name in names:
        tiny_release.write_release(root, name)
    return root


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fresh non-zero random values in every tensor (diffusers zero-initialises some layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)
    return module.eval()
