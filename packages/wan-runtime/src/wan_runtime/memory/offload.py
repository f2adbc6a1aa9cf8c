"""Layer-wise weight offloading (VRAM management).

Every network keeps its weights in its *storage place*: the device and dtype it was loaded with
(``ModelConfig.offload_device`` / ``offload_dtype``, e.g. CPU memory in float8). A layer's weights
come to the compute device just before the layer runs and are dropped after it, unless the plan
keeps the layer *resident* (on the compute device for as long as its network is in use). Coming
over, float8 weights are upcast to the pipeline dtype; any other dtype is kept, so that without
float8 a network computes exactly what it computes without offloading.

Mechanism: forward hooks on the modules owning parameters swap ``param.data`` between the stored
tensor and its compute copy. Parameter objects and state-dict keys never change, and between
calls every parameter holds its stored tensor, so LoRA merging and checkpoint saving act on the
stored weights. Nothing is written back: compute copies are discarded.

Units and budget: a *unit* is a module's own parameters plus those of the children its forward
reads directly (declared as ``children_read_directly``). Resident units are chosen smallest first
until the budget is spent: a small layer's transfer costs mostly latency and its compute is too
short to hide it, so keeping small layers saves the most transfers per byte. The budget covers the bytes of weights
on the compute side at every moment: resident units, the streamed units running (a unit and the
units enclosing it) and one prefetched unit; activations are not counted (``vram_buffer`` is
their headroom). One network is *active* (holds its resident units) at a time: the first layer
of another network to run offloads it. With an expert pair (``dit`` and ``dit2``) only the active
expert's layers are on the compute device; each switch between them is logged and kept in
:attr:`VramManager.switches` (bytes brought over, seconds).

Prefetch (CUDA): when a streamed unit starts, the unit that followed it last time is copied on a
side stream, from pinned host memory, while this one computes; the current stream waits on an
event before using it. Elsewhere the same logic runs with immediate copies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from ..pipeline import WanVideoPipeline

logger = logging.getLogger(__name__)

GIB = 1 << 30
# The pipeline's networks, in the order they are managed.
PIPELINE_NETWORKS = ("text_encoder", "image_encoder", "motion_controller", "vae", "dit", "dit2")
EXPERTS = ("dit", "dit2")  # an expert pair's slots: a change of the active network between them is a switch

# The class attributes through which a network declares what its forward does outside its
# children's calls (documented in :mod:`wan_models.ops`); any module class may set them.
CHILDREN_READ_DIRECTLY = "children_read_directly"
DTYPE_PARAMETERS = "dtype_parameters"


def is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def format_bytes(nbytes: float) -> str:
    """``1.5 GiB``, ``12.0 MiB``, ``3.2 KiB`` or ``17 B``."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def declared(module: nn.Module, attribute: str) -> tuple[str, ...]:
    """The names ``module``'s class declares in ``attribute`` (:data:`CHILDREN_READ_DIRECTLY` or
    :data:`DTYPE_PARAMETERS`); none when it declares nothing."""
    return tuple(getattr(module, attribute, ()))


class Accountant:
    """Bytes of weights the offloaders hold on the compute side, now and at peak.

    One is shared by every network of a :class:`VramManager`; subclass it to instrument a run
    (``name`` is ``"network:unit"``).
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int, name: str) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def remove(self, nbytes: int, name: str) -> None:
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current


@dataclass(eq=False)
class Unit:
    """Tensors brought to the compute side together (see the module docstring): parameters, whose
    float8 is upcast, then buffers (e.g. ``FP8Linear``'s float8 weights), which keep their dtype.

    ``ancestors`` are the units whose forward encloses this one's; ``stored`` holds the storage
    tensors while the tensors hold compute copies.
    """

    name: str
    module: nn.Module = field(repr=False)
    tensors: list[torch.Tensor] = field(repr=False)
    num_params: int                      # the first ``num_params`` tensors are parameters
    nbytes: int                          # on the compute side
    ancestors: tuple["Unit", ...] = field(default=(), repr=False)
    resident: bool = False
    stored: list[torch.Tensor] | None = field(default=None, repr=False)
    calls: int = 0                       # forwards of the module now running (re-entry)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def upcast(self) -> list[bool]:
        """Which tensors may be upcast from float8 (parameters only)."""
        return [i < self.num_params for i in range(len(self.tensors))]

    @property
    def loaded(self) -> bool:
        return self.stored is not None

    @property
    def chain_bytes(self) -> int:
        """Bytes on the compute side while this unit runs streamed inside its ancestors."""
        return self.nbytes + sum(a.nbytes for a in self.ancestors)


@dataclass(frozen=True)
class Switch:
    """One change of the active network between the experts: weight bytes brought to the compute device
    (the new expert's root and resident layers; the old one's are dropped, never written back) and the
    seconds that took (on CUDA between synchronizations)."""

    source: str
    target: str
    nbytes: int
    seconds: float


@dataclass
class InFlight:
    """A unit's compute copies being made; on CUDA ``event`` marks the end of the side-stream copies."""

    unit: Unit
    copies: list[torch.Tensor]
    event: Any = None


class Transfer:
    """Makes compute copies of stored tensors: moved to ``device``, float8 upcast to ``upcast_dtype``.

    :meth:`copy` works on the current stream. On CUDA :meth:`start` (prefetch) copies on a side
    stream into memory allocated on the current stream, after that stream's queued work (the
    memory may be a block it just freed), and :meth:`finish` makes the current stream wait for the
    copies. Allocating on the current stream lets the caching allocator reuse released copies in
    stream order, so device memory follows the accounting even when the host runs layers ahead.
    Elsewhere :meth:`start` copies at once (same logic, nothing to overlap).
    """

    def __init__(self, device: torch.device, upcast_dtype: torch.dtype) -> None:
        if device.type == "cuda" and device.index is None:  # compare equal to tensors' devices
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.upcast_dtype = upcast_dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def compute_dtype(self, dtype: torch.dtype, upcast: bool = True) -> torch.dtype:
        return self.upcast_dtype if upcast and is_float8(dtype) else dtype

    def copy(self, unit: Unit) -> list[torch.Tensor]:
        """Copies on the current stream (a tensor already in place is used as it is); float8 crosses
        the bus before the upcast (half the bytes)."""
        return [t.data.to(self.device, non_blocking=True).to(dtype)
                for t, dtype in zip(unit.tensors, self._dtypes(unit))]

    def start(self, unit: Unit) -> InFlight:
        if self.stream is None:
            return InFlight(unit, self.copy(unit))
        current = torch.cuda.current_stream(self.device)
        copies = [t.data if t.device == self.device and t.dtype == dtype
                  else torch.empty(t.shape, dtype=dtype, device=self.device)
                  for t, dtype in zip(unit.tensors, self._dtypes(unit))]
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for copy, t in zip(copies, unit.tensors):
                if copy is t.data:
                    continue
                source = t.data
                if source.dtype != copy.dtype and source.device != self.device:
                    source = source.to(self.device, non_blocking=True)  # float8 over the bus, upcast here
                copy.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return InFlight(unit, copies, event)

    def finish(self, flight: InFlight) -> list[torch.Tensor]:
        """The copies, once the current stream waits for them."""
        if flight.event is not None:
            torch.cuda.current_stream(self.device).wait_event(flight.event)
        return flight.copies

    def cancel(self, flight: InFlight) -> None:
        """Drop unused copies; the current stream must not reuse their memory before they are written."""
        self.finish(flight)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of a CPU tensor when computing on CUDA (asynchronous uploads), else itself."""
        if self.stream is None or tensor.device.type != "cpu" or tensor.is_pinned():
            return tensor
        return tensor.pin_memory()

    def _dtypes(self, unit: Unit) -> list[torch.dtype]:
        return [self.compute_dtype(t.dtype, upcast) for t, upcast in zip(unit.tensors, unit.upcast)]


def build_units(module: nn.Module, compute_dtype: Any) -> tuple[Unit | None, list[Unit]]:
    """The root unit (the network's own tensors, resident while it is active) and the hooked units
    in module order; ``compute_dtype(dtype, upcast)`` gives a tensor's dtype on the compute side."""
    seen: set[int] = set()
    units: list[Unit] = []

    def new(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        fresh = [t for t in tensors if t is not None and id(t) not in seen]
        seen.update(id(t) for t in fresh)
        return fresh

    def visit(mod: nn.Module, name: str, ancestors: tuple[Unit, ...]) -> Unit | None:
        absorbed = [mod.get_submodule(child) for child in declared(mod, CHILDREN_READ_DIRECTLY)]
        params = new([*mod.parameters(recurse=False), *(p for c in absorbed for p in c.parameters())])
        buffers = new([*mod.buffers(recurse=False), *(b for c in absorbed for b in c.buffers())])
        tensors = params + buffers
        nbytes = sum(t.numel() * compute_dtype(t.dtype, i < len(params)).itemsize for i, t in enumerate(tensors))
        unit = Unit(name, mod, tensors, len(params), nbytes, ancestors) if tensors else None
        if unit is not None and name:
            units.append(unit)
            ancestors = (*ancestors, unit)
        for child_name, child in mod.named_children():
            if all(child is not c for c in absorbed):
                visit(child, f"{name}.{child_name}" if name else child_name, ancestors)
        return unit

    return visit(module, "", ()), units


def working_set(units: list[Unit], prefetch: bool) -> int:
    """Compute-side bytes streaming needs at most: the largest chain of running units plus, with
    prefetch, the largest unit (one is prefetched at a time)."""
    working = max((u.chain_bytes for u in units), default=0)
    return working + (max((u.nbytes for u in units), default=0) if prefetch else 0)


def plan(units: list[Unit], root_bytes: int, budget: int | None, max_params: int | None,
         prefetch: bool) -> int:
    """Mark resident units, smallest first (ties in module order); returns the working set.

    ``max_params`` (the DiT's ``num_persistent_param_in_dit``) caps resident parameters instead of
    bytes. With a byte budget, resident bytes leave room for the :func:`working_set`.
    """
    working = working_set(units, prefetch)
    for u in units:
        u.resident = False
    if max_params is None and (budget is None or root_bytes + sum(u.nbytes for u in units) <= budget):
        for u in units:
            u.resident = True
        return 0
    room = max_params if max_params is not None else budget - root_bytes - working
    used = 0
    for u in sorted(units, key=lambda u: u.numel if max_params is not None else u.nbytes):
        size = u.numel if max_params is not None else u.nbytes
        if used + size <= room:
            u.resident = True
            used += size
    return working


class NetworkOffloader:
    """One network's units, resident plan and hooks; made by :meth:`VramManager.manage`."""

    def __init__(self, name: str, module: nn.Module, manager: "VramManager",
                 max_resident_params: int | None = None) -> None:
        self.name = name
        self.module = module
        self.manager = manager
        transfer = manager.transfer
        self._anchors = self._upcast_anchors()
        self.root, self.units = build_units(module, transfer.compute_dtype)
        root_bytes = self.root.nbytes if self.root is not None else 0
        self.working_set = plan(self.units, root_bytes, manager.budget, max_resident_params, manager.prefetch)
        streamed = [u for u in self.units if not u.resident]
        # Which streamed unit to prefetch after each: module order until a forward shows the real one.
        self._successor: dict[Unit, Unit] = dict(zip(streamed, streamed[1:]))
        self._last: Unit | None = None
        self._pending: InFlight | None = None
        self.stats = {"onloads": 0, "prefetch_hits": 0, "prefetch_misses": 0}
        if manager.pin_memory:
            for unit in streamed:
                for tensor in unit.tensors:
                    tensor.data = transfer.pin(tensor.data)
        self._hooks = [handle for u in self.units for handle in (
            u.module.register_forward_pre_hook(partial(self._enter, u)),
            u.module.register_forward_hook(partial(self._exit, u), always_call=True))]
        self._log_plan(root_bytes, streamed, max_resident_params)

    @property
    def resident_bytes(self) -> int:
        """Bytes on the compute side between layers while the network is active."""
        return sum(u.nbytes for u in self._always())

    def _always(self) -> list[Unit]:
        return ([self.root] if self.root is not None else []) + [u for u in self.units if u.resident]

    def _upcast_anchors(self) -> list[tuple[nn.Parameter, torch.dtype]]:
        """Store the float8 ``dtype_parameters`` upcast (exact: float8 values are values of every wider
        float dtype), or the network would cast its inputs to float8; returns them with their dtype."""
        anchors = []
        for param in self._dtype_parameters():
            if is_float8(param.dtype):
                anchors.append((param, param.dtype))
                param.data = param.data.to(self.manager.transfer.upcast_dtype)
        return anchors

    def _dtype_parameters(self) -> list[nn.Parameter]:
        """The parameters any module of the network declares in :data:`DTYPE_PARAMETERS`, once each."""
        found: dict[int, nn.Parameter] = {}
        for mod in self.module.modules():
            for name in declared(mod, DTYPE_PARAMETERS):
                param = mod.get_parameter(name)
                found.setdefault(id(param), param)
        return list(found.values())

    def _log_plan(self, root_bytes: int, streamed: list[Unit], max_params: int | None) -> None:
        budget = self.manager.budget
        if max_params is None and budget is not None and streamed and root_bytes + self.working_set > budget:
            logger.warning("%s: the VRAM budget (%s) is below the working set of %s; every layer is "
                           "streamed and the budget will be exceeded", self.name, format_bytes(budget),
                           format_bytes(root_bytes + self.working_set))
        logger.info("%s: %d of %d layers resident (%s), %d streamed (%s), working set %s",
                    self.name, len(self.units) - len(streamed), len(self.units), format_bytes(self.resident_bytes),
                    len(streamed), format_bytes(sum(u.nbytes for u in streamed)), format_bytes(self.working_set))

    # -- activation -------------------------------------------------------------------------------

    def activate(self) -> int:
        """Onload the root and resident units (the manager deactivates the previous network first);
        returns the bytes brought over."""
        moved = 0
        for unit in self._always():
            if not unit.loaded:
                self._install(unit, self.manager.transfer.copy(unit))
                moved += unit.nbytes
        return moved

    def deactivate(self) -> None:
        """Every parameter back to its stored tensor; forgets the last unit (a new pass follows)."""
        running = [u.name for u in self.units if u.calls]
        if running:
            raise RuntimeError(f"{self.name} is offloaded while its layers {running[:3]} run: a network "
                               "under VRAM management cannot run inside another one")
        self._drop_pending()
        for unit in ([self.root] if self.root is not None else []) + self.units:
            if unit.loaded:
                self._release(unit)
        self._last = None

    def remove(self) -> None:
        """Offload, remove the hooks and restore float8 anchors: the network as it was managed."""
        self.deactivate()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for param, dtype in self._anchors:
            param.data = param.data.to(dtype)
        self._anchors = []

    # -- hooks ------------------------------------------------------------------------------------

    def _enter(self, unit: Unit, module: nn.Module, args: tuple) -> None:
        unit.calls += 1  # first: the forward hook runs (always_call) even if this one raises
        if self.manager.active is not self:
            self.manager.activate(self)
        if unit.resident or unit.calls > 1:
            return
        if self._last is not None and self._last is not unit:
            self._successor[self._last] = unit
        self._last = unit
        pending, self._pending = self._pending, None
        if pending is not None and pending.unit is unit:
            self.stats["prefetch_hits"] += 1
            self._install(unit, self.manager.transfer.finish(pending), counted=True)
        else:
            if pending is not None:
                self.stats["prefetch_misses"] += 1
                self._cancel(pending)
            self.stats["onloads"] += 1
            self._install(unit, self.manager.transfer.copy(unit))
        if self.manager.prefetch:
            self._prefetch(self._successor.get(unit))

    def _exit(self, unit: Unit, module: nn.Module, args: tuple, output: Any) -> None:
        unit.calls -= 1
        if not unit.calls and unit.loaded and not unit.resident:
            self._release(unit)

    # -- moves ------------------------------------------------------------------------------------

    def _prefetch(self, unit: Unit | None) -> None:
        if unit is None or unit.loaded:
            return
        self.manager.accountant.add(unit.nbytes, self._label(unit))
        self._pending = self.manager.transfer.start(unit)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._cancel(self._pending)
            self._pending = None

    def _cancel(self, flight: InFlight) -> None:
        self.manager.transfer.cancel(flight)
        self.manager.accountant.remove(flight.unit.nbytes, self._label(flight.unit))

    def _install(self, unit: Unit, copies: list[torch.Tensor], counted: bool = False) -> None:
        unit.stored = [t.data for t in unit.tensors]
        for tensor, copy in zip(unit.tensors, copies):
            tensor.data = copy
        if not counted:
            self.manager.accountant.add(unit.nbytes, self._label(unit))

    def _release(self, unit: Unit) -> None:
        for tensor, stored in zip(unit.tensors, unit.stored):
            tensor.data = stored
        unit.stored = None
        self.manager.accountant.remove(unit.nbytes, self._label(unit))

    def _label(self, unit: Unit) -> str:
        return f"{self.name}:{unit.name}"


class VramManager:
    """Offloaders of networks sharing a compute device, a weight budget and an accountant.

    ``budget`` is in bytes (``None``: no limit, every layer resident); ``prefetch`` and
    ``pin_memory`` default to whether ``device`` is CUDA. One network is active at a time.
    """

    def __init__(self, device: str | torch.device, upcast_dtype: torch.dtype, budget: int | None = None,
                 accountant: Accountant | None = None, prefetch: bool | None = None,
                 pin_memory: bool | None = None) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.budget = budget
        self.accountant = accountant if accountant is not None else Accountant()
        self.prefetch = cuda if prefetch is None else prefetch
        self.pin_memory = cuda if pin_memory is None else pin_memory
        self.transfer = Transfer(self.device, upcast_dtype)
        self.networks: dict[str, NetworkOffloader] = {}
        self.active: NetworkOffloader | None = None
        self.switches: list[Switch] = []  # every change of the active network between dit and dit2, in order

    def manage(self, name: str, module: nn.Module, max_resident_params: int | None = None) -> NetworkOffloader:
        """Offload ``module`` (it stays in its storage place until its layers run)."""
        if name in self.networks:
            raise ValueError(f"a network named {name!r} is already managed")
        self.networks[name] = NetworkOffloader(name, module, self, max_resident_params)
        return self.networks[name]

    def activate(self, network: NetworkOffloader) -> None:
        """Make ``network`` the one whose resident layers are on the compute device; a change between the
        experts is timed, logged and recorded in :attr:`switches`."""
        previous = self.active
        switch = previous is not None and {previous.name, network.name} == set(EXPERTS)
        if switch:
            self._sync()
            start = time.perf_counter()
        if previous is not None:
            previous.deactivate()
        self.active = network
        moved = network.activate()
        if switch:
            self._sync()
            record = Switch(previous.name, network.name, moved, time.perf_counter() - start)
            self.switches.append(record)
            logger.info("expert switch %s -> %s: %s brought to %s in %.3f s", record.source, record.target,
                        format_bytes(record.nbytes), self.device, record.seconds)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def offload(self) -> None:
        """Every managed weight back in its storage place (the state between pipeline calls)."""
        if self.active is not None:
            self.active.deactivate()
            self.active = None

    def disable(self) -> None:
        """Stop managing: weights in their storage place, hooks removed, float8 anchors restored."""
        self.offload()
        for network in self.networks.values():
            network.remove()
        self.networks.clear()


def manage_pipeline(pipe: "WanVideoPipeline", num_persistent_param_in_dit: int | None = None,
                    vram_limit: float | None = None, vram_buffer: float = 0.5,
                    accountant: Accountant | None = None, prefetch: bool | None = None) -> VramManager:
    """A :class:`VramManager` over the pipeline's loaded networks (see
    :meth:`WanVideoPipeline.enable_vram_management`); limits in GiB."""
    if vram_limit is None and pipe.device.type == "cuda":
        vram_limit = torch.cuda.get_device_properties(pipe.device).total_memory / GIB
    budget = None if vram_limit is None else int((vram_limit - vram_buffer) * GIB)
    manager = VramManager(pipe.device, pipe.torch_dtype, budget, accountant, prefetch)
    for name in PIPELINE_NETWORKS:
        module = getattr(pipe, name)
        if module is not None:
            manager.manage(name, module, num_persistent_param_in_dit if name in EXPERTS else None)
    return manager
