"""The replaceable elementwise ops: registry behaviour and that the DiT really calls them."""

from __future__ import annotations

import pytest
import torch

from factories import dit_inputs, random_dit
from wan_models import ops


def test_unknown_op_is_named() -> None:
    with pytest.raises(KeyError, match="unknown op 'softmax'.*rms_norm"):
        ops.set_op("softmax", lambda x: x)


@pytest.mark.parametrize("name", list(ops.DEFAULTS))
def test_dit_calls_each_op_and_restores(name: str) -> None:
    model = random_dit()
    x, t, ctx = dit_inputs()
    calls = []
    reference = ops.DEFAULTS[name]

    def spy(*args, **kwargs):
        calls.append(name)
        return reference(*args, **kwargs)

    with torch.no_grad():
        expected = model(x, t, ctx)
        previous = ops.set_op(name, spy)
        try:
            actual = model(x, t, ctx)
        finally:
            ops.set_op(name, previous)
    assert calls and ops.get_op(name) is reference
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
