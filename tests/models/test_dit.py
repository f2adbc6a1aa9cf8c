"""DiT behaviour beyond the fixtures: batching, input validation and the attention hook."""

from __future__ import annotations

import pytest
import torch

import wan_models
from wan_models.attention import sdpa_attention
from factories import TINY_DIT as TINY, dit_inputs as inputs, random_dit as make


def test_batch_rows_are_independent() -> None:
    model = make()
    x, t, ctx = inputs(TINY, batch=2)
    with torch.no_grad():
        both = model(x, t, ctx)
        one = model(x[1:], t[1:], ctx[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_attention_hook_is_used_and_restored() -> None:
    model = make()
    x, t, ctx = inputs(TINY)
    calls = []

    def counting(q, k, v):
        calls.append(q.shape)
        return sdpa_attention(q, k, v)

    previous = wan_models.set_attention_backend(counting)
    try:
        with torch.no_grad():
            model(x, t, ctx)
    finally:
        wan_models.set_attention_backend(previous)
    assert len(calls) == 2 * TINY.num_layers  # self + cross attention per block
    assert wan_models.get_attention_backend() is previous


@pytest.mark.parametrize("change, message", [
    (lambda x, t, c: (x[:, :8], t, c), "channels"),
    (lambda x, t, c: (x[..., :3], t, c), "not divisible by the patch"),
    (lambda x, t, c: (x, t, c[..., :5]), "context must be"),
    (lambda x, t, c: (x[0], t, c), "x must be"),
])
def test_bad_inputs_are_named(change, message) -> None:
    model = make()
    with pytest.raises(ValueError, match=message):
        model(*change(*inputs(TINY)))


def test_inputs_for_missing_parts_are_refused() -> None:
    model = make()
    x, t, ctx = inputs(TINY)
    with pytest.raises(ValueError, match="no image input"):
        model(x, t, ctx, clip_feature=torch.randn(1, 257, 1280))
    with pytest.raises(ValueError, match="reference_latents given"):
        model(x, t, ctx, reference_latents=torch.randn(1, 16, 1, 4, 6))
    with pytest.raises(ValueError, match="vace_context given"):
        model(x, t, ctx, vace_context=torch.randn(1, 96, 3, 4, 6))
