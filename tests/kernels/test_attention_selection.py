"""How a backend is chosen: automatic order, per-call fallback, explicit choice (argument and
``WAN_ATTENTION``), the report's reasons, and third-party backends from entry points."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import wan_kernels
from wan_kernels.attention import (
    ENTRY_POINT_GROUP,
    MATH,
    REGISTRY,
    SDPA,
    AttentionDispatcher,
    Backend,
    BackendRegistry,
    BackendUnavailable,
    math_attention,
)
from wan_models import attention as wan_attention


def _qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 6, 2, 8, generator=gen).to(dtype) for _ in range(3))


def _fake(name: str, priority: int | None, available: bool = True, dtypes=None, reason: str = "no widget"):
    """A backend that tags its output (``+ offset``) so the test can see which one ran."""
    offset = float(len(name))

    def fn(q, k, v):
        return math_attention(q, k, v) + offset

    def check(q, k, v):
        if dtypes is not None and q.dtype not in dtypes:
            return False, f"dtype {q.dtype} unsupported"
        return True, ""

    return Backend(name, fn, priority, available=lambda: (available, "" if available else reason), check=check)


@pytest.fixture
def fakes() -> BackendRegistry:
    """A private registry: fast (fp16 only, priority 900), slower (any dtype, 500), broken (950,
    unavailable), plus the real SDPA (100) and math (name-only)."""
    return BackendRegistry([
        _fake("fast", 900, dtypes=(torch.float16,)),
        _fake("slower", 500),
        _fake("broken", 950, available=False, reason="needs the frobnicator package"),
        SDPA, MATH,
    ], group=None)


def test_auto_orders_available_backends_by_priority(fakes: BackendRegistry) -> None:
    assert fakes.names() == ["broken", "fast", "slower", "sdpa", "math"]
    assert fakes.available() == ["fast", "slower", "sdpa", "math"]
    dispatcher = fakes.select("auto")
    assert [b.name for b in dispatcher.chain] == ["fast", "slower", "sdpa"]  # math: name-only
    assert dispatcher.active == "fast"


def test_per_call_fallback_to_next_supporting_backend(fakes: BackendRegistry, caplog) -> None:
    dispatcher = fakes.select("auto")
    q, k, v = _qkv(torch.float16)
    torch.testing.assert_close(dispatcher(q, k, v), math_attention(q, k, v) + 4)  # "fast"
    with caplog.at_level(logging.INFO, logger="wan_kernels"):
        q, k, v = _qkv(torch.float32)
        for _ in range(3):
            out = dispatcher(q, k, v)
    torch.testing.assert_close(out, math_attention(q, k, v) + 6)  # "slower"
    assert dispatcher.calls == {"fast": 1, "slower": 3}
    assert sum("fast skipped" in r.message for r in caplog.records) == 1  # logged once, not per call


def test_report_names_every_reason(fakes: BackendRegistry) -> None:
    report = fakes.report("auto")
    by_name = {s.name: s for s in report.backends}
    assert report.active == "fast" and report.fallbacks == ("slower", "sdpa")
    assert not by_name["broken"].available and by_name["broken"].reason == "needs the frobnicator package"
    assert by_name["fast"].reason == "active"
    assert "fallback #1" in by_name["slower"].reason
    assert "only when chosen by name" in by_name["math"].reason
    text = str(report)
    assert "frobnicator" in text and text.startswith("attention: fast")


def test_explicit_choice_runs_it_then_falls_back_to_sdpa(fakes: BackendRegistry, caplog) -> None:
    dispatcher = fakes.select("fast")
    assert [b.name for b in dispatcher.chain] == ["fast", "sdpa"]
    q, k, v = _qkv(torch.float32)
    with caplog.at_level(logging.WARNING, logger="wan_kernels"):
        torch.testing.assert_close(dispatcher(q, k, v), wan_attention.sdpa_attention(q, k, v))
    assert "fast skipped" in caplog.text  # a named backend that cannot take a call warns


def test_explicit_unavailable_or_unknown_is_an_error(fakes: BackendRegistry) -> None:
    with pytest.raises(BackendUnavailable, match="'broken' is unavailable: needs the frobnicator"):
        fakes.select("broken")
    with pytest.raises(KeyError, match="unknown attention backend 'nope'.*fast"):
        fakes.select("nope")


def test_auto_with_nothing_available_says_why() -> None:
    registry = BackendRegistry([_fake("gone", 10, available=False, reason="unplugged"), MATH], group=None)
    with pytest.raises(BackendUnavailable, match="gone: unplugged; math: name-only"):
        registry.select("auto")


def test_no_backend_supports_the_call() -> None:
    registry = BackendRegistry([_fake("fp16only", 10, dtypes=(torch.float16,))], group=None)
    with pytest.raises(RuntimeError, match="fp16only: dtype torch.float32 unsupported"):
        registry.select("auto")(*_qkv(torch.float32))


def test_register_rejects_duplicates_unless_replace(fakes: BackendRegistry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        fakes.register(_fake("fast", 1))
    fakes.register(_fake("fast", 1), replace=True)  # now below sdpa too
    assert [b.name for b in fakes.select("auto").chain] == ["slower", "sdpa", "fast"]
    with pytest.raises(ValueError, match="lower-case"):
        _fake("Auto", 1)


def test_env_var_chooses_and_argument_wins(monkeypatch) -> None:
    q, k, v = _qkv()
    monkeypatch.setenv("WAN_ATTENTION", "math")
    assert wan_kernels.enable(fused_ops=False) == "math"
    assert wan_kernels.attention_report().source == "WAN_ATTENTION"
    assert wan_attention.attention(q, k, v).equal(math_attention(q, k, v))
    assert wan_kernels.enable("sdpa", fused_ops=False) == "sdpa"
    report = wan_kernels.attention_report()
    assert (report.choice, report.source, report.installed) == ("sdpa", "argument", True)
    monkeypatch.setenv("WAN_ATTENTION", "Auto ")
    assert wan_kernels.enable(fused_ops=False) == REGISTRY.available()[0]
    monkeypatch.setenv("WAN_ATTENTION", "bogus")
    with pytest.raises(KeyError, match="unknown attention backend 'bogus'"):
        wan_kernels.enable()


def test_global_registry_counts_calls_in_report() -> None:
    wan_kernels.enable("sdpa", fused_ops=False)
    q, k, v = _qkv()
    wan_attention.attention(q, k, v)
    wan_attention.attention(q, k, v)
    assert wan_kernels.attention_report().calls == {"sdpa": 2}
    assert wan_kernels.attention_report("math").installed is False  # a hypothetical choice


def test_runtime_registered_backend_is_chosen_by_auto() -> None:
    wan_kernels.attention.register_backend(_fake("plugin", 10_000))
    try:
        assert wan_kernels.available_backends()[0] == "plugin"
        assert wan_kernels.enable(fused_ops=False) == "plugin"
        assert isinstance(wan_attention.get_attention_backend(), AttentionDispatcher)
    finally:
        wan_kernels.disable()
        wan_kernels.attention.unregister_backend("plugin")
    assert "plugin" not in wan_kernels.available_backends()


PLUGIN = '''
import torch
from wan_kernels.attention import Backend, math_attention

def _fn(q, k, v):
    return math_attention(q, k, v) * 2

READY = Backend("ready", _fn, priority=500)

def factory():
    return Backend("built", _fn, priority=None, available=lambda: (False, "built: no device"))

def exploding():
    raise RuntimeError("boom")

CLASH = Backend("sdpa", _fn, priority=1)
'''


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch) -> Path:
    """A fake installed distribution on sys.path declaring four entry points in our group."""
    (tmp_path / "wan_attn_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "wan_attn_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wan-attn-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        ready = wan_attn_plugin:READY
        built = wan_attn_plugin:factory
        exploding = wan_attn_plugin:exploding
        clash = wan_attn_plugin:CLASH
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("wan_attn_plugin", None)


def test_entry_point_backends_are_registered(plugin_dist: Path, caplog) -> None:
    registry = BackendRegistry([SDPA, MATH])  # reads the real entry-point group
    with caplog.at_level(logging.WARNING, logger="wan_kernels"):
        names = registry.names()
    assert names[0] == "ready" and "built" in names
    assert registry.available()[0] == "ready"
    assert registry.availability("built") == (False, "built: no device")
    assert set(registry.plugin_errors) == {"exploding", "clash"}
    assert "boom" in registry.plugin_errors["exploding"] and "taken" in registry.plugin_errors["clash"]
    assert "exploding" in caplog.text
    q, k, v = _qkv()
    torch.testing.assert_close(registry.select("auto")(q, k, v), math_attention(q, k, v) * 2)
    report = registry.report()
    assert "entry point wan_attn_plugin:READY" in str(report) and "boom" in str(report)


def test_refresh_drops_and_rereads_plugins(plugin_dist: Path) -> None:
    registry = BackendRegistry([SDPA, MATH])
    assert "ready" in registry.names()
    (plugin_dist / "wan_attn_plugin-0.1.dist-info" / "entry_points.txt").write_text("")
    registry.refresh()
    assert registry.names() == ["sdpa", "math"] and registry.plugin_errors == {}
