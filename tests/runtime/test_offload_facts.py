"""The offload facts the networks declare (``children_read_directly``, ``dtype_parameters``: see
:mod:`wan_models.ops`) and :mod:`wan_runtime.memory` reading them, on the CPU.

Weights live on a poisoned storage (NaNs; the real values are served only to the offloader), so a
weight read outside its unit's onload window, i.e. a fact a network failed to declare, turns the
output into NaNs instead of passing unnoticed on a CPU-only machine.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn

from factories import dit_inputs, one_thread_fixture, random_dit, random_weights
from wan_models import DiTConfig, MotionController, WanDiT
from wan_models.clip import CLIPVisionConfig, CLIPVisionTower
from wan_models.t5 import T5Config, UMT5Encoder
from wan_models.vae import VAEConfig, WanVAE
from wan_models.vae22 import VAE22Config, WanVAE22
from wan_runtime.memory import Transfer, Unit, VramManager, offload

FP8 = torch.float8_e4m3fn
TI2V = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=24, freq_dim=16, text_len=8,
                 in_dim=48, out_dim=48, family="wan2.2")
GRID = (2, 4, 6)

one_thread = one_thread_fixture("module")


class PoisonedStorage(Transfer):
    """CPU transfer whose stored weights are NaNs; :meth:`copy` serves the real values."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(torch.device("cpu"), torch.float32)
        self.values: dict[int, torch.Tensor] = {}
        for tensor in [*module.parameters(), *module.buffers()]:
            self.values[id(tensor)] = tensor.data
            tensor.data = torch.full_like(tensor.data, float("nan"))

    def copy(self, unit: Unit) -> list[torch.Tensor]:
        return [self.values[id(t)] for t in unit.tensors]


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    module.load_state_dict(random_weights(module, seed), assign=True)
    return module.eval()


def managed_equals_plain(module: nn.Module, run: Callable[[], torch.Tensor]) -> None:
    """``run()`` gives the plain result when every layer is streamed (with and without prefetch)
    and when every layer is resident, from poisoned storage."""
    with torch.no_grad():
        expected = run()
        storage = PoisonedStorage(module)
        for budget, prefetch in ((0, False), (0, True), (None, False)):
            manager = VramManager("cpu", torch.float32, budget, prefetch=prefetch)
            manager.transfer = storage
            manager.manage("net", module)
            assert torch.equal(run(), expected), (budget, prefetch)
            manager.disable()
    assert all(p.isnan().all() for p in module.parameters())


# --------------------------------------------------------------------------- Wan 2.2 networks


def test_wan22_vae_decode_and_encode_under_vram_management_equal_plain() -> None:
    vae = randomized(WanVAE22(VAE22Config(dim=4, dec_dim=5)))
    latents = torch.randn(1, 48, 2, 2, 3, generator=torch.Generator().manual_seed(1))
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    managed_equals_plain(vae, lambda: torch.cat([vae.decode(latents).flatten(), vae.encode(video).flatten()]))


def test_wan22_ti2v_dit_with_per_token_timesteps_under_vram_management_equals_plain() -> None:
    dit = random_dit(TI2V)
    x, t, context = dit_inputs(TI2V, batch=2, grid=GRID)
    timestep = t[:, None].repeat(1, math.prod(GRID) // 4)
    timestep[0, : GRID[1] * GRID[2] // 4] = 0  # TI2V: the first frame's tokens are clean
    managed_equals_plain(dit, lambda: dit(x, timestep, context))


# --------------------------------------------------------------------------- the facts themselves


def tiny_networks() -> dict[str, nn.Module]:
    with torch.device("meta"):
        return {
            "dit": WanDiT(TI2V),
            "vae": WanVAE(VAEConfig(dim=4)),
            "vae22": WanVAE22(VAE22Config(dim=4, dec_dim=5)),
            "t5": UMT5Encoder(T5Config(vocab=32, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, num_layers=2,
                                       num_buckets=4)),
            "clip": CLIPVisionTower(CLIPVisionConfig(image_size=28, patch_size=14, vision_dim=8, vision_mlp_ratio=2,
                                                     vision_heads=2, vision_layers=2)),
            "motion_controller": MotionController(),
        }


@pytest.mark.parametrize("name", ["dit", "vae", "vae22", "t5", "clip", "motion_controller"])
def test_declared_facts_name_existing_children_and_parameters(name: str) -> None:
    net = tiny_networks()[name]
    for mod in net.modules():
        for child in offload.declared(mod, offload.CHILDREN_READ_DIRECTLY):
            mod.get_submodule(child)
        for param in offload.declared(mod, offload.DTYPE_PARAMETERS):
            mod.get_parameter(param)
    anchors = offload.declared(net, offload.DTYPE_PARAMETERS)
    assert anchors or name == "t5"  # every network that casts its inputs to its dtype says where from


def test_float8_dtype_parameters_are_stored_upcast_while_managed() -> None:
    vae = randomized(WanVAE22(VAE22Config(dim=4, dec_dim=5)))
    for p in vae.parameters():
        p.data = p.data.to(FP8)
    manager = VramManager("cpu", torch.float32, budget=0)
    manager.manage("vae", vae)
    assert {n for n, p in vae.named_parameters() if p.dtype != FP8} == {"encoder.conv1.weight"}
    manager.disable()
    assert {p.dtype for p in vae.parameters()} == {FP8}


# --------------------------------------------------------------------------- a network the runtime never saw


class Gate(nn.Module):
    """Scales by a learned vector; the parent reads its weight without calling it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))


class NewBlock(nn.Module):
    """A block whose forward reads ``gate.scale`` directly and whose input dtype follows ``proj``."""

    children_read_directly: tuple[str, ...] = ("gate",)
    dtype_parameters: tuple[str, ...] = ("proj.weight",)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gate = Gate(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype)) * self.gate.scale


def test_a_new_module_class_declares_its_facts_without_a_runtime_edit() -> None:
    torch.manual_seed(0)
    block, x = NewBlock(8), torch.randn(3, 8)
    _, units = offload.build_units(block, lambda dtype, upcast=True: dtype)
    assert [u.name for u in units] == ["proj"]  # gate.scale is held by the root unit, with NewBlock's own
    managed_equals_plain(block, lambda: block(x))
    for p in block.parameters():
        p.data = p.data.to(FP8)
    manager = VramManager("cpu", torch.float32, budget=0)
    manager.manage("new", block)
    assert block.proj.weight.dtype == torch.float32 and block.gate.scale.dtype == FP8
    assert block(x).dtype == torch.float32
    manager.disable()
    assert block.proj.weight.dtype == FP8
