"""The RoI head: classify each proposal and refine its box, per class (Fast R-CNN).

Paper: Girshick 2015 (Fast R-CNN), sec. 2.1 (RoI max pooling) and sec. 2 (the two sibling
outputs); Ren et al. 2015 reuse it on the RPN's proposals (sec. 3).

Notation:
    N  images     C_feat  feature channels     R  RoIs over the batch
    C  classes with background at 0 (n_class)  D  features per RoI after the classifier
    roi_cls_locs  (R, C * 4) offsets of each RoI, one (dx, dy, dw, dh) per class, divided by
                  the loc std (see model.targets.ProposalTargetCreator)
    roi_scores    (R, C) class logits
"""
import torch
from torch import nn

from model.rpn import normal_init


class RoIHead(nn.Module):
    """Pools each RoI to a fixed grid and classifies it into C classes, with per-class boxes.

    Args:
        n_class: classes including background (class 0).
        pool: features (N, C_feat, H, W), rois (R, 5) -> (R, C_feat, S, S): model.ops.RoIPool
            (7 x 7, what VGG16's fc6 expects) or RoIAlign.
        classifier: (R, C_feat * S * S) -> (R, D), e.g. VGG16's fc6 and fc7.
        n_features: D.
    """

    def __init__(self, n_class, pool, classifier, n_features):
        super().__init__()
        self.n_class = n_class
        self.pool = pool
        self.classifier = classifier
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
        # Pool in float32 even under mixed precision: bf16 coordinates near 1000 px are off by 4.
        pooled = self.pool(features.float(), indices_and_rois.float())  # (R, C_feat, S, S)
        hidden = self.classifier(pooled.flatten(1))  # (R, D)
        return self.cls_loc(hidden), self.score(hidden)
