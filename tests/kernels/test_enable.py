"""``enable``/``disable`` install into wan_models' hooks and put back exactly what was there."""

from __future__ import annotations

import logging

import pytest
import torch

import wan_kernels
from wan_kernels.attention import AttentionDispatcher, Backend, BackendUnavailable, register_backend, unregister_backend
from wan_models import attention as wan_attention
from wan_models import ops



def _custom_attention(q, k, v):
    return wan_attention.sdpa_attention(q, k, v)


def _custom_rms_norm(x, weight, eps):
    return ops.rms_norm(x, weight, eps)


def _fused_available() -> bool:
    from wan_kernels import triton as fused

    return fused.status()[0]


def test_round_trip_restores_the_previous_functions() -> None:
    wan_attention.set_attention_backend(_custom_attention)
    ops.set_op("rms_norm", _custom_rms_norm)
    before = {name: ops.get_op(name) for name in ops.DEFAULTS}

    active = wan_kernels.enable()
    assert active == wan_kernels.available_backends()[0]
    installed = wan_attention.get_attention_backend()
    assert isinstance(installed, AttentionDispatcher) and installed.active == active
    replaced = {name for name in ops.DEFAULTS if ops.get_op(name) is not before[name]}
    assert replaced == (set(ops.DEFAULTS) if _fused_available() else set())

    wan_kernels.enable("math")  # enabling again must not forget the original functions
    wan_kernels.disable()
    assert wan_attention.get_attention_backend() is _custom_attention
    assert {name: ops.get_op(name) for name in ops.DEFAULTS} == before
    wan_kernels.disable()  # a second disable is a no-op
    assert wan_attention.get_attention_backend() is _custom_attention


def test_fused_ops_false_leaves_ops_alone() -> None:
    wan_kernels.enable("sdpa", fused_ops=False)
    assert all(ops.get_op(name) is fn for name, fn in ops.DEFAULTS.items())


def test_failed_enable_changes_nothing() -> None:
    wan_attention.set_attention_backend(_custom_attention)
    register_backend(Backend("absent", _custom_attention, 1, available=lambda: (False, "not here")))
    try:
        with pytest.raises(BackendUnavailable, match="not here"):
            wan_kernels.enable("absent")
    finally:
        unregister_backend("absent")
    assert wan_attention.get_attention_backend() is _custom_attention
    assert all(ops.get_op(name) is fn for name, fn in ops.DEFAULTS.items())


def test_disable_leaves_hooks_replaced_after_enable(caplog) -> None:
    wan_kernels.enable("sdpa")
    wan_attention.set_attention_backend(_custom_attention)
    with caplog.at_level(logging.WARNING, logger="wan_kernels"):
        wan_kernels.disable()
    assert wan_attention.get_attention_backend() is _custom_attention
    assert "replaced after enable" in caplog.text


def test_report_before_enable_describes_the_would_be_choice() -> None:
    report = wan_kernels.attention_report()
    assert not report.installed and report.active == wan_kernels.available_backends()[0]
    unavailable = {s.name: s.reason for s in report.backends if not s.available}
    if not torch.cuda.is_available():
        assert unavailable == {"flash3": "no CUDA GPU", "flash2": "no CUDA GPU", "sage": "no CUDA GPU"}
