"""Fast paths for ``wan_models``, installed through its hooks (``wan_models`` never imports this).

``enable()`` installs an attention dispatcher (FlashAttention 3 > 2 > SageAttention > SDPA, or a
backend chosen by name / ``$WAN_ATTENTION``) and, where triton and a GPU are present, the fused
Triton versions of the DiT's elementwise ops: process-wide, or with ``modules=`` into those models
only (``WanDiT.set_attention_backend`` / ``set_ops``); ``disable()`` puts back what was there before.
``quantize_fp8(model)`` stores linear weights in FP8. ``optimize_for_cpu(model)`` sets up the
CPU fast path (in-place MLP GELU, one-pass elementwise ops; see :mod:`wan_kernels.cpu`).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from torch import nn
from wan_models import attention as wan_attention
from wan_models import ops as wan_ops

from .attention import REGISTRY, AttentionDispatcher, AttentionReport, Backend, BackendUnavailable
from .cpu import InplaceGeluMLP, cpu_ops, inplace_gelu_mlps
from .fp8 import FP8Linear, FP8Report, quantize_fp8

logger = logging.getLogger(__name__)


@dataclass
class _Installed:
    """What :func:`enable` replaced, to be restored by :func:`disable`."""

    dispatcher: AttentionDispatcher
    previous_attention: Callable
    ops: dict[str, tuple[Callable, Callable]]  # op name -> (previous, installed)


@dataclass
class _ModelInstalled:
    """What :func:`enable` replaced in one model (``modules=``), to be restored by :func:`disable`."""

    dispatcher: AttentionDispatcher
    previous_attention: Callable | None
    previous_ops: Mapping[str, Callable] | None
    ops: Mapping[str, Callable] | None  # the overrides installed (None: the model's ops were left alone)


_installed: _Installed | None = None
_model_installed: weakref.WeakKeyDictionary[nn.Module, _ModelInstalled] = weakref.WeakKeyDictionary()
_latest: AttentionDispatcher | None = None  # the last enable()'s, described by attention_report()
_cpu_installed: dict[str, tuple[Callable, Callable]] = {}  # op name -> (previous, installed) by optimize_for_cpu


@dataclass(frozen=True)
class CPUReport:
    """What :func:`optimize_for_cpu` did: the MLPs it swapped and the ops it installed."""

    mlps: tuple[str, ...]
    ops: tuple[str, ...]


def available_backends() -> list[str]:
    """Attention backends that can run on this machine, in automatic-choice order (then name-only ones)."""
    return REGISTRY.available()


def enable(backend: str | None = None, fused_ops: bool = True,
           modules: nn.Module | Iterable[nn.Module] | None = None) -> str:
    """Install the attention ``backend`` (``None``: ``$WAN_ATTENTION``, else ``"auto"``) and, if
    ``fused_ops``, the Triton fused ops the machine can run. Returns the active backend's name.

    ``modules`` (a model or several, e.g. ``WanDiT``: anything with ``set_attention_backend`` and
    ``set_ops``) gets them as its own, leaving the process-wide defaults and other models alone;
    ``None`` installs them process-wide. Raises :class:`BackendUnavailable` (changing nothing) for
    a named backend that cannot run here. Calling it again for the same place first undoes the
    previous call there.
    """
    global _installed, _latest
    models = None if modules is None else _models(modules)
    dispatcher = REGISTRY.select(backend)
    fused = _fused_ops() if fused_ops else {}
    _latest = dispatcher
    if models is not None:
        for model in models:
            _enable_model(model, dispatcher, fused)
        logger.info("wan_kernels: attention %s (%s), fused ops: %s, for %d model(s)", dispatcher.active,
                    dispatcher.choice, ", ".join(fused) or "none", len(models))
        return dispatcher.active
    _undo_enable()
    if fused:  # the Triton ops take precedence over optimize_for_cpu's
        _undo_cpu_ops()
    previous = wan_attention.set_attention_backend(dispatcher)
    installed_ops = {name: (wan_ops.set_op(name, fn), fn) for name, fn in fused.items()}
    _installed = _Installed(dispatcher, previous, installed_ops)
    logger.info("wan_kernels: attention %s (%s), fused ops: %s", dispatcher.active, dispatcher.choice,
                ", ".join(fused) or "none")
    return dispatcher.active


def _models(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    """``modules`` as a list, each checked to carry its own attention and ops (before anything changes)."""
    models = [modules] if isinstance(modules, nn.Module) else list(modules)
    for model in models:
        if not (hasattr(model, "set_attention_backend") and hasattr(model, "set_ops")):
            raise TypeError(f"{type(model).__name__} cannot take its own attention backend and ops "
                            "(needs set_attention_backend and set_ops, as wan_models.WanDiT has)")
    return models


def _enable_model(model: nn.Module, dispatcher: AttentionDispatcher, fused: dict[str, Callable]) -> None:
    """Give ``model`` the dispatcher and fused ops as its own, first undoing an earlier enable() there."""
    _undo_model(model)
    previous_attention = model.set_attention_backend(dispatcher)
    previous_ops = model.op_overrides
    if fused:
        model.set_ops(fused)
    _model_installed[model] = _ModelInstalled(dispatcher, previous_attention, previous_ops,
                                              model.op_overrides if fused else None)


def disable() -> None:
    """Restore the attention functions and ops that were installed before :func:`enable` (process-wide
    and in every model it configured) and :func:`optimize_for_cpu`.

    A hook someone replaced after ``enable`` is left alone (with a warning) rather than clobbered.
    """
    global _latest
    _undo_cpu_ops()
    _undo_enable()
    for model in list(_model_installed.keys()):
        _undo_model(model)
    _latest = None


def _undo_model(model: nn.Module) -> None:
    installed = _model_installed.pop(model, None)
    if installed is None:
        return
    _put_back(model, "attention", model.attention_fn is installed.dispatcher,
              lambda: model.set_attention_backend(installed.previous_attention))
    if installed.ops is not None:
        _put_back(model, "ops", model.op_overrides is installed.ops, lambda: model.set_ops(installed.previous_ops))


def _put_back(model: nn.Module, what: str, still_ours: bool, restore: Callable[[], None]) -> None:
    """Restore what ``enable`` replaced on ``model``, unless someone replaced it since (then warn)."""
    if still_ours:
        restore()
    else:
        logger.warning("wan_kernels.disable: the %s of a %s were replaced after enable(); leaving them", what,
                       type(model).__name__)


def _undo_cpu_ops() -> None:
    _restore_ops(_cpu_installed)
    _cpu_installed.clear()


def _undo_enable() -> None:
    global _installed
    if _installed is None:
        return
    if wan_attention.get_attention_backend() is _installed.dispatcher:
        wan_attention.set_attention_backend(_installed.previous_attention)
    else:
        logger.warning("wan_kernels.disable: attention was replaced after enable(); leaving it")
    _restore_ops(_installed.ops)
    _installed = None


def _restore_ops(installed: dict[str, tuple[Callable, Callable]]) -> None:
    for name, (previous, ours) in installed.items():
        if wan_ops.get_op(name) is ours:
            wan_ops.set_op(name, previous)
        else:
            logger.warning("wan_kernels.disable: op %s was replaced after wan_kernels installed it; leaving it", name)


def optimize_for_cpu(model: nn.Module, elementwise_ops: bool = True) -> CPUReport:
    """Set up the CPU fast path for ``model``: its ``Linear, GELU, Linear`` MLPs apply GELU in place
    (bit-identical, same state_dict keys, no extra memory) and, if ``elementwise_ops``, the one-pass
    torch ops replace those ``wan_models.ops`` still at their reference (fused Triton ops installed
    by :func:`enable` are kept). :func:`disable` takes the ops back out; the MLP swap stays.
    """
    mlps = inplace_gelu_mlps(model)
    installed = []
    for name, fn in (cpu_ops() if elementwise_ops else {}).items():
        if name not in _cpu_installed and wan_ops.get_op(name) is wan_ops.DEFAULTS[name]:
            _cpu_installed[name] = (wan_ops.set_op(name, fn), fn)
            installed.append(name)
    logger.info("wan_kernels.optimize_for_cpu: %d MLPs with in-place GELU; ops: %s", len(mlps),
                ", ".join(installed) or "none")
    return CPUReport(tuple(mlps), tuple(installed))


def attention_report(backend: str | None = None, model: nn.Module | None = None) -> AttentionReport:
    """Which attention backend is active and why every other one was passed over.

    With ``backend`` ``None``, describes (with per-backend call counts) ``model``'s own dispatcher if
    it has one, else the selection of the last :func:`enable` (process-wide or per model) while in
    effect; otherwise what ``enable(backend)`` would choose. ``str()`` of the report is a readable table.
    """
    if backend is None and isinstance(getattr(model, "attention_fn", None), AttentionDispatcher):
        return REGISTRY.report(dispatcher=model.attention_fn, installed=True)
    if backend is None and model is None and _latest is not None:
        installed = wan_attention.get_attention_backend() is _latest or any(
            m.attention_fn is _latest for m in list(_model_installed.keys()))
        return REGISTRY.report(dispatcher=_latest, installed=installed)
    return REGISTRY.report(backend)


def _fused_ops() -> dict[str, Callable]:
    """The fused ops this machine can run ({} with a log line saying why when it cannot)."""
    from . import triton as fused

    ok, reason = fused.status()
    if not ok:
        logger.info("wan_kernels: fused ops not installed: %s", reason)
        return {}
    return fused.fused_ops()


__all__ = [
    "AttentionReport", "Backend", "BackendUnavailable", "CPUReport", "FP8Linear", "FP8Report", "InplaceGeluMLP",
    "attention_report", "available_backends", "disable", "enable", "optimize_for_cpu", "quantize_fp8",
]
