"""Attention backends: records, the registry that orders them, and the dispatcher it installs.

A :class:`Backend` says what it needs from the machine (:meth:`Backend.is_available`, asked once
and cached) and from each call's tensors (:meth:`Backend.supports`, asked per call). The
:class:`AttentionDispatcher` built for a choice runs the first backend of its chain that supports
the tensors, so fp32 inputs under FlashAttention quietly go to the next backend instead of failing.
Third-party packages add backends through the ``wan_kernels.attention_backends`` entry-point
group (see ``docs/attention_backends.md``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import torch

from .checks import OK, Check, cuda_check, import_check, tensor_check

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ENTRY_POINT_GROUP = "wan_kernels.attention_backends"
ENV_VAR = "WAN_ATTENTION"
AUTO = "auto"


def _always_available() -> Check:
    return OK


def _supports_anything(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Check:
    return OK


@dataclass(frozen=True)
class Backend:
    """One attention implementation over ``[B, L, H, D]`` tensors (output: ``q``'s shape and dtype).

    ``priority`` orders automatic choice (higher first); ``None`` means the backend is only used
    when chosen by name (e.g. the slow ``math`` reference). ``available()`` checks the machine
    (package importable, GPU generation); ``check(q, k, v)`` checks one call's tensors (device,
    dtype, head dim). Both return ``(ok, reason)``.
    """

    name: str
    fn: AttentionFn
    priority: int | None = None
    available: Callable[[], Check] = _always_available
    check: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Check] = _supports_anything
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower() or self.name == AUTO:
            raise ValueError(f"backend name must be a non-empty lower-case word other than 'auto', got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"backend {self.name!r}: fn must be callable (q, k, v) -> out")

    def is_available(self) -> Check:
        """``(ok, reason)``: can this backend run on this machine at all."""
        return self.available()

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Check:
        """``(ok, reason)``: can this backend take these tensors."""
        return self.check(q, k, v)


def gpu_backend(name: str, fn: AttentionFn, priority: int, *, module: str, install: str,
                min_capability: tuple[int, int], max_major: int | None = None,
                head_dims: tuple[int, ...] | None = None, description: str = "") -> Backend:
    """A CUDA kernel backend: available with an sm ``min_capability``+ GPU (up to ``max_major``.x)
    and ``module`` importable (imported only when checked), taking half-precision tensors on such
    a GPU; the FlashAttention and Sage backends differ only in these arguments."""

    def available() -> Check:
        ok, reason = cuda_check(min_capability, max_major=max_major)
        return import_check(module, install) if ok else (ok, reason)

    def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Check:
        return tensor_check(q, k, v, min_capability=min_capability, head_dims=head_dims)

    return Backend(name=name, fn=fn, priority=priority, available=available, check=supports,
                   description=description)


class BackendUnavailable(RuntimeError):
    """An attention backend was chosen by name but cannot run here (the message says why)."""


class AttentionDispatcher:
    """The attention function installed into ``wan_models``: the first backend of ``chain``
    that supports a call's tensors runs it. ``calls`` counts which backend ran how often."""

    def __init__(self, choice: str, chain: list[Backend], source: str = "argument") -> None:
        if not chain:
            raise ValueError("an attention dispatcher needs at least one backend")
        self.choice = choice
        self.source = source
        self.chain = chain
        self.calls: Counter[str] = Counter()
        self._noted: set[tuple[str, str]] = set()

    @property
    def active(self) -> str:
        """The backend that runs every call it supports (the first of the chain)."""
        return self.chain[0].name

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        reasons = []
        for backend in self.chain:
            ok, reason = backend.supports(q, k, v)
            if ok:
                self.calls[backend.name] += 1
                return backend.fn(q, k, v)
            reasons.append(f"{backend.name}: {reason}")
            if (backend.name, reason) not in self._noted:  # log each distinct fallback once
                self._noted.add((backend.name, reason))
                level = logging.WARNING if self.choice == backend.name else logging.INFO
                logger.log(level, "attention backend %s skipped (%s); trying the next one", backend.name, reason)
        raise RuntimeError("no attention backend supports these tensors: " + "; ".join(reasons))

    def __repr__(self) -> str:
        return f"AttentionDispatcher(choice={self.choice!r}, chain={[b.name for b in self.chain]})"


@dataclass(frozen=True)
class BackendStatus:
    """One line of an :class:`AttentionReport`: a backend and why it was chosen or passed over."""

    name: str
    priority: int | None
    available: bool
    reason: str
    origin: str


@dataclass(frozen=True)
class AttentionReport:
    """Which attention backend runs, how it was chosen, and why every other one did not."""

    choice: str                      # "auto" or a backend name
    source: str                      # where the choice came from: "argument", "WAN_ATTENTION" or "default"
    active: str                      # the backend that runs every call it supports
    fallbacks: tuple[str, ...]       # tried in order for calls the active one does not support
    installed: bool                  # whether wan_models currently calls this selection
    backends: tuple[BackendStatus, ...]
    calls: dict[str, int] = field(default_factory=dict)  # per backend, calls since installed
    plugin_errors: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        state = "installed" if self.installed else "not installed"
        lines = [f"attention: {self.active} (choice {self.choice!r} from {self.source}; {state})"]
        if self.fallbacks:
            lines.append(f"  per-call fallbacks: {' > '.join(self.fallbacks)}")
        for status in self.backends:
            mark = "*" if status.name == self.active else ("+" if status.available else "-")
            prio = "-" if status.priority is None else str(status.priority)
            lines.append(f"  {mark} {status.name:<10} prio {prio:>4}  {status.reason}  [{status.origin}]")
        if self.calls:
            lines.append("  calls: " + ", ".join(f"{k}={v}" for k, v in sorted(self.calls.items())))
        for name, error in self.plugin_errors.items():
            lines.append(f"  ! entry point {name}: {error}")
        return "\n".join(lines)


def choice_from_env(choice: str | None) -> tuple[str, str]:
    """``(choice, source)``: ``choice`` itself, else ``$WAN_ATTENTION``, else ``auto``."""
    if choice is not None:
        return choice.strip().lower(), "argument"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return (env, ENV_VAR) if env else (AUTO, "default")


class BackendRegistry:
    """Named backends (built-ins plus entry-point plugins, loaded on first use) and the rules
    that turn a choice (``auto`` or a name) into an :class:`AttentionDispatcher`."""

    def __init__(self, builtins: Iterable[Backend], fallback: str = "sdpa",
                 group: str | None = ENTRY_POINT_GROUP) -> None:
        self._backends: dict[str, Backend] = {}
        self._origins: dict[str, str] = {}
        self._availability: dict[str, Check] = {}
        self.plugin_errors: dict[str, str] = {}
        self._group = group
        self._plugins_loaded = group is None
        self.fallback = fallback
        for backend in builtins:
            self.register(backend, origin="built-in")

    # -- membership ------------------------------------------------------------------------------

    def register(self, backend: Backend, replace: bool = False, origin: str = "registered") -> None:
        """Add ``backend``; a taken name is an error unless ``replace``."""
        if not isinstance(backend, Backend):
            raise TypeError(f"expected a wan_kernels Backend, got {type(backend).__name__}")
        if backend.name in self._backends and not replace:
            raise ValueError(f"attention backend {backend.name!r} is already registered "
                             f"({self._origins[backend.name]}); pass replace=True to override it")
        self._backends[backend.name] = backend
        self._origins[backend.name] = origin
        self._availability.pop(backend.name, None)

    def unregister(self, name: str) -> Backend:
        """Remove and return backend ``name``."""
        self._load_plugins()
        backend = self.get(name)
        del self._backends[name], self._origins[name]
        self._availability.pop(name, None)
        return backend

    def get(self, name: str) -> Backend:
        """The backend called ``name`` (``KeyError`` listing the known names otherwise)."""
        self._load_plugins()
        try:
            return self._backends[name]
        except KeyError:
            raise KeyError(f"unknown attention backend {name!r}; known: {', '.join(self.names())}, auto") from None

    def names(self) -> list[str]:
        """All registered backends: automatic ones by falling priority, then name-only ones."""
        self._load_plugins()
        ranked = sorted(self._backends.values(),
                        key=lambda b: (b.priority is None, -(b.priority or 0), b.name))
        return [b.name for b in ranked]

    def availability(self, name: str) -> Check:
        """Cached :meth:`Backend.is_available` of ``name`` (an exception counts as unavailable)."""
        if name not in self._availability:
            try:
                result = self.get(name).is_available()
            except Exception as err:  # a plugin's broken check must not break selection
                result = (False, f"availability check raised {type(err).__name__}: {err}")
            self._availability[name] = (bool(result[0]), str(result[1]))
        return self._availability[name]

    def available(self) -> list[str]:
        """Names of the backends that can run here, in :meth:`names` order."""
        return [n for n in self.names() if self.availability(n)[0]]

    def refresh(self) -> None:
        """Forget cached availability and re-read entry points (after installing a package)."""
        self._availability.clear()
        for name in [n for n, o in self._origins.items() if o.startswith("entry point")]:
            del self._backends[name], self._origins[name]
        self.plugin_errors.clear()
        self._plugins_loaded = self._group is None

    # -- selection -------------------------------------------------------------------------------

    def select(self, choice: str | None = None) -> AttentionDispatcher:
        """Dispatcher for ``choice`` (``None``: ``$WAN_ATTENTION`` or auto).

        ``auto``: every available backend with a priority, highest first. A name: that backend
        (:class:`BackendUnavailable` if it cannot run here), then the fallback (SDPA) for calls
        it does not support.
        """
        choice, source = choice_from_env(choice)
        if choice == AUTO:
            chain = [self.get(n) for n in self.available() if self.get(n).priority is not None]
            if not chain:
                reasons = "; ".join(f"{n}: {self.availability(n)[1] or 'name-only'}" for n in self.names())
                raise BackendUnavailable(f"no attention backend with a priority is available ({reasons})")
            return AttentionDispatcher(AUTO, chain, source)
        backend = self.get(choice)
        ok, reason = self.availability(choice)
        if not ok:
            raise BackendUnavailable(f"attention backend {choice!r} is unavailable: {reason}")
        chain = [backend]
        if choice != self.fallback and self.fallback in self._backends and self.availability(self.fallback)[0]:
            chain.append(self._backends[self.fallback])
        return AttentionDispatcher(choice, chain, source)

    def report(self, choice: str | None = None, dispatcher: AttentionDispatcher | None = None,
               installed: bool = False) -> AttentionReport:
        """Explain ``dispatcher`` (or the one ``choice`` would give) backend by backend."""
        if dispatcher is None:
            dispatcher = self.select(choice)
        choice, source = dispatcher.choice, dispatcher.source
        chain = [b.name for b in dispatcher.chain]
        statuses = []
        for name in self.names():
            backend = self._backends[name]
            ok, reason = self.availability(name)
            if ok:
                reason = self._why_not(name, chain, choice)
            statuses.append(BackendStatus(name, backend.priority, ok, reason, self._origins[name]))
        return AttentionReport(choice, source, dispatcher.active, tuple(chain[1:]), installed,
                               tuple(statuses), dict(dispatcher.calls), dict(self.plugin_errors))

    @staticmethod
    def _why_not(name: str, chain: list[str], choice: str) -> str:
        if name == chain[0]:
            return "active" + ("" if choice == AUTO else " (chosen by name)")
        if name in chain:
            return f"fallback #{chain.index(name)} for calls {chain[0]} does not support"
        if choice != AUTO:
            return f"available, not chosen ({choice!r} was)"
        return "available, used only when chosen by name"

    # -- plugins ---------------------------------------------------------------------------------

    def _load_plugins(self) -> None:
        """Register every entry point of the group once; a broken plugin is logged and skipped."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self._group):
            try:
                backend = _backend_from(ep.load())
                if backend.name in self._backends:
                    raise ValueError(f"name {backend.name!r} is taken ({self._origins[backend.name]})")
                self.register(backend, origin=f"entry point {ep.value}")
            except Exception as err:
                self.plugin_errors[ep.name] = f"{ep.value}: {type(err).__name__}: {err}"
                logger.warning("attention backend entry point %s (%s) skipped: %s", ep.name, ep.value, err)


def _backend_from(obj: Any) -> Backend:
    """An entry point's target: a :class:`Backend`, or a zero-argument factory returning one."""
    if not isinstance(obj, Backend) and callable(obj):
        obj = obj()
    if not isinstance(obj, Backend):
        raise TypeError(f"entry point must give a wan_kernels Backend or a factory of one, got {type(obj).__name__}")
    return obj
