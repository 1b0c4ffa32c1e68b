"""Fast CPU convolutions, linear layers and GroupNorm: subclasses of the plain layers with the same parameters
and the same results within float rounding, which `ldm.accel.optimize` swaps in.

Wide 3x3 convolutions run as one GEMM on small feature maps (float32 and bfloat16) and by Winograd's algorithm
on large ones (float32; see winograd.py); 1x1 convolutions of channels-last bfloat16 maps run as linear products
over the pixels (oneDNN's bf16 1x1 kernel is slower); a nearest 2x upsampling followed by a 3x3 convolution runs
without the upsampled map (`FastConv2d.upsampled`); bfloat16 maths on a CPU without bf16 instructions runs in
float32 (see `cpu.emulated_bf16`). Where autograd records, under `torch.compile` and off the CPU, each layer
is its plain self. Measured sizes and speeds: docs/benchmarks.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ldm.accel import chunks
from ldm.accel.cpu import emulated_bf16, linear_product, native_bf16_inference, records_gradients
from ldm.accel.winograd import winograd_conv3x3
from ldm.modules.diffusionmodules.util import GroupNorm32

# On the CPU, float32 3x3 convolutions with at least this many input and output channels run by Winograd's
# algorithm (see winograd.py): F(4x4, 3x3) on maps of at least WINOGRAD_F4_MIN_PIXELS, F(2x2, 3x3) on smaller
# ones of at least WINOGRAD_F2_MIN_PIXELS. Below these sizes the transforms cost more than they save (AVX2 and
# AVX-512); so does Winograd on fewer input channels, in the autoencoder's bands of 128-channel rows.
# It writes into preallocated tiles, so it runs only where autograd records nothing (inference).
WINOGRAD_MIN_IN_CHANNELS = 256
WINOGRAD_MIN_OUT_CHANNELS = 128
WINOGRAD_F4_MIN_PIXELS = 32 * 32
WINOGRAD_F2_MIN_PIXELS = 16 * 16
# Other 3x3 convolutions with at least this many input channels on input maps of at most this many pixels (all
# in bfloat16; in float32 the 8x8 maps and the stride-2 downsampling of 16x16 ones) run as one matrix product:
# there oneDNN's direct kernel reaches a third to half of the GEMM's speed.
GEMM_CONV_MIN_CHANNELS = 1280
GEMM_CONV_MAX_PIXELS = 16 * 16
# Nearest 2x upsampling followed by a 3x3 convolution runs as four 2x2 convolutions (one per output phase) on
# feature maps of at least this many pixels: 16/36 of the multiply-adds, no upsampled intermediate. On smaller
# maps F(4x4) Winograd on the upsampled map is faster (the UNet's 640-channel 32x32 upsampling: 0.19 s against
# 0.25-0.31 s). oneDNN's bfloat16 2x2 kernels are slow enough that in bf16 this pays only on the autoencoder's
# large maps (AMX); bfloat16 inference on smaller maps multiplies all four phases at once by one cached matrix
# (`_upsampled_gemm_conv3x3`: the UNet's 1280-channel 16x16 upsampling 87 against 106-174 ms, AMX).
PHASE_CONV_MIN_PIXELS = 64 * 64
PHASE_CONV_MIN_PIXELS_BF16 = 128 * 128

# `Conv2d._phase_matrix`'s matrices, by weight tensor: an entry goes with its weight, and the modules hold no
# extra state (they pickle and copy as before).
_PHASE_MATRICES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _windows(x: torch.Tensor, size: int, stride: int, out_h: int, out_w: int) -> list[torch.Tensor]:
    """What im2col stacks: `x` [b, c, height, width] padded by one pixel on each side, channels-last, and for each
    position of a size x size kernel (row-major) the [b, out_h, out_w, c] pixels it meets."""
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    return [padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            for i in range(size) for j in range(size)]


def _gemm_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: int = 1) -> torch.Tensor:
    """A padding-1 3x3 convolution of stride 1 or 2 as im2col and one matrix product; channels-last output.

    The columns follow the order of the weight's memory, so the weight is used in place: (channel, kernel row,
    kernel column) for a contiguous weight, (kernel row, kernel column, channel) for a channels-last one, whose
    columns are also quicker to gather (whole runs of channels)."""
    b, _, h, w = x.shape
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    shifted = _windows(x, 3, stride, out_h, out_w)
    if weight.is_contiguous():
        columns, matrix = torch.stack(shifted, dim=-1), weight.view(weight.shape[0], -1)
    else:
        columns, matrix = torch.stack(shifted, dim=3), weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    out = linear_product(columns.view(b, out_h, out_w, -1), matrix, bias)
    return out.permute(0, 3, 1, 2)


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """The [4*out, in, 2, 2] kernels, phases (row, column) major, whose 2x2 convolutions of the padded input give
    a 3x3 convolution of its nearest 2x upsampling: even output rows see input rows (i-1, i) with kernel rows
    (w0, w1 + w2), odd ones rows (i, i+1) with (w0 + w1, w2); columns alike."""
    rows = torch.stack([torch.stack([weight[:, :, 0], weight[:, :, 1] + weight[:, :, 2]], 2),
                        torch.stack([weight[:, :, 0] + weight[:, :, 1], weight[:, :, 2]], 2)])
    kernels = torch.stack([torch.stack([rows[..., 0], rows[..., 1] + rows[..., 2]], -1),
                           torch.stack([rows[..., 0] + rows[..., 1], rows[..., 2]], -1)], 1)
    return kernels.reshape(-1, *kernels.shape[3:])


def _write_phases(out: torch.Tensor, phases: torch.Tensor, top: int, rows: int) -> None:
    """Phase maps [b, rows+1, w+1, 2, 2, out] (from the 2x2 kernels of `_phase_weight` on the padded input) into
    input rows top..top+rows of `out` [b, h, 2, w, 2, out]: output phase (r, c) of input pixel (i, j) is phase
    map position (i + r, j + c)."""
    width = out.shape[3]
    for r in (0, 1):
        for c in (0, 1):
            out[:, top:top + rows, r, :, c] = phases[:, r:r + rows, c:c + width, r, c]


def phase_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The four phase kernels of `_phase_weight` as one [4*out, 4*in] matrix, columns (kernel row, kernel
    column, channel); the taps are summed in float32 and rounded once to the weight's dtype."""
    kernels = _phase_weight(weight.float())
    return kernels.permute(0, 2, 3, 1).reshape(kernels.shape[0], -1).to(weight.dtype)


def _upsampled_gemm_conv3x3(x: torch.Tensor, matrix: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) (stride 1, padding 1) as one matrix product with the `phase_matrix` of
    its weight over the 2x2 im2col of the padded input; channels-last output. 16/36 of the multiply-adds of the
    upsampled convolution in one large product, where oneDNN's bfloat16 2x2 convolutions are slow."""
    b, _, h, w = x.shape
    out_channels = matrix.shape[0] // 4
    columns = torch.stack(_windows(x, 2, 1, h + 1, w + 1), dim=3)
    phases = linear_product(columns.view(b, h + 1, w + 1, -1), matrix, None if bias is None else bias.repeat(4))
    phases = phases.unflatten(-1, (2, 2, out_channels))  # [b, h+1, w+1, r, c, out]
    out = x.new_empty(b, h, 2, w, 2, out_channels)
    _write_phases(out, phases, 0, h)
    return out.view(b, 2 * h, 2 * w, out_channels).permute(0, 3, 1, 2)


def _upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) (stride 1, padding 1) through `_phase_weight`; channels-last output.

    A band of input rows at a time: each band's four phase maps stay under `chunks.CHUNK_BYTES` and go straight
    into their places in the output, so the peak is the output plus one band."""
    b, _, h, w = x.shape
    out_channels = weight.shape[0]
    phase_weight, phase_bias = _phase_weight(weight), None if bias is None else bias.repeat(4)
    padded = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty(b, h, 2, w, 2, out_channels)
    band = chunks.rows_per_chunk(b * (w + 1) * 4 * out_channels * x.element_size())
    for top in range(0, h, band):
        rows = min(band, h - top)
        phases = F.conv2d(padded[:, :, top:top + rows + 2], phase_weight, phase_bias)  # rows + 1 phase rows
        phases = phases.permute(0, 2, 3, 1).unflatten(-1, (2, 2, out_channels))  # [b, rows+1, w+1, r, c, out]
        _write_phases(out, phases, top, rows)
    return out.view(b, 2 * h, 2 * w, out_channels).permute(0, 3, 1, 2)


class FastConv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same results within float rounding) with CPU fast paths.

    On the CPU, wide 3x3 convolutions run as one GEMM on small feature maps (float32 and bfloat16) and by
    Winograd's algorithm on large ones (float32; see winograd.py), 1x1 convolutions of channels-last bfloat16
    maps as linear products over the pixels (`linear_product`; oneDNN's bf16 1x1 kernel is 0-90 % slower),
    `upsampled` fuses a nearest 2x upsampling into the convolution (in bfloat16 inference on small maps through a
    cached matrix of its phase kernels), and bfloat16 maths on a CPU without bf16 instructions runs in float32
    (see `emulated_bf16`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if emulated_bf16(x, self.weight):
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                return self._cpu_forward(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return self._cpu_forward(x, self.weight, self.bias)

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """self(nearest 2x upsampling of x), without the upsampled map where that is faster (CPU maps; in bfloat16
        inference on maps under PHASE_CONV_MIN_PIXELS_BF16 one matrix product with the cached `phase_matrix`)."""
        if (x.device.type != "cpu" or x.ndim != 4 or self.kernel_size != (3, 3) or self.stride != (1, 1)
                or self.padding != (1, 1) or self.dilation != (1, 1) or self.groups != 1):
            return self(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        pixels = x.shape[-2] * x.shape[-1]
        if pixels < PHASE_CONV_MIN_PIXELS_BF16 and native_bf16_inference(x, self.weight):
            return _upsampled_gemm_conv3x3(x, self._phase_matrix(), self.bias)
        emulated = emulated_bf16(x, self.weight)
        native_bf16 = x.dtype == torch.bfloat16 and not emulated
        if pixels < (PHASE_CONV_MIN_PIXELS_BF16 if native_bf16 else PHASE_CONV_MIN_PIXELS):
            return self(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        if emulated:
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                return _upsampled_conv3x3(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return _upsampled_conv3x3(x, self.weight, self.bias)

    def _phase_matrix(self) -> torch.Tensor:
        """`phase_matrix(self.weight)`, kept until the weight changes (16/9 of the weight's size; it takes longer
        to build than the convolution)."""
        weight = self.weight
        state = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
        cached = _PHASE_MATRICES.get(weight)
        if cached is None or cached[0] != state:
            cached = _PHASE_MATRICES[weight] = (state, phase_matrix(weight.detach()))
        return cached[1]

    def _apply(self, fn, recurse: bool = True):
        _PHASE_MATRICES.pop(self.weight, None)
        return super()._apply(fn, recurse)

    def _cpu_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The convolution, by the fastest of the CPU fast paths that applies (the GEMM also in bfloat16: the
        direct kernel would copy a channels-last version of the weight on every call)."""
        if (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1
                and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and native_bf16_inference(x, weight)):
            pixels = x.permute(0, 2, 3, 1)  # [batch, height, width, channels]: no copy
            return linear_product(pixels, weight.reshape(self.out_channels, -1), bias).permute(0, 3, 1, 2)
        if not (x.device.type == "cpu" and x.ndim == 4 and not torch.compiler.is_compiling()
                and self.kernel_size == (3, 3) and self.stride in ((1, 1), (2, 2)) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and x.dtype == weight.dtype
                and x.dtype in (torch.float32, torch.bfloat16)
                and (x.dtype == torch.bfloat16 or not torch.is_autocast_enabled("cpu"))):
            return self._conv_forward(x, weight, bias)
        pixels = x.shape[-2] * x.shape[-1]
        if (not records_gradients(x, weight) and x.dtype == torch.float32 and self.stride == (1, 1)
                and pixels >= WINOGRAD_F2_MIN_PIXELS and self.in_channels >= WINOGRAD_MIN_IN_CHANNELS
                and self.out_channels >= WINOGRAD_MIN_OUT_CHANNELS):
            return winograd_conv3x3(x, weight, bias, tile=4 if pixels >= WINOGRAD_F4_MIN_PIXELS else 2)
        if self.in_channels >= GEMM_CONV_MIN_CHANNELS and pixels <= GEMM_CONV_MAX_PIXELS:
            return _gemm_conv3x3(x, weight, bias, self.stride[0])
        return self._conv_forward(x, weight, bias)


class FastLinear(nn.Linear):
    """`nn.Linear` whose bfloat16 maths runs in float32 on CPUs without bf16 instructions and through oneDNN's
    linear primitive on CPUs with them (see `linear_product`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if emulated_bf16(x, self.weight):
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return linear_product(x, self.weight, self.bias)


class FastGroupNorm32(GroupNorm32):
    """`GroupNorm32` whose bfloat16 maps on the CPU go to the native kernel, which accumulates and normalises in
    float32 itself (same values up to the final rounding to bf16, in less time than casting to float32 and back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return nn.GroupNorm.forward(self, x)
        return super().forward(x)
