"""RoI max pooling (Fast R-CNN, Girshick 2015, sec. 2.1) with our own backward.

Notation: N images, C channels, H x W feature map, R RoIs, PH x PW pooled output.

Forward: our CuPy kernel on CUDA tensors where CuPy works, else torchvision's roi_pool op.
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

from model.utils import backend as _backend

_ROI_POOL_SOURCE = r'''
// One thread per output element (r, c, ph, pw) of the (R, C, PH, PW) output.
extern "C" __global__ void roi_pool_forward(
    const scalar_t* x, const scalar_t* rois, const double spatial_scale, const int channels,
    const int height, const int width, const int pooled_h, const int pooled_w,
    const int total, scalar_t* out, int* argmax) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int pw = index % pooled_w;
  const int ph = (index / pooled_w) % pooled_h;
  const int c = (index / pooled_w / pooled_h) % channels;
  const int r = index / pooled_w / pooled_h / channels;
  const scalar_t* roi = rois + r * 5;
  const scalar_t scale = (scalar_t)spatial_scale;
  const int start_w = (int)round(roi[1] * scale);
  const int start_h = (int)round(roi[2] * scale);
  const int roi_w = max((int)round(roi[3] * scale) - start_w + 1, 1);
  const int roi_h = max((int)round(roi[4] * scale) - start_h + 1, 1);
  const scalar_t bin_w = (scalar_t)roi_w / (scalar_t)pooled_w;
  const scalar_t bin_h = (scalar_t)roi_h / (scalar_t)pooled_h;
  const int hstart = min(max((int)floor((scalar_t)ph * bin_h) + start_h, 0), height);
  const int hend = min(max((int)ceil((scalar_t)(ph + 1) * bin_h) + start_h, 0), height);
  const int wstart = min(max((int)floor((scalar_t)pw * bin_w) + start_w, 0), width);
  const int wend = min(max((int)ceil((scalar_t)(pw + 1) * bin_w) + start_w, 0), width);
  const bool empty = hend <= hstart || wend <= wstart;
  // -FLT_MAX as torchvision starts from, for double too; an empty bin gives 0 and -1.
  scalar_t best = empty ? (scalar_t)0 : (scalar_t)-3.402823466e+38f;
  int best_index = -1;
  const scalar_t* plane = x + ((long long)(int)roi[0] * channels + c) * height * width;
  for (int h = hstart; h < hend; ++h) {
    for (int w = wstart; w < wend; ++w) {
      if (plane[h * width + w] > best) {
        best = plane[h * width + w];
        best_index = h * width + w;
      }
    }
  }
  out[index] = best;
  argmax[index] = best_index;
}

// One thread per element of grad_out (R, C, PH, PW): add it to grad_in at its argmax.
extern "C" __global__ void roi_pool_backward(
    const scalar_t* grad_out, const int* argmax, const scalar_t* rois, const int channels,
    const int height, const int width, const int pooled_size, const int total,
    scalar_t* grad_in) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total || argmax[index] < 0) return;
  const int c = (index / pooled_size) % channels;
  const int r = index / pooled_size / channels;
  const long long plane = ((long long)(int)rois[r * 5] * channels + c) * height * width;
  atomicAdd(grad_in + plane + argmax[index], grad_out[index]);
}
'''


def _compute_dtype(dtype):
    """float16 / bfloat16 are pooled in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class RoIPool2DFunction(torch.autograd.Function):
    """RoI max pooling as an autograd Function: forward saves the argmax, backward is ours."""

    @staticmethod
    def forward(ctx, x, rois, outh, outw, spatial_scale, use_cupy):
        """x: (N, C, H, W); rois: (R, 5) (batch index, x_min, y_min, x_max, y_max) in input
        pixels, in x's compute dtype; returns (R, C, outh, outw) in x's dtype."""
        dtype = _compute_dtype(x.dtype)
        x_c = x.to(dtype).contiguous()
        rois = rois.to(dtype).contiguous()
        n_roi, channels, height, width = rois.shape[0], *x.shape[1:]
        if use_cupy:
            out = x_c.new_empty((n_roi, channels, outh, outw))
            argmax = torch.empty(out.shape, dtype=torch.int32, device=x.device)
            if out.numel() > 0:
                kernel = _backend.compile_kernel(_ROI_POOL_SOURCE, 'roi_pool_forward', dtype)
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
            kernel = _backend.compile_kernel(_ROI_POOL_SOURCE, 'roi_pool_backward', rois.dtype)
            _backend.launch(kernel, (-(-grad.numel() // 256),), (256,), (
                grad, argmax, rois, channels, height, width, outh * outw, grad.numel(),
                grad_input))
        return grad_input.to(ctx.x_dtype), None, None, None, None, None


class RoIPooling2D(nn.Module):
    """Max-pools each RoI of a feature map to outh x outw.

    Args:
        outh, outw: pooled size (PH, PW), 7 x 7 in Faster R-CNN's VGG16 head.
        spatial_scale: feature map size / input size, 1/16 for VGG16 conv5_3.
        backend: 'auto' | 'cupy' | 'torchvision', see model.utils.backend.use_cupy.
    """

    def __init__(self, outh, outw, spatial_scale, backend='auto'):
        super().__init__()
        self.outh, self.outw, self.spatial_scale, self.backend = outh, outw, spatial_scale, backend

    def forward(self, x, rois):
        """x: (N, C, H, W) float; rois: (R, 5) (batch index, x_min, y_min, x_max, y_max) in
        input pixels. Returns (R, C, outh, outw) in x's dtype."""
        assert rois.dim() == 2 and rois.shape[1] == 5, f'rois must be (R, 5), got {rois.shape}'
        use_cupy = _backend.use_cupy(x, self.backend)
        return RoIPool2DFunction.apply(x, rois, self.outh, self.outw, self.spatial_scale,
                                       use_cupy)
