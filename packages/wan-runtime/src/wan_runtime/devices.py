"""Device and dtype arguments, checked where they enter: a typo or an absent GPU is a one-line error
naming the value, not a torch traceback from deep inside a load or the first step."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype"]

# The dtypes the pipeline computes in, by the names users write.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_dtype(value: torch.dtype | str, name: str = "torch_dtype") -> torch.dtype:
    """``value`` as one of bfloat16 / float16 / float32; names (``"float16"``, ``"torch.float16"``, ``"bf16"``)
    are accepted, anything else raises ``ValueError`` naming ``name``."""
    allowed = "torch.bfloat16, torch.float16 or torch.float32 (or their names, e.g. 'bfloat16')"
    if isinstance(value, str):
        dtype = DTYPES.get(value.lower().removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"{name}={value!r} is not a dtype name; expected {allowed}")
        return dtype
    if value not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}={value!r} is not a dtype the pipeline computes in; expected {allowed}")
    return value


def resolve_device(value: torch.device | str, name: str | None = "device") -> torch.device:
    """``value`` as a ``torch.device`` that this torch build and machine have; raises ``ValueError``
    naming ``name`` (``None``: only the value) for an unknown name, a backend this torch lacks or a
    device index past the count."""
    shown = repr(str(value)) if name is None else f"{name}={str(value)!r}"
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(f"{shown} is not a device name; expected e.g. 'cpu', 'cuda', 'cuda:1' "
                             "or 'mps'") from None
    else:
        raise ValueError(f"{name or 'the device'} must be a device name or torch.device, got "
                         f"{type(value).__name__} {value!r}")
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        why = ("this torch build has no CUDA support" if device.type == "cuda" and torch.version.cuda is None
               else f"no {device.type} device is available")
        raise ValueError(f"{shown}: {why} (torch {torch.__version__}); use 'cpu' or install a "
                         f"torch build for your accelerator")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{shown}: this machine has {count} {device.type} device(s), "
                         f"numbered 0..{count - 1}")
    return device
