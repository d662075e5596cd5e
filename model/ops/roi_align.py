"""RoIAlign (Mask R-CNN, He et al. 2017, sec. 3): RoI pooling without rounding.

Notation: N images, C channels, H x W feature map, R RoIs, PH x PW output.

A RoI's corners are multiplied by spatial_scale and, if aligned, shifted by -0.5, which puts
the centre of cell (h, w) at (h, w) (Detectron2's fix of a half-cell offset); not aligned, as
in the original Detectron, a RoI is at least 1 x 1. The RoI is cut into PH x PW equal bins,
and a bin is the average of grid_h x grid_w bilinear samples at the centres of a regular grid
over it: sampling_ratio x sampling_ratio, or, when 0, adaptive ceil(roi_h / PH) x
ceil(roi_w / PW) (an empty grid gives 0; an aligned RoI inverted along one axis only makes
torchvision's CPU op raise, our kernel gives 0). A sample at (y, x) outside [-1, H] x [-1, W]
is 0; inside, coordinates below 0 are clamped to 0 and beyond the last cell to it. These are
torchvision.ops.roi_align's rules.

Our CuPy kernels (roi_align.cu) run on CUDA tensors where CuPy works, forward and backward
(atomicAdd); the forward is bit-identical to torchvision's CPU op. Elsewhere
torchvision.ops.roi_align runs, with its own autograd. float16 / bfloat16 run in float32 and
come back in the input's dtype.
"""
import torch
import torchvision
from torch import nn
from torch.autograd.function import once_differentiable

from model.ops import backend as _backend


def _launch(name, source, rois, params, target):
    """roi_align.cu's kernel `name`(source, rois, *params, target), one thread per output
    element: params ends with their number, R * C * PH * PW. Nothing to do if source or target
    is empty."""
    if source.numel() > 0 and target.numel() > 0:
        args = (source, rois, *params, target)
        _backend.launch_per_element('roi_align.cu', name, params[-1], args)


class RoIAlignFunction(torch.autograd.Function):
    """RoIAlign with our CUDA kernels: x (N, C, H, W), rois (R, 5), both float32 or both
    float64, contiguous, on CUDA; output_size (PH, PW); the arguments of
    torchvision.ops.roi_align. Returns (R, C, PH, PW)."""

    @staticmethod
    def forward(ctx, x, rois, output_size, spatial_scale, sampling_ratio, aligned):
        channels, height, width = x.shape[1:]
        out = x.new_zeros((rois.shape[0], channels, *output_size))
        params = (float(spatial_scale), channels, height, width, *output_size,
                  int(sampling_ratio), int(aligned), out.numel())
        _launch('roi_align_forward', x, rois, params, out)
        ctx.save_for_backward(rois)
        ctx.params, ctx.x_shape = params, x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        grad_input = grad_output.new_zeros(ctx.x_shape)  # (N, C, H, W)
        grad_output = grad_output.contiguous()  # (R, C, PH, PW)
        _launch('roi_align_backward', grad_output, rois, ctx.params, grad_input)
        return grad_input, None, None, None, None, None


class RoIAlign(nn.Module):
    """Bilinear RoI pooling of each RoI of a feature map to output_size.

    Args:
        output_size: PH = PW, or (PH, PW); 7 or 14 in the Mask R-CNN heads.
        spatial_scale: feature map size / input size, 1/16 for a C4 (stride 16) feature map.
        sampling_ratio: samples per bin along each axis; 0: adaptive, see the module docstring.
        aligned: shift by -0.5 cell (Detectron2's ROIAlignV2); False: the paper's original.
        backend: 'auto' | 'cupy' | 'torchvision', see model.ops.backend.use_cupy.
    """

    def __init__(self, output_size, spatial_scale, sampling_ratio=0, aligned=True, backend='auto'):
        super().__init__()
        pair = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
        self.output_size, self.spatial_scale = tuple(pair), spatial_scale
        self.sampling_ratio, self.aligned, self.backend = sampling_ratio, aligned, backend

    def forward(self, x, rois):
        """x: (N, C, H, W) float; rois: (R, 5) (batch index, x_min, y_min, x_max, y_max) in
        input pixels. Returns (R, C, PH, PW) in x's dtype."""
        return _backend.pool_rois(x, rois, self.backend, RoIAlignFunction.apply,
                                  torchvision.ops.roi_align, self.output_size, self.spatial_scale,
                                  self.sampling_ratio, self.aligned)
