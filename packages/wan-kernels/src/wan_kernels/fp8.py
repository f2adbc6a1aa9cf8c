"""FP8 weight storage for linear layers: half the memory of bf16 weights, a quarter of float32.

:class:`FP8Linear` keeps its weight as ``float8_e4m3fn`` with a float32 scale per tensor or per
output channel (``weight ~= weight_fp8 * scale``). Its forward works on any device: dequantise to
the activation dtype and ``F.linear``. With ``scaled_mm=True`` on a GPU with FP8 tensor cores
(sm89+), fp16/bf16 activations are quantised on the fly (one fused Triton pass per row where
triton is installed) and multiplied by ``torch._scaled_mm`` instead: 1.1-1.4x faster than bf16 on
an H100, with the extra error of 8-bit activations. :func:`quantize_fp8` swaps the
matching ``nn.Linear`` layers of a model in place; quantise after choosing the model's dtype and
device (``module.to(dtype)`` would also cast the fp8 buffers, since torch counts fp8 as floating).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = 1e-12  # floor for an all-zero row's amax, so its scale stays finite


def quantize_weight(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8, scale)`` with ``weight ~= weight_fp8.float() * scale``.

    ``scale`` is float32 ``[out, 1]`` per output channel, or a 0-d tensor per tensor; each maps the
    largest magnitude it covers to 448, the e4m3 maximum.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = amax.clamp_min(_TINY) / FP8_MAX
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor, per_channel: bool) -> bool:
    """Whether ``torch._scaled_mm`` can take this call on this GPU (FP8 tensor cores, aligned sizes)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    capability = torch.cuda.get_device_capability(x.device)
    if capability < (8, 9) or (per_channel and (capability < (9, 0) or x.dtype != torch.bfloat16)):
        return False  # row-wise scales (per-channel weights) need sm90 and bf16 output
    out_features, in_features = weight.shape
    return in_features % 16 == 0 and out_features % 16 == 0


def quantize_activations(rows: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows_fp8, scale)`` for ``[M, K]`` activations: ``scale`` is ``[M, 1]`` per row or 0-d.

    Per-row quantisation of CUDA tensors runs as one fused Triton pass when triton is installed.
    """
    if per_row and rows.is_cuda:
        try:
            from .triton.fp8_quant import quantize_rows
        except ImportError:  # no triton: the torch expression below
            pass
        else:
            return quantize_rows(rows)
    amax = rows.abs().amax(dim=1, keepdim=True) if per_row else rows.abs().amax()
    x_scale = amax.float().clamp_min(_TINY) / FP8_MAX
    return (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), x_scale


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` through ``torch._scaled_mm`` with ``x`` quantised to FP8.

    Activations get one scale per token when the weight has per-channel scales (row-wise
    scaling), else one per tensor. Output in ``x``'s dtype.
    """
    per_row = scale.ndim > 0
    x_fp8, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]), per_row)
    w_scale = scale.reshape(1, -1) if per_row else scale
    bias = None if bias is None else bias.to(x.dtype)
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Module):
    """``nn.Linear`` whose weight is stored as ``float8_e4m3fn`` plus a float32 ``scale``.

    The stored form is the buffers ``weight_fp8`` and ``scale`` (inference only); the bias keeps
    its dtype. ``weight`` is a read-only property giving the dequantised weight in
    ``compute_dtype`` (the original weight dtype), so code that reads ``layer.weight.dtype`` to
    pick its activation dtype (as the DiT does) keeps working; it materialises the full matrix,
    so read it sparingly. ``scaled_mm`` turns on the ``torch._scaled_mm`` path where the GPU
    supports it; every other call dequantises and runs ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = True,
                 scaled_mm: bool = False, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.per_channel, self.scaled_mm, self.compute_dtype = per_channel, scaled_mm, compute_dtype
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        scale_shape = (out_features, 1) if per_channel else ()
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True, scaled_mm: bool = False) -> "FP8Linear":
        """Quantise ``linear``'s weight (on its device); the bias is kept as is."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    per_channel=per_channel, scaled_mm=scaled_mm, compute_dtype=weight.dtype,
                    device=weight.device)
        layer.weight_fp8, layer.scale = quantize_weight(weight, per_channel)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as ``dtype`` (default ``compute_dtype``): ``weight_fp8 * scale`` in float32."""
        return (self.weight_fp8.float() * self.scale).to(dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight in ``compute_dtype`` (a new tensor on every access)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm and _scaled_mm_supported(x, self.weight_fp8, self.per_channel):
            return scaled_mm_linear(x, self.weight_fp8, self.scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scale={'per-channel' if self.per_channel else 'per-tensor'}, compute_dtype={self.compute_dtype}, "
                f"scaled_mm={self.scaled_mm}")


@dataclass(frozen=True)
class FP8Report:
    """What :func:`quantize_fp8` did: which layers it swapped or left, and the weight bytes."""

    quantized: tuple[str, ...]
    skipped: tuple[str, ...]          # nn.Linear layers the include/exclude patterns left alone
    bytes_before: int                 # weights (not biases) of the swapped layers, before
    bytes_after: int                  # their fp8 weights plus scales
    per_channel: bool = True
    scaled_mm: bool = False

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


def _matches(name: str, patterns: Iterable[str] | str | None, default: bool) -> bool:
    if patterns is None:
        return default
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_fp8(model: nn.Module, include: Iterable[str] | str | None = None,
                 exclude: Iterable[str] | str | None = None, per_channel: bool = True,
                 scaled_mm: bool = False) -> FP8Report:
    """Replace ``model``'s ``nn.Linear`` layers by :class:`FP8Linear`, in place.

    ``include``/``exclude`` are ``fnmatch`` patterns on qualified module names (e.g.
    ``"blocks.*"``, ``"*.ffn.*"``); a layer is swapped when it matches ``include`` (default: all)
    and not ``exclude``. Layers on the meta device cannot be quantised and raise ``ValueError``.
    """
    quantized, skipped = [], []
    before = after = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if not _matches(name, include, True) or _matches(name, exclude, False):
            skipped.append(name)
            continue
        if not name:
            raise ValueError("quantize_fp8 swaps submodules; wrap a bare nn.Linear with FP8Linear.from_linear")
        if module.weight.is_meta:
            raise ValueError(f"{name}: weights are on the meta device; load them before quantize_fp8")
        layer = FP8Linear.from_linear(module, per_channel=per_channel, scaled_mm=scaled_mm)
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, layer)
        quantized.append(name)
        before += module.weight.numel() * module.weight.element_size()
        after += layer.weight_fp8.numel() + layer.scale.numel() * layer.scale.element_size()
    logger.info("quantize_fp8: %d linear layers to fp8 (%d left), %.1f MiB of weights saved",
                len(quantized), len(skipped), (before - after) / 2**20)
    return FP8Report(tuple(quantized), tuple(skipped), before, after, per_channel, scaled_mm)
