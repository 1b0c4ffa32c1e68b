"""What the CPU can do fast, found at run time, and the checks every fast path shares.

The fast paths run only where autograd records nothing (they write into preallocated buffers or call kernels
without a backward) and outside `torch.compile` (whose compiler picks its own kernels): `cpu_inference`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX), as torch reports it, and oneDNN's
    bfloat16 linear primitive, which the fast paths call, runs here (`ONEDNN_MAX_CPU_ISA` can rule it out)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    onednn_linear = onednn_linear_primitive()
    if onednn_linear is None:
        return True
    probe = torch.ones(1, 16, dtype=torch.bfloat16)
    try:
        onednn_linear(probe, probe, None, "none", [], "")
    except RuntimeError:
        return False
    return True


def emulated_bf16(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> bool:
    """True for bfloat16 maths (bf16 tensors or bf16 autocast) on a CPU that would only emulate it.

    Such maths runs faster in float32 there; the result is cast back to bfloat16 (and is more accurate).
    Under `torch.compile` the compiler chooses the kernels, so this stays out of its graphs.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling() or cpu_has_bf16():
        return False
    return (x.dtype == torch.bfloat16 or (weight is not None and weight.dtype == torch.bfloat16)
            or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))


def records_gradients(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autograd records an operation on `x` and `weight`."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def native_bf16_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bfloat16 maths without gradients on a CPU with bf16 instructions, outside `torch.compile`."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and not torch.compiler.is_compiling() and cpu_has_bf16() and not records_gradients(x, weight))


@functools.cache
def onednn_linear_primitive() -> Optional[Callable[..., torch.Tensor]]:
    """oneDNN's linear primitive (the one torch's CPU compiler fuses into), where this torch build has it."""
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def linear_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)`. bfloat16 inference on a CPU with bf16 instructions goes to oneDNN's linear
    primitive, which adds the bias in float32 inside the product: ATen's bf16 `addmm` first copies the bias into
    the output, then multiplies onto it, 10-50 % slower on the UNet's shapes (same result, one rounding)."""
    if native_bf16_inference(x, weight) and (bias is None or bias.dtype == torch.bfloat16):
        onednn_linear = onednn_linear_primitive()
        if onednn_linear is not None:
            return onednn_linear(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether `x` is on the CPU, outside `torch.compile`, with gradients off."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
