"""RoI max pooling (Fast R-CNN, Girshick 2015, sec. 2.1) with our own backward.

Notation: N images, C channels, H x W feature map, R RoIs, PH x PW pooled output.

Forward: our CuPy kernel (roi_pool.cu) on CUDA tensors where CuPy works, else torchvision's
roi_pool op.
Both return the output and the argmax: for every output element the flat index h * W + w of
the maximum in its (H, W) plane, -1 for an empty bin. Backward is ours: each output gradient
goes to its argmax (a CuPy kernel with atomicAdd on CUDA, a torch index_add_ elsewhere).

The arithmetic is Caffe's, as in torchvision.ops.roi_pool: a RoI is rounded to feature cells
(round half away from zero of coordinate * spatial_scale), includes both end cells, is at
least 1 x 1, and is cut into PH x PW bins [floor(p * bin), ceil((p + 1) * bin)) clipped to the
map; the first strictly greater value in (h, w) scan order wins.
float16 / bfloat16 run in float32 and come back in the input's dtype.
"""
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.roi_pool)
from torch import nn
from torch.autograd.function import once_differentiable

from model.ops import backend as _backend


class RoIPool2DFunction(torch.autograd.Function):
    """RoI max pooling as an autograd Function: forward saves the argmax, backward is ours."""

    @staticmethod
    def forward(ctx, x, rois, outh, outw, spatial_scale, use_cupy):
        """x: (N, C, H, W); rois: (R, 5) (batch index, x_min, y_min, x_max, y_max) in input
        pixels, in x's compute dtype; returns (R, C, outh, outw) in x's dtype."""
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        x_c = x.to(dtype).contiguous()
        rois = rois.to(dtype).contiguous()
        n_roi, channels, height, width = rois.shape[0], *x.shape[1:]
        if use_cupy:
            out = x_c.new_empty((n_roi, channels, outh, outw))
            argmax = torch.empty(out.shape, dtype=torch.int32, device=x.device)
            if out.numel() > 0:
                kernel = _backend.compile_kernel('roi_pool.cu', 'roi_pool_forward', dtype)
                _backend.launch(kernel, (-(-out.numel() // 256),), (256,), (
                    x_c, rois, float(spatial_scale), channels, height, width, outh, outw,
                    out.numel(), out, argmax))
        else:
            out, argmax = torch.ops.torchvision.roi_pool(x_c, rois, spatial_scale, outh, outw)
        ctx.save_for_backward(rois, argmax)
        ctx.x_shape, ctx.x_dtype, ctx.use_cupy = x.shape, x.dtype, use_cupy
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, argmax = ctx.saved_tensors  # (R, 5), (R, C, PH, PW) int32
        n_roi, channels, outh, outw = argmax.shape
        height, width = ctx.x_shape[2:]
        grad = grad_output.to(rois.dtype).contiguous()  # (R, C, PH, PW)
        grad_input = grad.new_zeros(ctx.x_shape)  # (N, C, H, W)
        if not ctx.use_cupy:
            # flat index of each output's argmax into grad_input; -1 (empty bin) adds 0 at 0
            plane = rois[:, 0].long()[:, None] * channels + torch.arange(
                channels, device=rois.device)  # (R, C): index of the (H, W) plane
            argmax = argmax.view(n_roi, channels, outh * outw).long()  # (R, C, PH*PW)
            index = plane[:, :, None] * (height * width) + argmax.clamp(min=0)
            grad = grad.view(argmax.shape).masked_fill(argmax < 0, 0)  # (R, C, PH*PW)
            grad_input.view(-1).index_add_(0, index.view(-1), grad.reshape(-1))
        elif grad.numel() > 0:
            kernel = _backend.compile_kernel('roi_pool.cu', 'roi_pool_backward', rois.dtype)
            _backend.launch(kernel, (-(-grad.numel() // 256),), (256,), (
                grad, argmax, rois, channels, height, width, outh * outw, grad.numel(),
                grad_input))
        return grad_input.to(ctx.x_dtype), None, None, None, None, None


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
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f'rois must be (R, 5), got {tuple(rois.shape)}')
        use_cupy = _backend.use_cupy(x, self.backend)
        return RoIPool2DFunction.apply(x, rois, self.outh, self.outw, self.spatial_scale,
                                       use_cupy)
