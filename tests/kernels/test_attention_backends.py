"""Every attention backend available on this machine against the float32 math reference.

Inputs are fresh random ``[B, L, H, D]`` tensors in the DiT's two layouts: self-attention over
video tokens (a 3x10x13 token grid, 390 tokens) and cross-attention from those tokens to 512 text
tokens, with head dims 64, 96 and 128 (128 is every released Wan model's). The reference gets the
same (already rounded) inputs, so the tolerances measure only the backend's own arithmetic:

- float32: ``rtol=1e-4, atol=1e-5`` (SDPA on CPU measured ~1e-6)
- bfloat16: ``rtol=atol=2e-2`` (bf16 output rounding is 2^-9 relative; flash kernels round the
  softmax probabilities to bf16 before P.V)
- float16: ``rtol=atol=5e-3``
- sage (int8 Q.K^T): relative L2 error below 5e-2 instead of elementwise bounds.

On CPU only ``sdpa`` and ``math`` run; on a CUDA machine with the packages, ``flash3``/``flash2``/
``sage`` too, each in the dtypes it supports.
"""

from __future__ import annotations

import pytest
import torch

from wan_kernels import available_backends
from wan_kernels.attention import get_backend, math_attention

HAS_CUDA = torch.cuda.is_available()
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
QUANTIZED = {"sage": 5e-2}  # backend -> max relative L2 error
LAYOUTS = {"self_video": (390, 390), "cross_text": (390, 512)}
HEAD_DIMS = (64, 96, 128)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm())


def _cases() -> list:
    device = "cuda" if HAS_CUDA else "cpu"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    cases = []
    for name in available_backends():
        if name == "math":
            continue
        for dtype in dtypes:
            for layout in LAYOUTS:
                for head_dim in HEAD_DIMS:
                    cases.append(pytest.param(name, device, dtype, layout, head_dim,
                                              id=f"{name}-{str(dtype)[6:]}-{layout}-d{head_dim}"))
    return cases


def _inputs(lq: int, lk: int, head_dim: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    heads = 4
    q = torch.randn(2, lq, heads, head_dim, generator=gen)
    k = torch.randn(2, lk, heads, head_dim, generator=gen)
    v = torch.randn(2, lk, heads, head_dim, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


@pytest.mark.parametrize("name, device, dtype, layout, head_dim", _cases())
def test_backend_matches_math_reference(name: str, device: str, dtype: torch.dtype, layout: str,
                                        head_dim: int) -> None:
    backend = get_backend(name)
    q, k, v = _inputs(*LAYOUTS[layout], head_dim, dtype, device, seed=head_dim)
    ok, reason = backend.supports(q, k, v)
    if not ok:
        pytest.skip(f"{name} does not take {dtype} d{head_dim} on {device}: {reason}")
    actual = backend.fn(q, k, v)
    expected = math_attention(q, k, v)
    assert actual.shape == q.shape and actual.dtype == q.dtype
    assert expected.abs().mean() > 0.05  # a real mix of values, not a degenerate softmax
    if name in QUANTIZED:
        assert rel_l2(actual, expected) < QUANTIZED[name]
    else:
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_math_reference_matches_float64() -> None:
    """The reference itself: float32 math vs the same formula in float64 (max error ~1e-6)."""
    q, k, v = _inputs(96, 128, 128, torch.float32, "cpu", seed=0)
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    want = ((q64 @ k64.transpose(-1, -2)) / 128 ** 0.5).softmax(-1) @ v64
    torch.testing.assert_close(math_attention(q, k, v).double(), want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_sdpa_and_math_always_available() -> None:
    names = available_backends()
    assert names[-1] == "math" and "sdpa" in names
    if not HAS_CUDA:
        assert names == ["sdpa", "math"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_best_gpu_backend_runs_the_dit_attention_shapes() -> None:
    """The backend auto-selection installs runs bf16 at the real head layout (12 x 128)."""
    from wan_kernels.attention import select

    dispatcher = select("auto")
    q, k, v = _inputs(1560, 1560, 128, torch.bfloat16, "cuda", seed=1)
    q, k, v = (t.repeat(1, 1, 3, 1) for t in (q, k, v))
    out = dispatcher(q, k, v)
    assert dispatcher.calls[dispatcher.active] == 1
    tol = QUANTIZED.get(dispatcher.active, 2e-2)
    assert rel_l2(out, math_attention(q, k, v)) < tol
