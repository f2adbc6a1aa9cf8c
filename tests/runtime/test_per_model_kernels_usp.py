"""Kernels and sequence parallel configure the DiTs they are given, not the process.

``wan_kernels.enable(modules=...)`` / ``acceleration.enable_kernels(modules=...)`` give a DiT its own
dispatcher and ops; USP gives each wrapped DiT its own sequence-parallel self-attention, so a plain
DiT (or the same one called directly) runs as in one process. USP runs here on a one-rank gloo group
in this process (the 2- and 3-rank runs are tests/runtime/test_usp.py).

Exactness: outputs equal the plain run bit for bit (``torch.equal``), except the ``math`` backend
against SDPA, held to float32 rounding (``rtol=atol=1e-5``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

import wan_kernels
from factories import TINY_DIT, dit_inputs, random_dit
from wan_kernels.attention import AttentionDispatcher
from wan_models import ops
from wan_models.attention import AttentionFn, get_attention_backend, sdpa_attention, set_attention_backend
from wan_models.dit import SelfAttention
from wan_runtime.acceleration import enable_kernels
from wan_runtime.parallel import SequenceParallel, SequenceParallelAttention, enable_usp
from wan_runtime.units import noise

LAYERS = TINY_DIT.num_layers


@pytest.fixture(autouse=True)
def _pristine_process_hooks() -> None:
    """Start from the process-wide defaults (SDPA, the torch ops): pipelines loaded by module-scoped
    fixtures elsewhere switch kernels on process-wide before the conftest can record the state. The
    conftest puts the earlier state back after each test."""
    wan_kernels.disable()
    set_attention_backend(None)
    for name in ops.DEFAULTS:
        ops.set_op(name, None)


def recording(calls: list[int]) -> AttentionFn:
    """SDPA that appends each call's query length to ``calls``."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape[1])
        return sdpa_attention(q, k, v)
    return attend


def self_attention_fns(dit) -> list:
    return [m.attention_fn for m in dit.modules() if isinstance(m, SelfAttention)]


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-process gloo group, destroyed afterwards (other tests expect none)."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- wan_kernels / acceleration --------------------------------------------------------------------

def test_enable_for_a_model_leaves_the_process_and_other_models_alone() -> None:
    dit_a, dit_b = random_dit(seed=0), random_dit(seed=1)
    inputs = dit_inputs(seed=2)
    with torch.no_grad():
        plain_a, plain_b = dit_a(*inputs), dit_b(*inputs)
        assert wan_kernels.enable("math", modules=dit_a) == "math"
        assert isinstance(dit_a.attention_fn, AttentionDispatcher) and dit_b.attention_fn is None
        assert get_attention_backend() is sdpa_attention
        out_a, out_b = dit_a(*inputs), dit_b(*inputs)
    torch.testing.assert_close(out_a, plain_a, rtol=1e-5, atol=1e-5)  # math vs SDPA: float32 rounding
    assert torch.equal(out_b, plain_b)
    assert wan_kernels.attention_report(model=dit_a).calls == {"math": 2 * LAYERS}
    report = wan_kernels.attention_report()  # the last enable()'s selection
    assert report.installed and report.active == "math"
    wan_kernels.disable()
    assert dit_a.attention_fn is None and not wan_kernels.attention_report().installed


def test_enable_kernels_configures_the_given_dits_and_skips_none(monkeypatch) -> None:
    """Fused ops (stood in for by a recording reference: no Triton here) go to the model's own ops."""
    calls: list[str] = []

    def modulate(*args):
        calls.append("modulate")
        return ops.modulate(*args)

    monkeypatch.setattr(wan_kernels, "_fused_ops", lambda: {"modulate": modulate})
    dit, other = random_dit(seed=0), random_dit(seed=1)
    inputs = dit_inputs(seed=2)
    with torch.no_grad():
        plain = dit(*inputs)
        assert enable_kernels("sdpa", modules=[dit, None]) == "sdpa"
        assert dit.op_overrides == {"modulate": modulate} and ops.get_op("modulate") is ops.modulate
        assert torch.equal(dit(*inputs), plain) and len(calls) == 2 * LAYERS + 1
        other(*inputs)
    assert len(calls) == 2 * LAYERS + 1 and other.op_overrides is None
    enable_kernels("sdpa", modules=dit)  # again: first undoes the previous call there
    wan_kernels.disable()
    assert dit.op_overrides is None and dit.attention_fn is None


def test_enable_refuses_modules_without_their_own_hooks() -> None:
    with pytest.raises(TypeError, match="set_attention_backend"):
        wan_kernels.enable("sdpa", modules=[random_dit(), torch.nn.Linear(2, 2)])
    assert get_attention_backend() is sdpa_attention


# -- sequence parallel -----------------------------------------------------------------------------

def test_sequence_parallel_and_plain_dits_coexist(one_rank) -> None:
    dit_a, dit_b = random_dit(seed=0), random_dit(seed=1)
    inputs_a, inputs_b = dit_inputs(grid=(3, 4, 6), seed=2), dit_inputs(grid=(2, 4, 4), seed=3)  # 18, 8 tokens
    with torch.no_grad():
        plain_a, plain_b = dit_a(*inputs_a), dit_b(*inputs_b)
    own, default = [], []
    dit_a.set_attention_backend(recording(own))
    set_attention_backend(recording(default))
    wrapped = SequenceParallel().wrap(dit_a)
    assert all(isinstance(fn, SequenceParallelAttention) for fn in self_attention_fns(dit_a))
    with torch.no_grad():
        parallel_a, out_b, direct_a = wrapped(*inputs_a), dit_b(*inputs_b), dit_a(*inputs_a)
    assert torch.equal(parallel_a, plain_a) and torch.equal(direct_a, plain_a) and torch.equal(out_b, plain_b)
    assert own == [18] * (4 * LAYERS)  # dit_a's own backend did its local attention, parallel and direct
    assert default == [8] * (2 * LAYERS) and self_attention_fns(dit_b) == [None] * LAYERS


def test_wrapping_again_reuses_or_renews_the_attention(one_rank) -> None:
    dit = random_dit()
    parallel = SequenceParallel()
    parallel.wrap(dit)
    installed = self_attention_fns(dit)
    parallel.wrap(dit)
    assert self_attention_fns(dit) == installed  # the same objects: nothing changes between calls
    calls: list[int] = []
    mine = recording(calls)
    dit.set_attention_backend(mine)  # replaces it; the next wrap puts it back around the new backend
    parallel.wrap(dit)
    assert all(isinstance(fn, SequenceParallelAttention) and fn.local is mine for fn in self_attention_fns(dit))


@pytest.mark.parametrize("with_expert", [True, False], ids=["dit2", "no-dit2"])
def test_enable_usp_gives_each_dit_its_own_attention(one_rank, with_expert: bool) -> None:
    pipe = SimpleNamespace(dit=random_dit(seed=0), dit2=random_dit(seed=1) if with_expert else None,
                           device=torch.device("cpu"), units=[noise.initial_noise], sequence_parallel=None)
    enable_usp(pipe)
    dits = [pipe.dit, pipe.dit2] if with_expert else [pipe.dit]
    shardings = set()
    for dit in dits:
        fns = self_attention_fns(dit)
        assert all(isinstance(fn, SequenceParallelAttention) for fn in fns)
        shardings |= {id(fn.sharding) for fn in fns}
    assert len(shardings) == len(dits) and get_attention_backend() is sdpa_attention
