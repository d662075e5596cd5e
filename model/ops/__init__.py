"""The ops Faster R-CNN needs beyond convolutions: NMS, RoI pooling and RoIAlign; and conv.py,
how convolutions run fastest on each device (layout, Winograd on x86 CPUs).

Each runs our CUDA kernel through CuPy on a CUDA tensor where CuPy works (nms.cu,
roi_pool.cu, roi_align.cu), and torchvision.ops otherwise; backend.py is the one place that
chooses. A reader of the detector can treat them as black boxes with the semantics in their
docstrings.
"""
from model.ops.backend import BACKENDS
from model.ops.nms import batched_non_maximum_suppression, non_maximum_suppression
from model.ops.roi_align import RoIAlign
from model.ops.roi_pool import RoIPool

__all__ = ['BACKENDS', 'RoIAlign', 'RoIPool', 'batched_non_maximum_suppression',
           'non_maximum_suppression']
