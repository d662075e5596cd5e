"""RoI max pooling (Fast R-CNN, Girshick 2015, sec. 2.1) with our own backward.

Notation: N images, C channels, H x W feature map, R RoIs, PH x PW pooled output.

Forward, by device (RoIPool.forward picks):
- CUDA: our CuPy kernel (roi_pool.cu) where CuPy works, else torchvision's roi_pool op.
- CPU with many channels (C >= CROPS_MIN_CHANNELS): pool_crops below, one vectorised
  adaptive max pooling per RoI; else torchvision's op.
Each returns the output and the argmax: for every output element the flat index h * W + w of
the maximum in its (H, W) plane, -1 for an empty bin. Backward is ours: each output gradient
goes to its argmax (a CuPy kernel with atomicAdd on CUDA, a torch index_add_ elsewhere).

The arithmetic is Caffe's, as in torchvision.ops.roi_pool: a RoI is rounded to feature cells
(round half away from zero of coordinate * spatial_scale), includes both end cells, is at
least 1 x 1, and is cut into PH x PW bins [floor(p * bin), ceil((p + 1) * bin)) clipped to the
map; the first strictly greater value in (h, w) scan order wins.
float16 / bfloat16 run in float32 and come back in the input's dtype (pool_crops takes them
as they are: a max is exact in any dtype).
"""
import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision.roi_pool)
from torch import nn
from torch.autograd.function import once_differentiable

from model.ops import backend as _backend

# torchvision's CPU kernel loops over one channel at a time; pool_crops spends ~30 us per RoI
# in Python and copies, then pools all channels at once. VGG16 at 600x800 (300 RoIs of a
# 38 x 50 x 512 map, 2-core AVX-512 CPU): 25 ms against 74 (float32), 17 against 84
# (bfloat16). With 64 channels (the toy backbone) torchvision's is faster, 3 ms against 6;
# the two cross between 128 and 256 channels.
CROPS_MIN_CHANNELS = 256


def round_half_away(v):
    """C's round(), which Caffe's cells use: half away from zero (torch.round: half to even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def roi_cells(rois, spatial_scale, outh, outw):
    """The feature cells of each RoI, and the RoIs whose bins torchvision does not cut exactly.

    rois: (R, 5) in input pixels, float32 or float64 (the precision of torchvision's bins).
    Returns start (R, 2) int64 first cell (x, y), size (R, 2) int64 cells (width, height) >= 1,
    and inexact (R,) bool: torchvision (as Caffe) computes the bin edges p * (size / P) in
    floating point, which for RoIs of 57 cells and more (float32) can put an edge one cell
    from the exact floor(p * size / P) or ceil((p + 1) * size / P).
    """
    corners = round_half_away(rois[:, 1:] * spatial_scale).long()  # (R, 4) cells x1 y1 x2 y2
    start, size = corners[:, :2], (corners[:, 2:] - corners[:, :2] + 1).clamp(min=1)
    inexact = torch.zeros(len(rois), dtype=torch.bool)
    for length, n_bin in ((size[:, :1], outw), (size[:, 1:], outh)):  # (R, 1) each
        p = torch.arange(n_bin)
        bin_size = length.to(rois.dtype) / n_bin
        inexact |= ((p * bin_size).floor() != p * length // n_bin).any(1)
        inexact |= (((p + 1) * bin_size).ceil() != -(-(p + 1) * length // n_bin)).any(1)
    return start, size, inexact


def pool_crops(x, rois, spatial_scale, outh, outw, with_argmax):
    """RoI max pooling as one adaptive max pooling per RoI crop, for the CPU.

    Adaptive max pooling of an h-cell crop to P bins uses the bins [floor(p * h / P),
    ceil((p + 1) * h / P)): Caffe's. The map is padded with -inf where crops leave it (bins
    wholly there become 0) and pooled channels-last, where torch's kernel is vectorised over
    the channels. RoIs whose bins torchvision cuts inexactly (roi_cells), or that reach more
    than a map's size outside it, are handed to torchvision's op: the result is always its.

    x: (N, C, H, W) float with finite values, any layout; rois: (R, 5) float32 or float64.
    Returns out (R, C, PH, PW) in x's dtype and, with with_argmax, argmax (R, C, PH, PW) int32.
    """
    n, channels, height, width = x.shape
    start, size, handoff = roi_cells(rois, spatial_scale, outh, outw)  # (R, 2) x, y each
    map_size = torch.tensor([width, height])
    handoff |= ((start < -map_size) | (start + size > 2 * map_size)).any(1)
    out = x.new_empty((len(rois), outh, outw, channels))  # (R, PH, PW, C): channels-last
    local = torch.empty(out.shape, dtype=torch.int64) if with_argmax else None
    mine = (~handoff).nonzero().flatten().tolist()
    if mine:
        pad = (-start[mine].amin(0)).clamp(min=0)  # (2,) cells left and above the map
        padded_w, padded_h = ((start + size)[mine].amax(0).maximum(map_size) + pad).tolist()
        padded = x.new_full((n, padded_h, padded_w, channels), float('-inf'))
        padded = padded.permute(0, 3, 1, 2)  # (N, C, H', W') channels-last
        left, top = pad.tolist()
        padded[:, :, top:top + height, left:left + width] = x
        crops = torch.cat([rois[:, :1].long(), start + pad, size], dim=1).tolist()  # (R, 5)
        for r in mine:
            image, x0, y0, crop_w, crop_h = crops[r]
            crop = padded[image:image + 1, :, y0:y0 + crop_h, x0:x0 + crop_w]  # (1, C, h, w)
            pooled = F.adaptive_max_pool2d(crop, (outh, outw), return_indices=with_argmax)
            if with_argmax:
                pooled, index = pooled  # index: i * crop_w + j in the crop
                local[r] = index[0].permute(1, 2, 0)  # (PH, PW, C)
            out[r] = pooled[0].permute(1, 2, 0)  # (PH, PW, C)
    argmax = None
    if with_argmax:  # crop index i * crop_w + j -> map index (y0 + i) * W + x0 + j
        local = local.int()
        x0, y0, crop_w = (v.view(-1, 1, 1, 1).int() for v in (*start.T, size[:, 0]))
        argmax = local + y0 * width + x0 + local // crop_w * (width - crop_w)
    # bins wholly outside the map (-inf): 0 and argmax -1, as torchvision's empty bins
    edge = ((start < 0) | (start + size > map_size)).any(1).nonzero().flatten()
    empty = out[edge] == float('-inf')
    out[edge] = out[edge].masked_fill(empty, 0)
    if with_argmax:
        argmax[edge] = argmax[edge].masked_fill(empty, -1)
        argmax = argmax.permute(0, 3, 1, 2)  # (R, C, PH, PW)
    out = out.permute(0, 3, 1, 2)  # (R, C, PH, PW)
    if handoff.any():
        theirs = torch.ops.torchvision.roi_pool(x.to(rois.dtype).contiguous(), rois[handoff],
                                                spatial_scale, outh, outw)
        out[handoff] = theirs[0].to(x.dtype)
        if with_argmax:
            argmax[handoff] = theirs[1]
    return out.contiguous(), None if argmax is None else argmax.contiguous()


class RoIPool2DFunction(torch.autograd.Function):
    """RoI max pooling as an autograd Function: forward saves the argmax, backward is ours."""

    @staticmethod
    def forward(ctx, x, rois, outh, outw, spatial_scale, impl):
        """x: (N, C, H, W); rois: (R, 5) (batch index, x_min, y_min, x_max, y_max) in input
        pixels; impl: 'cupy', 'crops' (pool_crops) or 'torchvision'. Returns (R, C, outh,
        outw) in x's dtype."""
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        rois = rois.to(dtype).contiguous()
        n_roi, channels, height, width = rois.shape[0], *x.shape[1:]
        if impl == 'crops':  # in x's own dtype and layout
            out, argmax = pool_crops(x, rois, spatial_scale, outh, outw, ctx.needs_input_grad[0])
        elif impl == 'cupy':
            x_c = x.to(dtype).contiguous()
            out = x_c.new_empty((n_roi, channels, outh, outw))
            argmax = torch.empty(out.shape, dtype=torch.int32, device=x.device)
            if out.numel() > 0:
                kernel = _backend.compile_kernel('roi_pool.cu', 'roi_pool_forward', dtype)
                _backend.launch(kernel, (-(-out.numel() // 256),), (256,), (
                    x_c, rois, float(spatial_scale), channels, height, width, outh, outw,
                    out.numel(), out, argmax))
        else:
            out, argmax = torch.ops.torchvision.roi_pool(x.to(dtype).contiguous(), rois,
                                                         spatial_scale, outh, outw)
        ctx.save_for_backward(rois, argmax)
        ctx.x_shape, ctx.x_dtype, ctx.use_cupy = x.shape, x.dtype, impl == 'cupy'
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
        backend: 'auto' | 'cupy' | 'torchvision', see model.ops.backend.use_cupy; on the
            CPU, 'auto' takes pool_crops for C >= CROPS_MIN_CHANNELS.
    """

    def __init__(self, outh, outw, spatial_scale, backend='auto'):
        super().__init__()
        self.outh, self.outw, self.spatial_scale, self.backend = outh, outw, spatial_scale, backend

    def forward(self, x, rois):
        """x: (N, C, H, W) float; rois: (R, 5) (batch index, x_min, y_min, x_max, y_max) in
        input pixels. Returns (R, C, outh, outw) in x's dtype."""
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f'rois must be (R, 5), got {tuple(rois.shape)}')
        if _backend.use_cupy(x, self.backend):
            impl = 'cupy'
        elif (x.device.type == 'cpu' and self.backend == 'auto'
              and x.shape[1] >= CROPS_MIN_CHANNELS):
            impl = 'crops'
        else:
            impl = 'torchvision'
        return RoIPool2DFunction.apply(x, rois, self.outh, self.outw, self.spatial_scale, impl)
