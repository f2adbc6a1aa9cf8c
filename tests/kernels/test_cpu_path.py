"""``wan_kernels.optimize_for_cpu``: the in-place-GELU MLP and the one-pass elementwise ops against
the torch references on fresh random inputs, and the whole DiT against the plain one.

Tolerances: the MLP swap is bit-identical (``rtol=atol=0``); the ops and the DiT are held to
float32 rounding (``rtol=atol=1e-5``; measured max |diff| 6e-8 relative for the ops, 0 for RoPE).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wan_kernels
from factories import dit_inputs, random_dit
from parity_support import ParityCase, assert_matches
from wan_kernels import InplaceGeluMLP, cpu
from wan_models import DiTConfig, WanDiT, ops
from wan_models.rope import rope_tables

F32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _restore_hooks():
    """Every test starts and ends with the torch reference ops and attention."""
    wan_kernels.disable()
    yield
    wan_kernels.disable()
    for name in ops.DEFAULTS:
        ops.set_op(name, None)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_inplace_gelu_mlp_is_bit_identical_and_keeps_keys() -> None:
    mlp = nn.Sequential(nn.Linear(32, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 32))
    x = torch.randn(2, 7, 32, generator=_gen())
    fast = InplaceGeluMLP(*mlp)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mlp(x), rtol=0, atol=0)
    assert fast.state_dict().keys() == mlp.state_dict().keys()


def test_inplace_gelu_mlp_keeps_autograd_working() -> None:
    """With grad enabled the GELU runs out of place, so the gradients are the plain module's."""
    mlp = nn.Sequential(nn.Linear(16, 48), nn.GELU(approximate="tanh"), nn.Linear(48, 16))
    fast = InplaceGeluMLP(*mlp)
    x = torch.randn(5, 16, generator=_gen(1), requires_grad=True)
    (grad_plain,) = torch.autograd.grad(mlp(x).square().sum(), x)
    (grad_fast,) = torch.autograd.grad(fast(x).square().sum(), x)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=0, atol=0)


@pytest.mark.parametrize("batch, rows", [(1, 1), (2, 1), (1, 24)], ids=["folded-affine", "fallback", "per-token"])
def test_modulate_matches_reference(batch: int, rows: int) -> None:
    g = _gen(2)
    x = torch.randn(batch, 24, 64, generator=g) * 3 + 1
    shift, scale = torch.randn(batch, rows, 64, generator=g), torch.randn(batch, rows, 64, generator=g)
    torch.testing.assert_close(cpu.modulate(x, shift, scale, 1e-6), ops.modulate(x, shift, scale, 1e-6), **F32)


def test_gated_residual_matches_reference() -> None:
    g = _gen(3)
    x, y, gate = torch.randn(2, 24, 64, generator=g), torch.randn(2, 24, 64, generator=g), torch.randn(2, 1, 64, generator=g)
    torch.testing.assert_close(cpu.gated_residual(x, y, gate), ops.gated_residual(x, y, gate), **F32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided-fallback"])
def test_apply_rope_matches_reference(dtype: torch.dtype, contiguous: bool) -> None:
    cos, sin = rope_tables(24, (2, 3, 4))
    x = torch.randn(2, 24, 4, 24 if contiguous else 25, generator=_gen(4)).to(dtype)
    x = x if contiguous else x[..., 1:]
    out = cpu.apply_rope(x, cos, sin)
    assert out.dtype == dtype
    tol = F32 if dtype == torch.float32 else {"rtol": 0, "atol": 0}  # both round the same float32 result
    torch.testing.assert_close(out, ops.apply_rope(x, cos, sin), **tol)


@pytest.mark.parametrize("batch, per_token", [(1, False), (2, False), (1, True)])
def test_optimized_dit_matches_plain(batch: int, per_token: bool) -> None:
    model = random_dit()
    keys = model.state_dict().keys()
    x, t, ctx = dit_inputs(batch=batch)
    if per_token:  # Wan 2.2 timesteps: one per patched token, e.g. frame 0 at t=0 for image-to-video
        tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
        t = torch.rand(batch, tokens, generator=_gen(7)) * 1000
    with torch.no_grad():
        plain = model(x, t, ctx)
        report = wan_kernels.optimize_for_cpu(model)
        fast = model(x, t, ctx)
    assert set(report.ops) == set(cpu.cpu_ops())
    assert report.mlps == ("text_embedding", *(f"blocks.{i}.ffn" for i in range(model.config.num_layers)))
    assert model.state_dict().keys() == keys
    model.load_state_dict(random_dit(seed=5).state_dict(), strict=True)  # still loads released keys
    torch.testing.assert_close(fast, plain, **F32)


def test_disable_restores_ops_and_enable_keeps_them() -> None:
    model = random_dit()
    wan_kernels.optimize_for_cpu(model)
    wan_kernels.enable("sdpa", fused_ops=False)  # installs no op, so leaves the CPU ones
    assert all(ops.get_op(name) is fn for name, fn in cpu.cpu_ops().items())
    wan_kernels.disable()
    assert all(ops.get_op(name) is fn for name, fn in ops.DEFAULTS.items())


def test_existing_fused_op_is_not_replaced() -> None:
    def custom(x, y, gate):
        return x + y * gate

    ops.set_op("gated_residual", custom)
    report = wan_kernels.optimize_for_cpu(random_dit())
    assert "gated_residual" not in report.ops and ops.get_op("gated_residual") is custom


def test_parity_dit_t2v_with_cpu_path() -> None:
    """The CPU path still reproduces the official WanModel at the fixture tolerance."""
    case = ParityCase.load("dit_t2v")
    with torch.device("meta"):
        model = WanDiT(DiTConfig.from_official(case.config, clip_dim=case.constants.get("clip_dim", 1280)))
    model.load_state_dict(case.weights, strict=True, assign=True)
    model = model.eval()
    wan_kernels.optimize_for_cpu(model)
    i = case.inputs
    with torch.no_grad():
        out = model(i["x"], i["t"], i["context"])
    assert_matches(case, {"out": out})
