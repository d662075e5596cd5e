"""How convolutions run fastest on each device: the memory layout, and Winograd's algorithm for
large 3x3 convolutions on x86 CPUs.

Winograd (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"): F(6x6, 3x3)
computes a 6 x 6 output tile from an 8 x 8 input tile with 64 multiplications per channel pair
instead of a direct convolution's 324; the tile transforms cost the rest. PyTorch ships
NNPACK's implementation (AVX2 and NEON kernels) but picks oneDNN for these convolutions (and
NNPACK only for batches of 16 or more); Winograd3x3 calls it directly. Its float32 outputs
differ from a direct convolution's by about 1e-5 of their magnitude, a rounding difference, as
cuDNN's Winograd kernels have.

Winograd wins on large layers only: the kernel's transform is paid once per call, the input's
once per channel and tile. Per layer (forward, forward + backward; 2-core AVX2 CPU, float32):
512 channels at 75x100 0.38x and 0.53x the direct time, 512 at 37x50 0.71x and 0.80x, 256 at
37x50 0.75x and 1.2x, 128 at 75x100 0.50x and 1.2x, 512 at 16x22 1.9x and 1.6x. So Winograd3x3
runs where a layer has at least MIN_CELLS output cells and MIN_WORK = C_in * C_out * H * W:
all of VGG16's convs but conv1_1 at 600x800, none of the small toy backbone's (whose quick
start took 803 s with all its 3x3 convs as Winograd against 649 s direct).

Measured on 2-core AMD EPYC CPUs, VGG16's 13 convs at 600x800, float32, 2 threads:
- AVX2 (Zen 3): oneDNN takes 3.0-3.3 s in NCHW and 2.5-2.8 s channels-last; Winograd 1.6-1.7 s.
  oneDNN's channels-last weight gradients are 2-3x slower than its NCHW ones there (a forward
  and backward pass of the convs: 10.9-12.9 s against 6.6-7.2 s), so NCHW and Winograd.
- AVX-512 with bfloat16 (Zen 4): oneDNN takes 1.39 s in NCHW, 1.37 s channels-last; Winograd
  0.62 s (NNPACK's AVX2 kernels; Zen 4 runs AVX-512 at the same width). Forward and backward,
  every layer trained: 4.4 s NCHW or channels-last, 2.9 s with Winograd. So NCHW and Winograd
  in float32. In bfloat16 (--amp; Winograd is float32 only) oneDNN's channels-last kernels
  are 5-30% faster than its NCHW ones on VGG16's layers: channels-last under autocast.
  Down to ResNet's 3x3 layers at 600x800 (C_in * C_out * H * W just under MIN_WORK) Winograd
  still takes 0.65x the time forward there, but the same forward and backward: under MIN_WORK
  it stays off, as on AVX2.
"""
import functools

import torch
from torch import nn
from torch.autograd.function import once_differentiable

MIN_CELLS = 1600  # output H * W (VGG16's conv5 at 600x800: 37 x 50)
MIN_WORK = 1 << 27  # C_in * C_out * H * W, multiply-adds / 9 (ResNet-50's 3x3 convs: just under)


@functools.cache
def cpu_capability():
    """The vector instructions torch's CPU kernels use: 'AVX2', 'AVX512', 'DEFAULT', ..."""
    return torch.backends.cpu.get_cpu_capability()


def fastest_layout(device):
    """The memory layout convolutions run fastest in on this device, now (under autocast or
    not): channels-last (N, H, W, C in memory) on CUDA (cuDNN's tensor cores) and for oneDNN's
    kernels on CPUs with AVX-512 (bfloat16 under autocast, or where Winograd is not available);
    NCHW elsewhere, which is what Winograd3x3 takes."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.channels_last
    if cpu_capability().startswith('AVX512') and (torch.is_autocast_enabled(device.type)
                                                  or not winograd_available()):
        return torch.channels_last
    return torch.contiguous_format


@functools.cache
def winograd_available():
    """Whether WinogradConv2d runs Winograd3x3 on this machine: an x86 CPU with AVX2 or AVX-512,
    where it is measured faster, and NNPACK works (the call also initialises it: without that,
    every NNPACK convolution fails)."""
    return cpu_capability().startswith(('AVX2', 'AVX512')) and torch._nnpack_available()


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
        ctx.has_bias = bias is not None
        return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias,
                                                 [1, 1], [1, 1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            rotated = weight.flip(2, 3).transpose(0, 1).contiguous()  # (C_in, C_out, 3, 3)
            grad_x = torch._nnpack_spatial_convolution(grad, rotated, None, [1, 1], [1, 1])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1],
                [1, 1], False, [0, 0], 1, [False, ctx.needs_input_grad[1], ctx.has_bias])
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


def use_winograd(module):
    """Makes every 3x3, stride-1, padding-1 nn.Conv2d in module a WinogradConv2d, in place: the
    same parameters and state dict. Returns module."""
    for layer in module.modules():
        if (type(layer) is nn.Conv2d and layer.kernel_size == (3, 3) and layer.stride == (1, 1)
                and layer.padding == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
                and layer.padding_mode == 'zeros'):
            layer.__class__ = WinogradConv2d
    return module
