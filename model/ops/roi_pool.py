"""RoI max pooling (Fast R-CNN, Girshick 2015, sec. 2.1).

Notation: N images, C channels, H x W feature map, R RoIs, PH x PW pooled output.

The arithmetic is Caffe's, as in torchvision.ops.roi_pool: a RoI is rounded to feature cells
(round half away from zero of coordinate * spatial_scale), includes both end cells, is at
least 1 x 1, and is cut into PH x PW bins [floor(p * bin), ceil((p + 1) * bin)) clipped to the
map; the first strictly greater value in (h, w) scan order wins, and an empty bin is 0.

Our CuPy kernels (roi_pool.cu) run on CUDA tensors where CuPy works: the forward saves, for
every output element, the flat index h * W + w of its maximum (-1 for an empty bin), and the
backward adds each output gradient there (atomicAdd). Elsewhere torchvision.ops.roi_pool runs,
with its own autograd. float16 / bfloat16 run in float32 and come back in the input's dtype.
"""
import torch
import torchvision
from torch import nn
from torch.autograd.function import once_differentiable

from model.ops import backend as _backend


class RoIPoolFunction(torch.autograd.Function):
    """RoI max pooling with our CUDA kernels: x (N, C, H, W), rois (R, 5), both float32 or both
    float64, contiguous, on CUDA; output_size (PH, PW); the arguments of
    torchvision.ops.roi_pool. Returns (R, C, PH, PW)."""

    @staticmethod
    def forward(ctx, x, rois, output_size, spatial_scale):
        n_roi, channels, height, width = rois.shape[0], *x.shape[1:]
        out = x.new_empty((n_roi, channels, *output_size))  # the kernel writes every element
        argmax = torch.empty(out.shape, dtype=torch.int32, device=x.device)
        _backend.launch_per_element('roi_pool.cu', 'roi_pool_forward', out.numel(), (
            x, rois, float(spatial_scale), channels, height, width, *output_size, out.numel(),
            out, argmax))
        ctx.save_for_backward(rois, argmax)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, argmax = ctx.saved_tensors  # (R, 5), (R, C, PH, PW) int32
        channels, outh, outw = argmax.shape[1:]
        height, width = ctx.x_shape[2:]
        grad = grad_output.contiguous()  # (R, C, PH, PW)
        grad_input = grad.new_zeros(ctx.x_shape)  # (N, C, H, W)
        _backend.launch_per_element('roi_pool.cu', 'roi_pool_backward', grad.numel(), (
            grad, argmax, rois, channels, height, width, outh * outw, grad.numel(), grad_input))
        return grad_input, None, None, None


class RoIPool(nn.Module):
    """Max-pools each RoI of a feature map to outh x outw.

    Args:
        outh, outw: pooled size (PH, PW), 7 x 7 in Faster R-CNN's VGG16 head.
        spatial_scale: feature map size / input size, 1/16 for VGG16 conv5_3.
        backend: 'auto' | 'cupy' | 'torchvision', see model.ops.backend.use_cupy.
    """

    def __init__(self, outh, outw, spatial_scale, backend='auto'):
        super().__init__()
        self.outh, self.outw, self.spatial_scale, self.backend = outh, outw, spatial_scale, backend

    def forward(self, x, rois):
        """x: (N, C, H, W) float; rois: (R, 5) (batch index, x_min, y_min, x_max, y_max) in
        input pixels. Returns (R, C, outh, outw) in x's dtype."""
        return _backend.pool_rois(x, rois, self.backend, RoIPoolFunction.apply,
                                  torchvision.ops.roi_pool, (self.outh, self.outw),
                                  self.spatial_scale)
