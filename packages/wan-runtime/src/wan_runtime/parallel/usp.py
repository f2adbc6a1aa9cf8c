"""Unified sequence parallel (USP): the DiT's video tokens split across the ranks of a process group.

After :meth:`WanDiT.prepare` each rank keeps one contiguous slice of the token sequence (padded at
the end to a multiple of the world size) with the matching RoPE rows and, for per-token timesteps
(Wan 2.2), the matching rows of the block modulation ``e0``; VACE hints are computed on the same
slices. Everything in a block except self-attention works token by token, so it runs on the
slice as it is. Cross-attention needs nothing: its queries are local and the text context is
replicated. Self-attention is Ulysses: one all-to-all turns the q/k/v slices into whole sequences of
a subset of the heads, the module's own attention backend (else the process-wide one) attends over
the real (unpadded) positions, and a second all-to-all brings the outputs back. Heads are split as
evenly as they go, so any head count works on any world size. The slices are gathered again before
the head. This attention is each wrapped DiT's own (its self-attention modules' ``attention_fn``,
:class:`SequenceParallelAttention`): no process-wide backend is swapped, so another DiT (the other
Wan 2.2 expert, a plain one), or the same DiT called directly, runs as in one process.

With xfuser installed on CUDA its ``xFuserLongContextAttention`` (Ulysses x ring) replaces the
built-in all-to-all for sequences that need no padding (it cannot mask padding keys).

Inference only: the collectives here do not carry gradients.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Iterator
from weakref import WeakKeyDictionary

import torch
import torch.distributed as dist

from wan_models import WanDiT
from wan_models.attention import AttentionFn, get_attention_backend
from wan_models.dit import DiTInputs, SelfAttention

from ..units import noise

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- process group -------------------------------------------------------------------------------

def init_process_group(device: str | torch.device = "cuda") -> torch.device:
    """Join the ``torchrun`` process group unless this process already has one; returns this rank's device.

    The group comes from torchrun's environment (``env://``): NCCL on CUDA, gloo on CPU. On CUDA each
    rank takes GPU ``LOCAL_RANK`` (whatever index ``device`` names) so that ranks never share a GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [name for name in TORCHRUN_ENV if name not in os.environ]
        if missing:
            raise RuntimeError(f"use_usp=True runs one process per device under torchrun "
                               f"(torchrun --nproc_per_node=N script.py); {', '.join(missing)} not set")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
        logger.info("rank %d of %d joined the process group (%s) on %s", dist.get_rank(),
                    dist.get_world_size(), dist.get_backend(), device)
    return device


def enable_usp(pipe: Any, group: dist.ProcessGroup | None = None) -> "SequenceParallel":
    """Make ``pipe`` (a ``WanVideoPipeline``) run its DiT, and its low-noise expert ``dit2`` if any,
    sequence-parallel over ``group`` (None: all ranks), each with its own sequence-parallel attention.

    Every rank must run the same generation call: unseeded noise is taken from the group's first
    rank so that all ranks denoise the same latents. On CUDA with xfuser installed (and the whole
    world as the group), xfuser's attention does the self-attention where it can.
    """
    if pipe.dit is None:
        raise ValueError("enable_usp needs the pipeline's DiT to be loaded first")
    if not dist.is_initialized():
        raise RuntimeError("no torch.distributed process group: call init_process_group() under torchrun first")
    xfuser = xfuser_attention(pipe.dit.config.num_heads) if pipe.device.type == "cuda" and group is None else None
    pipe.sequence_parallel = SequenceParallel(group, parallel_attention=xfuser)
    for dit in (pipe.dit, getattr(pipe, "dit2", None)):
        if dit is not None:
            pipe.sequence_parallel.install(dit)
    if same_noise_on_every_rank not in pipe.units:
        pipe.units.insert(pipe.units.index(noise.initial_noise) + 1, same_noise_on_every_rank)
    logger.info("sequence parallel DiT over %d ranks (self-attention: %s)", pipe.sequence_parallel.world,
                "xfuser where unpadded, else built-in Ulysses" if xfuser else "built-in Ulysses")
    return pipe.sequence_parallel


def same_noise_on_every_rank(pipe: Any, request: Any, cond: Any) -> None:
    """Pipeline unit: unseeded noise differs per process, so every rank takes the first rank's.

    Seeded noise is drawn identically everywhere and needs no communication.
    """
    if request.seed is None and pipe.sequence_parallel is not None:
        pipe.sequence_parallel.broadcast(cond.noise)
        cond.latents = cond.noise


# -- the sequence-parallel DiT -------------------------------------------------------------------

@dataclass
class ShardedInputs(DiTInputs):
    """:class:`DiTInputs` whose ``tokens``, ``rope`` rows, ``hints`` and per-token ``e0`` are this rank's slice.

    ``length`` is the real sequence length; the slices cover it padded to a multiple of the world size.
    ``e`` stays whole: the head runs on the gathered sequence.
    """

    length: int


class SequenceParallel:
    """The process group and self-attention a sequence-parallel DiT runs with.

    ``parallel_attention`` optionally takes over the self-attention on ``[B, L/P, H, D]`` slices
    (xfuser's) for sequences that need no padding; the built-in Ulysses attention does the rest.
    """

    def __init__(self, group: dist.ProcessGroup | None = None,
                 parallel_attention: AttentionFn | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.parallel_attention = parallel_attention
        self._sharding: WeakKeyDictionary[WanDiT, _Sharding] = WeakKeyDictionary()

    def wrap(self, dit: WanDiT) -> "SequenceParallelDiT":
        """``dit`` with the stages :func:`wan_runtime.denoise.predict` calls, run sequence-parallel."""
        return SequenceParallelDiT(dit, self)

    def install(self, dit: WanDiT) -> "_Sharding":
        """Give ``dit``'s self-attention modules this group's attention as their own backend, keeping the
        one each had as the local part (again where it was replaced since); returns the DiT's sharding."""
        sharding = self._sharding.setdefault(dit, _Sharding())
        for module in dit.modules():
            if not isinstance(module, SelfAttention):
                continue
            local = module.attention_fn
            if isinstance(local, SequenceParallelAttention):
                if local.sharding is sharding:
                    continue
                local = local.local
            module.attention_fn = SequenceParallelAttention(self, local, sharding)
        return sharding

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` in place with the group's first rank's."""
        dist.broadcast(tensor, src=dist.get_global_rank(self.group or dist.group.WORLD, 0), group=self.group)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of ``x`` along ``dim``, zero-padded at the end of the sequence."""
        size = x.shape[dim]
        per_rank = -(-size // self.world)
        start = min(self.rank * per_rank, size)
        part = x.narrow(dim, start, min(per_rank, size - start))
        missing = per_rank - part.shape[dim]
        if missing:
            part = torch.cat([part, part.new_zeros(*part.shape[:dim], missing, *part.shape[dim + 1:])], dim)
        return part.contiguous()

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """The whole sequence ``[B, length, ...]`` from every rank's slice ``[B, L/P, ...]``."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :length]

    def self_attention(self, local: AttentionFn, length: int) -> AttentionFn:
        """Self-attention over this group's slices of a ``length``-token sequence."""
        padded = -(-length // self.world) * self.world
        if self.parallel_attention is not None and padded == length:
            return self.parallel_attention
        return partial(ulysses_attention, local=local, length=length, group=self.group)


@dataclass
class _Sharding:
    """The real token count while a DiT's blocks run on slices; ``None`` while it runs whole."""

    length: int | None = None


class SequenceParallelAttention:
    """A self-attention module's own backend under USP: across the group while its DiT runs on slices,
    else (the DiT called directly) the module's ``local`` backend, or the process-wide one if ``None``."""

    def __init__(self, parallel: SequenceParallel, local: AttentionFn | None, sharding: _Sharding) -> None:
        self.parallel = parallel
        self.local = local
        self.sharding = sharding

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        local = get_attention_backend() if self.local is None else self.local
        if self.sharding.length is None:
            return local(q, k, v)
        return self.parallel.self_attention(local, self.sharding.length)(q, k, v)


class SequenceParallelDiT:
    """A :class:`WanDiT` whose blocks run on this rank's slice of the tokens; same call and stages.

    ``prepare`` returns :class:`ShardedInputs`, ``run_blocks`` runs on them (so step caches such as
    TeaCache work unchanged, on slices) and ``finish`` gathers the tokens before the head. Every
    rank gets the whole output.
    """

    def __init__(self, dit: WanDiT, parallel: SequenceParallel) -> None:
        self.dit = dit
        self.parallel = parallel
        self._sharding = parallel.install(dit)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 **inputs: Any) -> torch.Tensor:
        """Same as ``WanDiT.forward``."""
        prepared = self.prepare(x, timestep, context, **inputs)
        return self.finish(self.run_blocks(prepared), prepared)

    def prepare(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *,
                vace_context: torch.Tensor | None = None, **inputs: Any) -> ShardedInputs:
        """``WanDiT.prepare`` with the token sequence sliced; VACE hints are computed on the slices."""
        if vace_context is not None and not self.dit.config.vace_layers:
            raise ValueError(f"vace_context given, but this {self.dit.config.variant} model has no input for it")
        full = self.dit.prepare(x, timestep, context, **inputs)
        length = full.tokens.shape[1]
        values = {f.name: getattr(full, f.name) for f in fields(full)}
        values.update(tokens=self.parallel.shard(full.tokens, 1),
                      rope=tuple(self.parallel.shard(table, 0) for table in full.rope))
        if full.e0.ndim == 4:  # per-token modulation [B, L, 6, dim] goes with its tokens
            values.update(e0=self.parallel.shard(full.e0, 1))
        sharded = ShardedInputs(**values, length=length)
        if vace_context is not None:
            sharded.hints = self._vace_hints(sharded, vace_context)
        return sharded

    def run_blocks(self, inputs: ShardedInputs, tokens: torch.Tensor | None = None, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
        """``WanDiT.run_blocks`` (blocks ``start`` to ``end - 1``) on this rank's slice."""
        with self._sharded(inputs.length):
            return self.dit.run_blocks(inputs, tokens, start, end)

    def finish(self, tokens: torch.Tensor, inputs: ShardedInputs) -> torch.Tensor:
        """Gather every rank's slice, then ``WanDiT.finish`` (head, unpatchify) on the whole sequence."""
        return self.dit.finish(self.parallel.gather(tokens, inputs.length), inputs)

    def _vace_hints(self, inputs: ShardedInputs, vace_context: torch.Tensor) -> list[torch.Tensor]:
        """``WanDiT.vace_hints`` on slices: the VACE blocks run sequence-parallel like the main ones."""
        c = self.parallel.shard(self.dit.embed_vace(vace_context), 1)
        with self._sharded(inputs.length):
            return self.dit.vace_hints(inputs.tokens, c, inputs.e0, inputs.context, inputs.rope)

    @contextmanager
    def _sharded(self, length: int) -> Iterator[None]:
        """While inside, the DiT's self-attention (its :class:`SequenceParallelAttention`) attends across
        ranks over ``length`` real tokens; cross-attention stays local."""
        previous, self._sharding.length = self._sharding.length, length
        try:
            yield
        finally:
            self._sharding.length = previous


# -- Ulysses attention with an uneven head split -------------------------------------------------

def head_split(heads: int, world: int) -> list[int]:
    """How many heads each rank attends: as even as possible, the first ranks taking the extra ones."""
    base, extra = divmod(heads, world)
    return [base + (rank < extra) for rank in range(world)]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, local: AttentionFn,
                      length: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Self-attention over a sequence split across ``group``: ``[B, L/P, H, D]`` slices in and out.

    An all-to-all gives each rank the whole (padded) sequence of its heads (:func:`head_split`, so
    12 heads on 8 ranks attend as 2,2,2,2,1,1,1,1 and a rank may get none); ``local`` attends over the
    first ``length`` positions only, so padding never becomes a key; a second all-to-all returns
    each rank its slice of every head. Exact: each head sees exactly what it sees in one process.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    splits = head_split(q.shape[-2], world)
    q, k, v = _sequence_to_heads(torch.stack((q, k, v)), splits, rank, group).unbind(0)
    out = torch.zeros_like(q)
    if splits[rank]:
        out[:, :length] = local(q[:, :length], k[:, :length], v[:, :length])
    return _heads_to_sequence(out, splits, group)


def _sequence_to_heads(x: torch.Tensor, splits: list[int], rank: int,
                       group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[..., S, H, D]`` sequence slices -> ``[..., P*S, splits[rank], D]`` whole sequences of this rank's heads."""
    world = len(splits)
    send = x.movedim(-2, 0).contiguous()  # [H, ..., S, D]: each rank's heads are one block of rows
    recv = send.new_empty(world * splits[rank], *send.shape[1:])
    dist.all_to_all_single(recv, send, [splits[rank]] * world, splits, group=group)
    # [P, h, ..., S, D] -> [..., P, S, h, D] -> [..., P*S, h, D]
    return recv.unflatten(0, (world, splits[rank])).movedim(0, -3).movedim(0, -2).flatten(-4, -3)


def _heads_to_sequence(x: torch.Tensor, splits: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Inverse of :func:`_sequence_to_heads`: ``[..., P*S, h, D]`` -> ``[..., S, H, D]``."""
    world, heads = len(splits), x.shape[-2]
    # [..., P, S, h, D] -> [P, h, ..., S, D]: the rows for each destination rank are one block
    send = x.unflatten(-3, (world, -1)).movedim(-2, 0).movedim(-3, 0).contiguous()
    recv = send.new_empty(sum(splits), *send.shape[2:])
    dist.all_to_all_single(recv, send.flatten(0, 1), splits, [heads] * world, group=group)
    return recv.movedim(0, -2)


# -- xfuser (CUDA only) --------------------------------------------------------------------------

def xfuser_attention(num_heads: int) -> AttentionFn | None:
    """xDiT's ``xFuserLongContextAttention`` over the whole world, or None without xfuser.

    Ulysses over ``gcd(num_heads, world)`` ranks and ring attention across the rest, so that any
    head count works exactly. xfuser cannot be imported without a GPU: call this on CUDA only.
    """
    try:
        from xfuser.core.distributed import (init_distributed_environment, initialize_model_parallel,
                                             model_parallel_is_initialized)
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
    except ImportError as error:
        logger.info("xfuser not usable (%s): built-in Ulysses attention", error)
        return None
    world = dist.get_world_size()
    init_distributed_environment(rank=dist.get_rank(), world_size=world)
    if not model_parallel_is_initialized():
        ulysses = math.gcd(num_heads, world)
        initialize_model_parallel(sequence_parallel_degree=world, ulysses_degree=ulysses,
                                  ring_degree=world // ulysses)
    attention = xFuserLongContextAttention()
    return lambda q, k, v: attention(None, query=q, key=k, value=v)
