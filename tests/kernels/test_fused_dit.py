"""The DiT with ``wan_kernels.enable()`` (attention dispatcher + every fused Triton op) against
the plain DiT, and against the ``dit_t2v`` reference fixture at its own tolerance.

Measured on CPU (interpreter): tiny float32 DiT max |diff| 9.5e-7; bf16 DiT relative L2 0.28%
(bf16 roundings, incl. the interpreter's truncation). Bounds: float32 ``rtol=atol=1e-4``, bf16
relative L2 < 2e-2.
"""

from __future__ import annotations

import pytest
import torch

import wan_kernels
from factories import dit_inputs, random_dit
from parity_support import ParityCase, assert_matches
from wan_kernels import triton as fused
from wan_models import DiTConfig, WanDiT, ops

pytestmark = pytest.mark.skipif(not fused.status()[0], reason=f"fused kernels unavailable: {fused.status()[1]}")


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm())


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 matmuls/convolutions on GPU, so float32 comparisons mean float32."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.fixture
def kernels_only(monkeypatch):
    """Fused ops whose torch fallback raises, so the DiT provably ran every Triton kernel."""
    from wan_kernels.triton import gated_residual, modulate, rmsnorm, rope

    def refuse(*args, **kwargs):
        raise AssertionError("a fused op fell back to torch inside the DiT")

    for module, name in ((rmsnorm, "torch_rms_norm"), (rope, "torch_apply_rope"),
                         (modulate, "torch_modulate"), (gated_residual, "torch_gated_residual")):
        monkeypatch.setattr(module, name, refuse)


def _run(model: WanDiT, inputs, device) -> torch.Tensor:
    x, t, ctx = (v.to(device) for v in inputs)
    with torch.no_grad():
        return model(x, t, ctx).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_dit_fused_matches_plain(dtype: torch.dtype, device, kernels_only) -> None:
    model = random_dit().to(device, dtype)
    inputs = dit_inputs(batch=2)
    plain = _run(model, inputs, device)
    wan_kernels.enable()
    assert all(ops.get_op(name) is not fn for name, fn in ops.DEFAULTS.items())
    fast = _run(model, inputs, device)
    report = wan_kernels.attention_report()
    assert report.installed and sum(report.calls.values()) == 2 * model.config.num_layers  # self + cross
    if dtype == torch.float32:
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    else:
        assert rel_l2(fast, plain) < 2e-2


def test_parity_dit_t2v_with_kernels_enabled(device, kernels_only) -> None:
    """Fused ops + auto attention still reproduce the official WanModel at the fixture tolerance."""
    case = ParityCase.load("dit_t2v")
    with torch.device("meta"):
        model = WanDiT(DiTConfig.from_official(case.config, clip_dim=case.constants.get("clip_dim", 1280)))
    model.load_state_dict(case.weights, strict=True, assign=True)
    model = model.eval().to(device)
    wan_kernels.enable()
    i = case.inputs
    with torch.no_grad():
        out = model(i["x"].to(device), i["t"].to(device), i["context"].to(device))
    # On GPU, flash backends take only fp16/bf16, so this float32 model runs SDPA per call.
    assert_matches(case, {"out": out})
