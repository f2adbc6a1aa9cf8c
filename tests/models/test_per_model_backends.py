"""Per-model attention backends and ops: a DiT carries its own (``WanDiT.set_attention_backend`` /
``set_ops``); one given nothing uses the process-wide defaults.

Exactness: the recording backends and ops wrap the torch references, so every output must equal the
plain single-model run bit for bit (``torch.equal``) on fresh random inputs.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from factories import TINY_DIT, dit_inputs, random_dit
from wan_models import ops
from wan_models.attention import AttentionFn, get_attention_backend, sdpa_attention, set_attention_backend
from wan_models.dit import CrossAttention, SelfAttention

GRID_A, GRID_B = (3, 4, 6), (2, 4, 4)  # 18 and 8 tokens: each call's q length says which DiT made it


def recording(calls: list[int]) -> AttentionFn:
    """SDPA that appends each call's query length to ``calls``."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape[1])
        return sdpa_attention(q, k, v)
    return attend


def recording_op(name: str, calls: list[str]) -> Callable:
    """The torch reference of op ``name`` that appends ``name`` to ``calls``."""
    reference = ops.DEFAULTS[name]

    def op(*args):
        calls.append(name)
        return reference(*args)
    return op


@pytest.fixture
def two_dits():
    """Two DiTs of different weights with inputs of different token counts, and their plain outputs."""
    dit_a, dit_b = random_dit(seed=0), random_dit(seed=1)
    inputs_a, inputs_b = dit_inputs(grid=GRID_A, seed=2), dit_inputs(grid=GRID_B, seed=3)
    with torch.no_grad():
        plain_a, plain_b = dit_a(*inputs_a), dit_b(*inputs_b)
    return (dit_a, inputs_a, plain_a), (dit_b, inputs_b, plain_b)


def test_two_dits_use_their_own_attention(two_dits) -> None:
    (dit_a, inputs_a, plain_a), (dit_b, inputs_b, plain_b) = two_dits
    own, default = [], []
    assert dit_a.set_attention_backend(recording(own)) is None
    set_attention_backend(recording(default))  # the process-wide default: dit_b was given nothing
    with torch.no_grad():
        out_b, out_a, again_b = dit_b(*inputs_b), dit_a(*inputs_a), dit_b(*inputs_b)
    assert torch.equal(out_a, plain_a) and torch.equal(out_b, plain_b) and torch.equal(again_b, plain_b)
    layers = TINY_DIT.num_layers
    assert own == [18] * (2 * layers)  # self + cross attention of every block of dit_a, nothing else
    assert default == [8] * (4 * layers)  # dit_b's, twice
    assert all(m.attention_fn is None for m in dit_b.modules() if isinstance(m, (SelfAttention, CrossAttention)))


def test_dit_given_none_goes_back_to_the_process_default(two_dits) -> None:
    (dit_a, inputs_a, plain_a), _ = two_dits
    own, default = [], []
    mine = recording(own)
    dit_a.set_attention_backend(mine)
    assert dit_a.set_attention_backend(None) is mine
    previous = set_attention_backend(recording(default))
    with torch.no_grad():
        assert torch.equal(dit_a(*inputs_a), plain_a)
    assert not own and len(default) == 2 * TINY_DIT.num_layers
    set_attention_backend(previous)
    assert get_attention_backend() is previous


def test_two_dits_use_their_own_ops(two_dits) -> None:
    (dit_a, inputs_a, plain_a), (dit_b, inputs_b, plain_b) = two_dits
    layers = TINY_DIT.num_layers
    modulates, norms = 2 * layers + 1, 4 * layers  # per forward: 2 per block + the head; q/k norms
    own, default = [], []
    dit_a.set_ops({name: recording_op(name, own) for name in ("modulate", "rms_norm")})
    ops.set_op("modulate", recording_op("modulate", default))  # the process-wide default: dit_b was given nothing
    with torch.no_grad():
        assert torch.equal(dit_a(*inputs_a), plain_a) and torch.equal(dit_b(*inputs_b), plain_b)
    assert sorted(own) == ["modulate"] * modulates + ["rms_norm"] * norms and default == ["modulate"] * modulates
    own.clear()
    default.clear()
    dit_a.set_ops({"rms_norm": recording_op("rms_norm", own)})  # ops it does not name are the process-wide ones
    with torch.no_grad():
        assert torch.equal(dit_a(*inputs_a), plain_a)
    assert own == ["rms_norm"] * norms and default == ["modulate"] * modulates


def test_bad_per_model_hooks_are_refused() -> None:
    dit = random_dit()
    with pytest.raises(KeyError, match="unknown op 'softmax'.*rms_norm"):
        dit.set_ops({"softmax": torch.softmax})
    with pytest.raises(TypeError, match="callable"):
        dit.set_attention_backend("flash2")
    assert dit.op_overrides is None and dit.attention_fn is None


def test_own_backend_runs_outside_a_compiled_graph(two_dits) -> None:
    """Under torch.compile a model's own backend is called eagerly (a graph break), as the process-wide one is."""
    (dit_a, inputs_a, plain_a), _ = two_dits
    calls: list[int] = []
    dit_a.set_attention_backend(recording(calls))
    prepared = dit_a.prepare(*inputs_a)
    block = torch.compile(dit_a.blocks[0], backend="eager")
    with torch.no_grad():
        compiled = block(prepared.tokens, prepared.e0, prepared.context, prepared.rope)
        eager = dit_a.blocks[0](prepared.tokens, prepared.e0, prepared.context, prepared.rope)
    assert torch.equal(compiled, eager) and calls == [18, 18, 18, 18]
