"""The RoI head: classify each proposal and refine its box, per class (Fast R-CNN).

Paper: Girshick 2015 (Fast R-CNN), sec. 2.1 (RoI max pooling) and sec. 2 (the two sibling
outputs); Ren et al. 2015 reuse it on the RPN's proposals (sec. 3). With a feature pyramid,
PyramidRoIAlign (at the end) is the pooling: features are then a list of maps.

Notation:
    N  images     C_feat  feature channels     R  RoIs over the batch
    C  classes with background at 0 (n_class)  D  features per RoI after the classifier
    roi_cls_locs  (R, C * 4) offsets of each RoI, one (dx, dy, dw, dh) per class, divided by
                  the loc std (see model.targets.ProposalTargetCreator)
    roi_scores    (R, C) class logits
"""
import math

import torch
from torch import nn

from model.ops import RoIAlign
from model.rpn import normal_init


class RoIHead(nn.Module):
    """Pools each RoI to a fixed grid and classifies it into C classes, with per-class boxes.

    Args:
        n_class: classes including background (class 0).
        pool: features (N, C_feat, H, W), rois (R, 5) -> (R, C_feat, S, S): model.ops.RoIPool
            (7 x 7, what VGG16's fc6 expects), RoIAlign, or PyramidRoIAlign (features a list).
        classifier: (R, C_feat * S * S) -> (R, D), e.g. VGG16's fc6 and fc7.
        n_features: D.
    """

    def __init__(self, n_class, pool, classifier, n_features):
        super().__init__()
        self.n_class, self.pool, self.classifier = n_class, pool, classifier
        self.cls_loc = nn.Linear(n_features, n_class * 4)
        self.score = nn.Linear(n_features, n_class)
        # The Caffe model's initialisation: the box regressor starts 10x smaller than the
        # classifier, so the first boxes are the RoIs themselves.
        normal_init(self.cls_loc, 0.001)
        normal_init(self.score, 0.01)

    def forward(self, features, rois, roi_indices):
        """features (N, C_feat, H, W); rois (R, 4) in input pixels; roi_indices (R,) image of
        each RoI. Returns roi_cls_locs (R, C * 4) and roi_scores (R, C)."""
        indices_and_rois = torch.cat([roi_indices[:, None].to(rois.dtype), rois], dim=1)  # (R, 5)
        # RoI coordinates in float32 even under mixed precision (bf16 ones near 1000 px are
        # off by 4); the pooled features come back in the features' dtype.
        pooled = self.pool(features, indices_and_rois.float())  # (R, C_feat, S, S)
        hidden = self.classifier(pooled.flatten(1))  # (R, D)
        return self.cls_loc(hidden), self.score(hidden)


class PyramidRoIAlign(nn.Module):
    """RoIAlign from a feature pyramid: each RoI is pooled from the one level that suits its
    size (Lin et al. 2017, eq. 1): a w x h RoI goes to P_k with
    k = floor(k0 + log2(sqrt(w * h) / 224)), k0 = 4 (a 224 x 224 RoI, ImageNet's size, is
    pooled from P4 as a C4 model pools it), clamped to the levels there are.

    Args:
        output_size: PH = PW (7).
        strides: input pixels per cell of the levels RoIs are pooled from, (4, 8, 16, 32) for
            P2..P5 (P6 serves the RPN only).
        sampling_ratio, aligned, backend: RoIAlign's, for every level. torchvision's FPN model
            samples 2 x 2 points per bin, not aligned.
    """

    def __init__(self, output_size, strides, sampling_ratio=2, aligned=False, backend='auto'):
        super().__init__()
        self.levels = [round(math.log2(s)) for s in strides]  # k of each feature map
        self.aligns = nn.ModuleList(RoIAlign(output_size, 1 / s, sampling_ratio, aligned, backend)
                                    for s in strides)
        self.output_size = self.aligns[0].output_size

    def forward(self, features, rois):
        """features: a list of at least len(strides) maps (N, C, H_l, W_l); rois: (R, 5)
        (batch index, corners in input pixels). Returns (R, C, PH, PW) float32."""
        width, height = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
        k = torch.floor(4 + torch.log2((width * height).sqrt() / 224) + 1e-6)  # eq. 1; eps as
        k = k.clamp(self.levels[0], self.levels[-1])  # torchvision's, for exact powers of two
        pooled = rois.new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for feature, level, align in zip(features, self.levels, self.aligns):
            mine = (k == level).nonzero()[:, 0]
            pooled[mine] = align(feature, rois[mine]).float()
        return pooled
