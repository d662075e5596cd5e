"""Non-maximum suppression: our CuPy kernels on CUDA, torchvision.ops.nms otherwise.

A box is suppressed when its IoU with a kept box of higher priority is > thresh, with
continuous coordinates (w = x_max - x_min, no +1): exactly torchvision.ops.nms.

The CuPy path is the bitmask scheme of the original Faster R-CNN port, with one change: that
port copied the (R, ceil(R / 64)) mask to the host and reduced it there in a loop (optionally
in Cython); here a second kernel reduces it on the device (see nms.cu), so there is no
host round trip but the final count of kept boxes. The CUDA kernels are compiled without FMA
contraction, so they return exactly torchvision's CPU result for boxes in the same order.
"""
import torch
import torchvision

from model.ops import backend as _backend

# One block keeps the `removed` bitset (8 bytes per 64 boxes) in 48 KiB of shared memory.
_MAX_CUPY_BOXES = 48 * 1024 // 8 * 64


def non_maximum_suppression(bbox, thresh, score=None, limit=None, backend='auto'):
    """Indices of the boxes that survive NMS, highest priority first.

    Args:
        bbox: (R, 4) float, x_min y_min x_max y_max. float16 / bfloat16 run in float32.
        thresh: a box is dropped if its IoU with a kept higher-priority box is > thresh.
        score: (R,) float or None. Priority is by descending score; None: the given order.
        limit: keep at most this many (the first `limit` of the full result), None: all.
        backend: 'auto' | 'cupy' | 'torchvision', see model.ops.backend.use_cupy.

    Returns:
        (K,) int64 indices into bbox, on bbox's device.
    """
    use_cupy = _backend.use_cupy(bbox, backend)
    bbox = bbox if bbox.dtype == torch.float64 else bbox.float()  # float16 / bfloat16: float32
    if score is None:  # decreasing scores give the given order as priority
        score = torch.arange(len(bbox), 0, -1, dtype=bbox.dtype, device=bbox.device)
    if use_cupy and len(bbox) > 0:  # no boxes: torchvision's empty result, no kernel launch
        return _nms_cupy(bbox, thresh, score, len(bbox) if limit is None else min(limit, len(bbox)))
    return torchvision.ops.nms(bbox, score.to(bbox.dtype), thresh)[:limit]


def _nms_cupy(bbox, thresh, score, limit):
    """non_maximum_suppression with our kernels; bbox (R, 4) float32/64 CUDA, R > 0; score (R,)."""
    n_bbox = bbox.shape[0]
    if n_bbox > _MAX_CUPY_BOXES:
        raise ValueError(f"backend='cupy' NMS takes at most {_MAX_CUPY_BOXES} boxes, got "
                         f"{n_bbox}; use backend='torchvision'")
    # stable: equal scores keep their given order
    order = torch.sort(score, descending=True, stable=True).indices  # (R,)
    sorted_bbox = bbox[order].contiguous()  # (R, 4), highest priority first
    col_blocks = (n_bbox + 63) // 64
    mask = torch.empty(n_bbox * col_blocks, dtype=torch.int64, device=bbox.device)
    keep = torch.zeros(n_bbox, dtype=torch.uint8, device=bbox.device)
    _backend.launch(_backend.compile_kernel('nms.cu', 'nms_mask', bbox.dtype),
                    (col_blocks, col_blocks), (64,), (sorted_bbox, n_bbox, float(thresh), mask))
    _backend.launch(_backend.compile_kernel('nms.cu', 'nms_reduce', bbox.dtype), (1,), (256,),
                    (mask, n_bbox, limit, keep), shared_mem=col_blocks * 8)
    return order[keep.bool()]


def batched_non_maximum_suppression(bbox, score, idxs, thresh, backend='auto'):
    """NMS independently within each group of boxes that share an idxs value, in one call.

    torchvision.ops.batched_nms does it without CuPy. For our kernel, each group is shifted by
    idxs * (coordinate span + 1), so that boxes of different groups never overlap, and one NMS
    runs on all of them.

    Args:
        bbox: (R, 4) float, x_min y_min x_max y_max.
        score: (R,) float.
        idxs: (R,) int64 group of each box, e.g. its class.
        thresh, backend: as in non_maximum_suppression.

    Returns:
        (K,) int64 indices into bbox, by descending score over all groups.
    """
    bbox = bbox if bbox.dtype == torch.float64 else bbox.float()
    if not _backend.use_cupy(bbox, backend) or bbox.shape[0] == 0:
        # torchvision offsets the groups by max coordinate + 1, which keeps them apart only
        # for coordinates >= 0 (as clipped boxes are): move others there first.
        low = bbox.min() if bbox.shape[0] else 0
        bbox = bbox - low if low < 0 else bbox
        return torchvision.ops.batched_nms(bbox, score.to(bbox.dtype), idxs, thresh)
    span = bbox.max() - bbox.min() + 1
    shifted = bbox + (idxs.to(bbox.dtype) * span)[:, None]  # (R, 4)
    return non_maximum_suppression(shifted, thresh, score, backend=backend)
