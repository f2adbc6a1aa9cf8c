"""The step-cache protocol the denoising loop calls, and the registry that builds caches from a request.

A cache module registers itself once (:func:`register_step_cache`) with its name, the options it
accepts (and their defaults) and a factory; a request picks it with ``step_cache="name"`` and
``step_cache_options={...}``. Older request fields (``tea_cache_l1_thresh``, ``mag_cache_*``) map
onto the same registry through ``fields``. With an expert pair (Wan2.2-A14B) each expert's route gets
its own caches; a factory registered with ``experts=True`` is told which expert it builds for.
See docs/step_caches.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

class _Required:
    """Marks an option without a default: the request must give it."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@runtime_checkable
class StepCache(Protocol):
    """One CFG branch's cache over one generation: the blocks' output per step, computed or reused."""

    skipped: list[bool]  # one entry per step so far: whether the blocks were skipped

    def run(self, dit: Any, inputs: Any) -> torch.Tensor:
        """The blocks' output for ``inputs`` (``wan_models.DiTInputs``); ``dit`` has ``run_blocks``."""
        ...


# (options with every default filled in, number of steps, CFG branch index) -> one cache; a factory
# registered with experts=True also gets expert= (None: the pipeline's one DiT; "dit"/"dit2": that expert).
StepCacheFactory = Callable[..., StepCache]


@dataclass(frozen=True)
class StepCacheEntry:
    """A registered cache: its factory, accepted options with defaults, and the request fields mapped onto it."""

    name: str
    factory: StepCacheFactory
    options: Mapping[str, Any] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=dict)  # request field -> option; the first switches it on
    experts: bool = False  # the factory takes expert= (which DiT of the pipeline the cache serves)


STEP_CACHES: dict[str, StepCacheEntry] = {}


def register_step_cache(name: str, factory: StepCacheFactory, *, options: Mapping[str, Any] | None = None,
                        fields: Mapping[str, str] | None = None, experts: bool = False) -> StepCacheEntry:
    """Make ``name`` available as ``step_cache=name``; ``options`` maps each option to its default (or
    :data:`REQUIRED`), ``fields`` maps request fields to options (its first field, when not None, asks for it);
    with ``experts`` the factory is called with ``expert=`` (see :func:`make_step_caches`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a step cache name must be a non-empty str, got {name!r}")
    if name in STEP_CACHES:
        raise ValueError(f"a step cache named {name!r} is already registered")
    options, fields = dict(options or {}), dict(fields or {})
    unknown = sorted(set(fields.values()) - set(options))
    if unknown:
        raise ValueError(f"step cache {name!r}: fields map onto options {unknown} that are not in options "
                         f"{sorted(options)}")
    entry = StepCacheEntry(name, factory, options, fields, experts)
    STEP_CACHES[name] = entry
    return entry


def requested_step_cache(request: Any) -> tuple[StepCacheEntry, dict[str, Any], str] | None:
    """The cache ``request`` asks for, its complete options and the field that asked; ``None`` for none.

    Raises ``ValueError`` naming the field for an unknown name, a bad option, or two caches asked at once.
    """
    asked: list[tuple[StepCacheEntry, dict[str, Any], str]] = []
    if request.step_cache is not None:
        entry = STEP_CACHES.get(request.step_cache)
        if entry is None:
            raise ValueError(f"step_cache={request.step_cache!r} is not a registered step cache; choose one of "
                             f"{', '.join(sorted(STEP_CACHES))}")
        asked.append((entry, dict(request.step_cache_options), f"step_cache={request.step_cache!r}"))
    elif request.step_cache_options:
        raise ValueError(f"step_cache_options {request.step_cache_options!r} given without step_cache; "
                         f"name the cache, one of {', '.join(sorted(STEP_CACHES))}")
    for entry in STEP_CACHES.values():
        trigger = next(iter(entry.fields), None)
        if trigger is not None and getattr(request, trigger, None) is not None:
            asked.append((entry, {option: getattr(request, name) for name, option in entry.fields.items()}, trigger))
    if not asked:
        return None
    if len(asked) > 1:
        raise ValueError(f"choose one step cache: {asked[0][2]} or {asked[1][2]}, not both")
    entry, given, source = asked[0]
    return entry, _complete_options(entry, given), source


def _complete_options(entry: StepCacheEntry, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` checked against the entry's options (names, required ones, finite numbers), defaults filled in."""
    unknown = sorted(set(given) - set(entry.options))
    if unknown:
        raise ValueError(f"step_cache_options {unknown} are not options of step cache {entry.name!r}; "
                         f"it takes {sorted(entry.options) or 'none'}")
    for name, value in given.items():
        _check_value(f"step_cache_options[{name!r}]", value)
        default = entry.options[name]
        if isinstance(default, Real) and not isinstance(default, bool) and value is not None:
            option_number(entry.name, {name: value}, name)
    options = {**entry.options, **given}
    missing = sorted(name for name, value in options.items() if value is REQUIRED)
    if missing:
        raise ValueError(f"step cache {entry.name!r} needs step_cache_options {missing}")
    return options


def _check_value(name: str, value: Any) -> None:
    """An option value is None, a bool, a str, a finite real number, or a list/tuple of those, or a dict
    with str keys (one value per expert, say) of those."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(f"{name}[{i}]", item)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{name} must have str keys (expert names such as 'dit', 'dit2'), got {key!r}")
            _check_value(f"{name}[{key!r}]", item)
    elif isinstance(value, Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    elif value is not None and not isinstance(value, (bool, str)):
        raise ValueError(f"{name} must be a number, bool, str or a list of them, got {type(value).__name__} "
                         f"{value!r}")


def option_number(cache: str, options: Mapping[str, Any], name: str, low: float | None = None,
                  high: float | None = None) -> float:
    """``options[name]`` as a float, which must be a real number within ``[low, high]``; else a ``ValueError``
    naming the option and the cache."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"step_cache_options[{name!r}] of {cache!r} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        raise ValueError(f"step_cache_options[{name!r}] of {cache!r} must be in {bounds}, got {value!r}")
    return float(value)


def make_step_caches(request: Any, steps: int, branches: int, expert: str | None = None) -> list[StepCache | None]:
    """One cache per CFG branch for ``request`` over ``steps`` steps (``None``s when it asks for none).

    ``expert`` is the route the caches serve: ``None`` for a pipeline with one DiT, else the expert's
    slot (``"dit"`` high-noise, ``"dit2"`` low-noise) and ``steps`` the steps it serves; factories
    registered with ``experts=True`` get it. With ``cfg_merge`` both branches run as one batch, so one
    cache (built for branch 0) serves both and is listed twice: its skip decisions cover the two together.
    """
    chosen = requested_step_cache(request)
    if chosen is None:
        return [None] * branches
    entry, options, _ = chosen
    if request.cfg_merge and branches == 2:
        shared = _build(entry, options, steps, 0, expert)
        return [shared, shared]
    return [_build(entry, options, steps, branch, expert) for branch in range(branches)]


def _build(entry: StepCacheEntry, options: dict[str, Any], steps: int, branch: int,
           expert: str | None) -> StepCache:
    """Call the entry's factory (with ``expert=`` where it asked) and check that what it made has ``run``
    and ``skipped``."""
    extra = {"expert": expert} if entry.experts else {}
    cache = entry.factory(dict(options), steps, branch, **extra)
    if not isinstance(cache, StepCache):
        raise TypeError(f"the factory of step cache {entry.name!r} returned a {type(cache).__name__}, which lacks "
                        "run(dit, inputs) or a skipped list")
    return cache
