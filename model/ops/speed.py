"""The speed switch: how a built detector runs fastest on this machine, applied by whoever runs
it (trainer, evaluation, detect, benchmark), never by the model's own classes.

    speed_up(model)          in place, same parameters and state dict; returns model
    speed_up(model, False)   back to the plain model that build_faster_rcnn returned

What it changes, where it pays (docs/performance.md has the measurements behind each rule):
- Winograd's algorithm (Lavin & Gray 2016) for large 3x3 stride-1 convolutions on x86 CPUs
  (AVX2 or AVX-512), through the NNPACK kernels torch ships but does not pick for them:
  F(6x6, 3x3) takes 64 multiplications per 6x6 output tile and channel pair instead of 324.
  VGG16's convolutions at 600x800 take about half the time forward and two thirds forward and
  backward. The results differ from a direct convolution by about 1e-5 of their magnitude.
- The memory layout the images enter the extractor in: channels-last on CUDA, and on AVX-512
  CPUs under autocast (oneDNN's bfloat16 kernels); NCHW elsewhere, which Winograd takes. Narrow
  models (no convolution of WIDE_CHANNELS outputs: the toy backbones) stay NCHW: their
  per-shape set-up outweighs the gain.
Beside it, for the process: mixed_precision (--amp's autocast, and whether it is faster here)
and keep_freed_memory (glibc's allocator).
"""
import ctypes
import functools
import warnings

import torch
from torch import nn
from torch.autograd.function import once_differentiable

MIN_CELLS = 1600  # output H * W (VGG16's conv5 at 600x800: 37 x 50)
MIN_WORK = 1 << 27  # C_in * C_out * H * W, multiply-adds / 9 (ResNet-50's 3x3 convs: just under)
WIDE_CHANNELS = 512  # the toy backbones' widest convolution has 256 outputs


@functools.cache
def cpu_capability():
    """The vector instructions torch's CPU kernels use: 'AVX2', 'AVX512', 'DEFAULT', ..."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def winograd_available():
    """Whether WinogradConv2d runs Winograd3x3 on this machine: an x86 CPU with AVX2 or AVX-512,
    where it is measured faster, and NNPACK works (the call also initialises it: without that,
    every NNPACK convolution fails)."""
    return cpu_capability().startswith(('AVX2', 'AVX512')) and torch._nnpack_available()


def fastest_layout(device):
    """The memory layout convolutions run fastest in on this device, now (under autocast or
    not): channels-last on CUDA (cuDNN's tensor cores) and for oneDNN's kernels on CPUs with
    AVX-512 (bfloat16 under autocast, or where Winograd is not available); NCHW elsewhere."""
    device = torch.device(device)
    if device.type == 'cuda' or (cpu_capability().startswith('AVX512') and (
            torch.is_autocast_enabled(device.type) or not winograd_available())):
        return torch.channels_last
    return torch.contiguous_format


class Winograd3x3(torch.autograd.Function):
    """A 3x3 convolution with stride 1 and padding 1 of NCHW float32 CPU tensors, by NNPACK's
    Winograd F(6x6, 3x3), with its gradients.

    The input's gradient is the same kind of convolution, of the output's gradient with the
    kernel rotated by 180 degrees and its input and output channels swapped: Winograd again.
    The kernel's and the bias's gradients come from oneDNN (PyTorch exposes no NNPACK op for
    them).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        """x (N, C_in, H, W); weight (C_out, C_in, 3, 3); bias (C_out,) or None.
        Returns (N, C_out, H, W)."""
        ctx.save_for_backward(x, weight)
        return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias,
                                                 [1, 1], [1, 1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            rotated = weight.flip(2, 3).transpose(0, 1).contiguous()  # (C_in, C_out, 3, 3)
            grad_x = torch._nnpack_spatial_convolution(grad, rotated, None, [1, 1], [1, 1])
        # The kernel's and the bias's gradients, each only where needed (else None).
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [False, *ctx.needs_input_grad[1:]])
        return grad_x, grad_weight, grad_bias


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d (3x3, stride 1, padding 1) that runs as Winograd3x3 where winograd_available,
    on NCHW float32 CPU tensors outside autocast and torch.compile (NNPACK's op has no kernel
    for the compiler's shape tracing), for layers of MIN_CELLS and MIN_WORK; as nn.Conv2d
    otherwise."""

    def forward(self, x):
        cells = x.shape[-1] * x.shape[-2]
        if (cells >= MIN_CELLS and x.shape[1] * self.out_channels * cells >= MIN_WORK
                and x.device.type == 'cpu' and x.dtype == self.weight.dtype == torch.float32
                and x.is_contiguous() and not torch.is_autocast_enabled('cpu')
                and not torch.compiler.is_compiling() and winograd_available()):
            return Winograd3x3.apply(x, self.weight, self.bias)
        return super().forward(x)


def use_winograd(module, enabled=True):
    """Makes every 3x3, stride-1, padding-1 nn.Conv2d in module a WinogradConv2d (enabled) or
    every WinogradConv2d an nn.Conv2d again, in place: the same parameters and state dict.
    Returns module."""
    for layer in module.modules():
        if enabled and type(layer) is nn.Conv2d and (
                layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                layer.padding_mode) == ((3, 3), (1, 1), (1, 1), (1, 1), 1, 'zeros'):
            layer.__class__ = WinogradConv2d
        elif not enabled and type(layer) is WinogradConv2d:
            layer.__class__ = nn.Conv2d
    return module


def _to_fastest_layout(model, args):
    """Forward pre-hook of a detector: its images (the first argument) in fastest_layout; else
    None, which leaves the arguments as they are."""
    if args and isinstance(args[0], torch.Tensor):
        images, *rest = args
        return images.contiguous(memory_format=fastest_layout(images.device)), *rest


def is_wide(model):
    """Whether a detector has a convolution of WIDE_CHANNELS outputs in its extractor: where
    speed_up runs its images in the device's fastest layout (else NCHW)."""
    return any(isinstance(m, nn.Conv2d) and m.out_channels >= WIDE_CHANNELS
               for m in model.extractor.modules())


def speed_up(model, enabled=True):
    """Runs a detector (FasterRCNN) as fast as this machine allows, or, not enabled, as
    build_faster_rcnn returned it: Winograd for its large 3x3 convolutions, and its images in
    the device's fastest layout at each forward (wide models only). In place; the parameters
    and the state dict stay the same. Returns model."""
    use_winograd(model, enabled)
    hooks = model._forward_pre_hooks
    for key in [key for key, hook in hooks.items() if hook is _to_fastest_layout]:
        del hooks[key]
    if enabled and is_wide(model):
        model.register_forward_pre_hook(_to_fastest_layout)
    return model


@functools.cache  # asked at every training step under --amp; the CPU does not change
def cpu_computes_bfloat16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # no such op in this torch build: assume it is fast
        return True


def fast_mixed_precision(device):
    """Whether --amp makes this device faster: CUDA, or a CPU whose oneDNN computes in bfloat16
    (AVX-512 or AMX). Elsewhere bfloat16 is emulated, several times slower than float32."""
    return torch.device(device).type != 'cpu' or cpu_computes_bfloat16()


def mixed_precision(device, enabled):
    """--amp's autocast: float16 on CUDA (with the trainer's gradient scaler), bfloat16
    elsewhere (float32's range: no scaler needed). Warns where that is slower than float32.

    Around a whole evaluation, each weight is cast once rather than once per image: autocast
    keeps its casts until the context closes.
    """
    device = torch.device(device)
    if enabled and not fast_mixed_precision(device):
        warnings.warn('--amp on a CPU without bfloat16 instructions (AVX-512 or AMX) runs '
                      'emulated, several times slower than float32: use --amp=false', stacklevel=2)
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def keep_freed_memory():
    """Has glibc's malloc keep freed memory for the next allocation instead of handing it
    back to the OS: by default it maps every block over 32 MB fresh and unmaps it when freed,
    so each forward pass page-faults its large activations in again (about 10% of VGG16's
    convolution time on a CPU), with the same peak memory. Blocks up to 1 GB are kept. A no-op
    without glibc (macOS, Windows)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
