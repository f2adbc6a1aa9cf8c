"""Each Triton kernel against its torch op in ``wan_models.ops``, on random inputs in the shapes
and layouts the DiT passes (strided ``[B, 1, C]`` modulation views, ``[L, 1, D/2]`` RoPE tables,
a non-contiguous slice of the residual stream). On CPU the kernels run in Triton's interpreter.

Tolerances: float32 outputs ``rtol=atol=1e-5`` (measured max |diff| ~1e-6: summation order and
fused multiply-adds). bfloat16 outputs two bf16 units, ``rtol=2**-6, atol=1e-3``: the interpreter
truncates fp32->bf16 where torch and the GPU round to nearest, and rms_norm rounds twice (after
normalising, after the weight), as the reference does; measured max relative diff 0.0154 in the
interpreter.
"""

from __future__ import annotations

import pytest
import torch

from wan_kernels import triton as fused
from wan_models import ops
from wan_models.rope import rope_tables

pytestmark = pytest.mark.skipif(not fused.status()[0], reason=f"fused kernels unavailable: {fused.status()[1]}")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=1e-3)}
DIMS = [pytest.param(1536, 12, id="1.3B-width"), pytest.param(5120, 40, id="14B-width")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture
def no_fallback(monkeypatch):
    """Make every wrapper's torch fallback raise, so a passing test really ran the kernel."""
    from wan_kernels.triton import gated_residual, modulate, rmsnorm, rope

    def refuse(*args, **kwargs):
        raise AssertionError("the torch fallback ran instead of the Triton kernel")

    for module, name in ((rmsnorm, "torch_rms_norm"), (rope, "torch_apply_rope"),
                         (modulate, "torch_modulate"), (gated_residual, "torch_gated_residual")):
        monkeypatch.setattr(module, name, refuse)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _modulation(batch: int, dim: int, device, seed: int) -> tuple[torch.Tensor, ...]:
    """shift, scale, gate x2 as the DiT makes them: strided ``[B, 1, C]`` views of a ``[B, 6, 1, C]`` table."""
    table = torch.randn(1, 6, dim, generator=_gen(seed)) * 0.3 + torch.randn(batch, 6, dim, generator=_gen(seed + 1))
    return table.to(device).unsqueeze(2).unbind(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads", DIMS)
def test_rms_norm(dim: int, heads: int, dtype: torch.dtype, device, no_fallback) -> None:
    x = (torch.randn(2, 24, dim, generator=_gen(0)) * 3).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(dim, generator=_gen(1))).to(device, dtype)
    out = fused.fused_ops()["rms_norm"](x, weight, 1e-6)
    expected = ops.rms_norm(x, weight, 1e-6)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOL[dtype])


def test_rms_norm_mixed_dtypes_and_strided_rows(device, no_fallback) -> None:
    base = torch.randn(3, 40, 256, generator=_gen(2)).to(device)
    x = base[:, ::2, :]  # rows not evenly laid out: reshape copies, kernel sees a plain matrix
    weight = (1 + 0.1 * torch.randn(256, generator=_gen(3))).to(device, torch.bfloat16)
    out = fused.fused_ops()["rms_norm"](x, weight, 1e-5)
    expected = ops.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads", DIMS)
def test_apply_rope(dim: int, heads: int, dtype: torch.dtype, device, no_fallback) -> None:
    head_dim = dim // heads  # 128, as every released model
    cos, sin = rope_tables(head_dim, (2, 3, 4), device)  # 24 tokens
    x = torch.randn(2, 24, heads, head_dim, generator=_gen(4)).to(device, dtype)
    out = fused.fused_ops()["apply_rope"](x, cos, sin)
    torch.testing.assert_close(out, ops.apply_rope(x, cos, sin), **TOL[dtype])


def test_apply_rope_non_contiguous_and_odd_sizes(device, no_fallback) -> None:
    cos, sin = rope_tables(64, (3, 2, 5), device)  # 30 tokens, 3 heads (one head per program)
    x = torch.randn(2, 3, 30, 64, generator=_gen(5)).to(device).transpose(1, 2)  # [B, L, H, D] view
    assert not x.is_contiguous()
    out = fused.fused_ops()["apply_rope"](x, cos, sin)
    torch.testing.assert_close(out, ops.apply_rope(x, cos, sin), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads", DIMS)
def test_modulate(dim: int, heads: int, dtype: torch.dtype, device, no_fallback) -> None:
    x = (torch.randn(2, 20, dim, generator=_gen(6)) * 2 + 0.5).to(device, dtype)
    shift, scale, *_ = _modulation(2, dim, device, seed=7)
    out = fused.fused_ops()["modulate"](x, shift, scale, 1e-6)
    expected = ops.modulate(x, shift, scale, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_modulate_head_layout(device, no_fallback) -> None:
    """The head modulates ``tokens[:, n_ref:]`` (a slice) with shift/scale from a [B, 2, C] table."""
    tokens = torch.randn(2, 33, 96, generator=_gen(8)).to(device)
    shift, scale = torch.randn(2, 2, 96, generator=_gen(9)).to(device).unsqueeze(2).unbind(1)
    out = fused.fused_ops()["modulate"](tokens[:, 3:], shift, scale, 1e-6)
    torch.testing.assert_close(out, ops.modulate(tokens[:, 3:], shift, scale, 1e-6), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads", DIMS)
def test_gated_residual(dim: int, heads: int, dtype: torch.dtype, device, no_fallback) -> None:
    x = torch.randn(2, 20, dim, generator=_gen(10)).to(device)  # float32 residual stream
    y = torch.randn(2, 20, dim, generator=_gen(11)).to(device, dtype)  # block output, weights' dtype
    gate = _modulation(2, dim, device, seed=12)[2]
    out = fused.fused_ops()["gated_residual"](x, y, gate)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ops.gated_residual(x, y, gate), **TOL[torch.float32])


def test_fallbacks_for_autograd_and_unsupported_inputs(device) -> None:
    """Calls the kernels do not take go to the torch op (same result, gradients flow)."""
    f = fused.fused_ops()
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.ones(16, device=device, requires_grad=True)
    f["rms_norm"](x, weight, 1e-6).sum().backward()
    assert x.grad is not None and weight.grad is not None
    x64 = torch.randn(2, 5, 16, dtype=torch.float64, device=device)
    torch.testing.assert_close(f["rms_norm"](x64, weight.detach().double(), 1e-6),
                               ops.rms_norm(x64, weight.detach().double(), 1e-6), rtol=0, atol=0)
    gate64 = torch.randn(2, 1, 16, dtype=torch.float64, device=device)
    out = f["gated_residual"](x.detach(), x.detach(), gate64)
    assert out.dtype == torch.float64
    angles = torch.randn(5, 2, 4, device=device)  # per-head tables [L, H, D/2]: not the DiT's layout
    xh = x.detach().unflatten(-1, (2, 8))
    torch.testing.assert_close(f["apply_rope"](xh, angles.cos(), angles.sin()),
                               ops.apply_rope(xh, angles.cos(), angles.sin()), rtol=0, atol=0)
    cos, sin = rope_tables(48, (1, 1, 5), device)  # head dim 48 (not a power of two)
    x48 = torch.randn(1, 5, 2, 48, device=device)
    torch.testing.assert_close(f["apply_rope"](x48, cos, sin), ops.apply_rope(x48, cos, sin), rtol=0, atol=0)


def test_kernel_path_is_taken_on_this_machine(device) -> None:
    """Guard: on CPU the kernels must have been built for the interpreter (by conftest)."""
    from wan_kernels.triton.launch import use_kernel
    from wan_kernels.triton.rmsnorm import _rms_norm_kernel

    assert use_kernel(_rms_norm_kernel, torch.ones(2, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA only: it is used only there, and Triton 3.7's interpreter converts to fp8 "
                           "without carrying a rounded-up mantissa into the exponent (126 -> 64)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_row_quantisation(dtype: torch.dtype, device) -> None:
    """The fused activation quantiser of the ``_scaled_mm`` path: scales exact (amax/448), values
    within one e4m3 step of the torch expression (2^-3 relative)."""
    from wan_kernels.fp8 import FP8_MAX, quantize_activations
    from wan_kernels.triton.fp8_quant import quantize_rows

    x = (torch.randn(40, 1536, generator=_gen(13)) * torch.logspace(-2, 1, 40)[:, None]).to(device, dtype)
    x[7] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (40, 1)
    torch.testing.assert_close(scale, x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / FP8_MAX,
                               rtol=1e-6, atol=0)
    q_ref, _ = quantize_activations(x.cpu(), per_row=True)  # the torch expression
    step = q_ref.float().abs() * 2**-3 + 2**-9
    assert ((q.float().cpu() - q_ref.float()).abs() <= step).all()
    assert (q[7].float() == 0).all()
