"""Anchors and the box encoding: where Faster R-CNN looks, and how it says "move this box".

Paper: Ren et al. 2015, sec. 3.1 ("Anchors") and eq. 2 (the parameterisation of boxes).

Notation:
    A  anchors per feature-map location (len(ratios) * len(anchor_scales), 9 by default)
    H, W  feature-map height and width; K = H * W * A anchors in all
    R  boxes; a box is (x_min, y_min, x_max, y_max) float in continuous input pixels, its
       width x_max - x_min and its centre x_min + width / 2 (no +1 anywhere)
    loc  (dx, dy, dw, dh): a box relative to a reference box (anchor or RoI), eq. 2

IoU and clipping are torchvision.ops.box_iou and clip_boxes_to_image. Every function here is
pure and keeps its inputs' device; outputs take the inputs' dtype.
"""

import math

import torch

# exp(dw) is capped at 1000 / 16: a box may grow from a 16 px anchor to at most 1000 px, so a
# wild regression early in training cannot overflow to inf (detectron's bbox_xform_clip).
LOC_CLAMP = math.log(1000.0 / 16)


def generate_anchor_base(base_size=16, ratios=(0.5, 1, 2), anchor_scales=(8, 16, 32)):
    """The A = len(ratios) * len(anchor_scales) anchors of one feature-map location.

    An anchor of ratio r = h / w and scale s has area (base_size * s) ** 2:
    h = base_size * s * sqrt(r), w = base_size * s / sqrt(r), centred on
    (base_size / 2, base_size / 2). Order: for ratio in ratios: for scale in anchor_scales.

    Returns:
        (A, 4) float32 on the CPU, x_min y_min x_max y_max relative to the location's corner.
    """
    ratio = torch.tensor(ratios, dtype=torch.float64)[:, None]  # (n_ratios, 1)
    scale = torch.tensor(anchor_scales, dtype=torch.float64)[None, :]  # (1, n_scales)
    h = (base_size * scale * ratio.sqrt()).reshape(-1)  # (A,), ratio-major
    w = (base_size * scale / ratio.sqrt()).reshape(-1)  # (A,)
    ctr = base_size / 2.0
    anchor = torch.stack([ctr - w / 2, ctr - h / 2, ctr + w / 2, ctr + h / 2], dim=1)  # (A, 4)
    return anchor.float()


def enumerate_shifted_anchors(anchor_base, feat_stride, height, width):
    """Tile the base anchors over a height x width feature map with stride feat_stride.

    Args:
        anchor_base: (A, 4) from generate_anchor_base.
        feat_stride: input pixels per feature-map cell (16 for VGG16 conv5_3).
        height, width: feature-map size.

    Returns:
        (height * width * A, 4) in input pixels, ordered by location (y, then x), then anchor:
        the order of a conv output (N, A * 4, H, W).permute(0, 2, 3, 1).reshape(N, -1, 4).
    """
    device, dtype = anchor_base.device, anchor_base.dtype
    shift_y = torch.arange(height, device=device, dtype=dtype) * feat_stride  # (H,)
    shift_x = torch.arange(width, device=device, dtype=dtype) * feat_stride  # (W,)
    shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing='ij')  # (H, W) each
    shift = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1)  # (H, W, 4)
    return (shift[:, :, None] + anchor_base).reshape(-1, 4)  # (H, W, A, 4) -> (H*W*A, 4)


def _centre_size(bbox):
    """(R, 4) corners -> centres (R, 2) x, y and sizes (R, 2) width, height."""
    size = bbox[:, 2:] - bbox[:, :2]  # (R, 2)
    return bbox[:, :2] + 0.5 * size, size


def bbox2loc(src_bbox, dst_bbox):
    """Encode dst_bbox relative to src_bbox, as in the Faster R-CNN paper (eq. 2).

    dx = (ctr_x_dst - ctr_x_src) / w_src, dy likewise with heights,
    dw = log(w_dst / w_src), dh = log(h_dst / h_src).

    Args:
        src_bbox, dst_bbox: (R, 4) boxes, row i of one paired with row i of the other.

    Returns:
        (R, 4) loc = (dx, dy, dw, dh). Widths and heights are floored at the dtype's eps, so a
        degenerate box gives a large but finite loc instead of inf or NaN.
    """
    eps = torch.finfo(src_bbox.dtype).eps
    src_ctr, src_size = _centre_size(src_bbox)  # (R, 2) each: (x, y) and (w, h)
    dst_ctr, dst_size = _centre_size(dst_bbox)
    src_size, dst_size = src_size.clamp(min=eps), dst_size.clamp(min=eps)
    # (dx, dy) and (dw, dh), each (R, 2)
    return torch.cat([(dst_ctr - src_ctr) / src_size, (dst_size / src_size).log()], dim=1)


def loc2bbox(src_bbox, loc):
    """Decode loc (dx, dy, dw, dh) relative to src_bbox: the inverse of bbox2loc.

    Args:
        src_bbox: (R, 4) boxes.
        loc: (R, 4) offsets; dw and dh are clamped at LOC_CLAMP = log(1000 / 16).

    Returns:
        (R, 4) decoded boxes.
    """
    src_ctr, src_size = _centre_size(src_bbox)  # (R, 2) each: (x, y) and (w, h)
    ctr = src_ctr + loc[:, :2] * src_size  # (R, 2)
    size = src_size * loc[:, 2:].clamp(max=LOC_CLAMP).exp()  # (R, 2)
    return torch.cat([ctr - 0.5 * size, ctr + 0.5 * size], dim=1)
