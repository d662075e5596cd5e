"""The ops Faster R-CNN needs beyond convolutions: NMS, RoI pooling and RoIAlign.

Each runs our CUDA kernel through CuPy on a CUDA tensor where CuPy works (nms.cu,
roi_pool.cu, roi_align.cu), and torchvision.ops otherwise; backend.py is the one place that
chooses. A reader of the detector can treat them as black boxes with the semantics in their
docstrings. speed.py, beside them and out of the detector's way, is the switch a runner
applies to a built model to run it fastest on its machine.
"""
from model.ops.backend import BACKENDS
from model.ops.nms import batched_non_maximum_suppression, non_maximum_suppression
from model.ops.roi_align import RoIAlign
from model.ops.roi_pool import RoIPool

__all__ = ['BACKENDS', 'RoIAlign', 'RoIPool', 'batched_non_maximum_suppression',
           'non_maximum_suppression']
