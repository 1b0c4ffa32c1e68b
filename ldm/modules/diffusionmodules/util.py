"""Building blocks shared by the diffusion model and its samplers.

Schedules follow Ho et al. 2020 (DDPM, arXiv:2006.11239) and Song et al. 2021
(DDIM, arXiv:2010.02502); the timestep embedding is the sinusoidal one of
Vaswani et al. 2017 as used by the ADM UNet (Dhariwal & Nichol 2021).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ldm.modules.diffusionmodules import chunks
from ldm.modules.diffusionmodules.winograd import winograd_conv3x3

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


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """Noise variances beta_1..beta_T; 'linear' is linear in sqrt(beta) as in latent diffusion."""
    if schedule == "linear":
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    elif schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        betas = np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    elif schedule == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    elif schedule == "sqrt":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; use linear, cosine, sqrt_linear or sqrt")
    return betas


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = False) -> np.ndarray:
    """The DDPM timesteps a DDIM run visits, shifted by one as in the original ('uniform' or 'quad')."""
    if num_ddim_timesteps < 1 or num_ddim_timesteps > num_ddpm_timesteps:
        raise ValueError(f"the number of sampling steps must be between 1 and {num_ddpm_timesteps}, got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        timesteps = np.asarray(list(range(0, num_ddpm_timesteps, stride)))
        # As in the original, a step count that does not divide T gives one extra step; one that would
        # step past the last timestep (the original crashed there, e.g. 3 or 9 steps) drops it.
        timesteps = timesteps[timesteps + 1 < num_ddpm_timesteps]
    elif ddim_discr_method == "quad":
        timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretisation {ddim_discr_method!r}; use 'uniform' or 'quad'")
    return timesteps + 1


def make_ddim_sampling_parameters(alphacums: torch.Tensor, ddim_timesteps: np.ndarray, eta: float,
                                  verbose: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha_t, alpha_{t-1} and sigma_t(eta) of DDIM (Song et al. 2021, eq. 16)."""
    alphacums = torch.as_tensor(alphacums).cpu()
    alphas = alphacums[ddim_timesteps].numpy().astype(np.float64)
    alphas_prev = np.asarray([alphacums[0].item()] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Gather a[t] per batch element and shape it to broadcast against x."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def checkpoint(func, inputs: Iterable, params: Iterable, flag: bool):
    """Gradient checkpointing: recompute `func(*inputs)` in the backward pass when `flag` is set."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape [N, dim]."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (output layers start at zero, as in the original)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16 overflows otherwise). bfloat16 on the CPU
    goes to the native kernel, which accumulates and normalises in float32 itself (same values up to the final
    rounding to bf16, in 2.5x less time than casting to float32 and back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu"):
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX), as torch reports it, and oneDNN's
    bfloat16 linear primitive, which the fast paths call, runs here (`ONEDNN_MAX_CPU_ISA` can rule it out)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    onednn_linear = _onednn_linear()
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


def _records_gradients(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autograd records an operation on `x` and `weight`."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _native_bf16_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bfloat16 maths without gradients on a CPU with bf16 instructions, outside `torch.compile`."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and not torch.compiler.is_compiling() and cpu_has_bf16() and not _records_gradients(x, weight))


@functools.cache
def _onednn_linear() -> Optional[Callable[..., torch.Tensor]]:
    """oneDNN's linear primitive (the one torch's CPU compiler fuses into), where this torch build has it."""
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def linear_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)`. bfloat16 inference on a CPU with bf16 instructions goes to oneDNN's linear
    primitive, which adds the bias in float32 inside the product: ATen's bf16 `addmm` first copies the bias into
    the output, then multiplies onto it, 10-50 % slower on the UNet's shapes (same result, one rounding)."""
    if _native_bf16_inference(x, weight) and (bias is None or bias.dtype == torch.bfloat16):
        onednn_linear = _onednn_linear()
        if onednn_linear is not None:
            return onednn_linear(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


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


class Conv2d(nn.Conv2d):
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
        if pixels < PHASE_CONV_MIN_PIXELS_BF16 and _native_bf16_inference(x, self.weight):
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
                and _native_bf16_inference(x, weight)):
            pixels = x.permute(0, 2, 3, 1)  # [batch, height, width, channels]: no copy
            return linear_product(pixels, weight.reshape(self.out_channels, -1), bias).permute(0, 3, 1, 2)
        if not (x.device.type == "cpu" and x.ndim == 4 and not torch.compiler.is_compiling()
                and self.kernel_size == (3, 3) and self.stride in ((1, 1), (2, 2)) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and x.dtype == weight.dtype
                and x.dtype in (torch.float32, torch.bfloat16)
                and (x.dtype == torch.bfloat16 or not torch.is_autocast_enabled("cpu"))):
            return self._conv_forward(x, weight, bias)
        pixels = x.shape[-2] * x.shape[-1]
        if (not _records_gradients(x, weight) and x.dtype == torch.float32 and self.stride == (1, 1)
                and pixels >= WINOGRAD_F2_MIN_PIXELS and self.in_channels >= WINOGRAD_MIN_IN_CHANNELS
                and self.out_channels >= WINOGRAD_MIN_OUT_CHANNELS):
            return winograd_conv3x3(x, weight, bias, tile=4 if pixels >= WINOGRAD_F4_MIN_PIXELS else 2)
        if self.in_channels >= GEMM_CONV_MIN_CHANNELS and pixels <= GEMM_CONV_MAX_PIXELS:
            return _gemm_conv3x3(x, weight, bias, self.stride[0])
        return self._conv_forward(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose bfloat16 maths runs in float32 on CPUs without bf16 instructions and through oneDNN's
    linear primitive on CPUs with them (see `linear_product`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if emulated_bf16(x, self.weight):
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return linear_product(x, self.weight, self.bias)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Module:
    return Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def noise_like(shape: Sequence[int], device: torch.device, repeat: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise; with `repeat` one draw shared across the batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device, generator=generator).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device, generator=generator)
