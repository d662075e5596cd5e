"""The four losses of Faster R-CNN: classification and box regression, for the RPN and the head.

Paper: Ren et al. 2015, eq. 1, and Girshick 2015 (Fast R-CNN), eq. 3 (smooth L1).

    L = 1/N_cls sum_i L_cls(p_i, p_i*) + lambda 1/N_reg sum_i p_i* L_reg(t_i, t_i*)

The paper normalises the RPN's regression by the number of anchor locations (N_reg ~ 2400)
with lambda = 10. Like the released Caffe code, we divide both terms by the number of sampled
anchors (N_cls = 256) and take lambda = 1: the same weighting, since 2400 / 256 ~ 10. The head
does the same with its sampled RoIs (128).

Notation: K anchors (N * K over a batch), S sampled RoIs, C classes with background at 0.
Labels: 1 / class k + 1 positive, 0 negative (background), -1 ignored (RPN only).
"""
import torch
from torch.nn import functional as F


def smooth_l1_loss(pred, target, label, sigma):
    """Smooth L1 (Fast R-CNN eq. 3) on positive samples (label > 0), summed and divided by the
    number of non-ignored samples (label >= 0), as in the Caffe code.

    pred, target: (S, 4); label: (S,). sigma moves the switch from quadratic to linear to
    |x| = 1 / sigma**2: sigma 3 for the RPN, whose targets are small offsets from nearby
    anchors, sigma 1 (Fast R-CNN's loss) for the head.
    """
    sigma2 = sigma ** 2
    diff = (pred.float() - target) * (label > 0)[:, None]
    abs_diff = diff.abs()
    # quadratic below |x| = 1 / sigma**2, linear above
    loss = torch.where(abs_diff < 1 / sigma2, 0.5 * sigma2 * diff ** 2, abs_diff - 0.5 / sigma2)
    return loss.sum() / (label >= 0).sum().clamp(min=1)


def rpn_losses(rpn_locs, rpn_scores, gt_locs, gt_labels, sigma=3.0):
    """rpn_locs (N*K, 4), rpn_scores (N*K, 2), gt_locs (N*K, 4), gt_labels (N*K,) in {-1, 0, 1}.
    Returns the regression and the objectness (two-class cross entropy) loss."""
    return (smooth_l1_loss(rpn_locs, gt_locs, gt_labels, sigma),
            F.cross_entropy(rpn_scores.float(), gt_labels, ignore_index=-1))


def roi_losses(roi_cls_locs, roi_scores, gt_locs, gt_labels, sigma=1.0):
    """roi_cls_locs (S, C * 4), roi_scores (S, C), gt_locs (S, 4), gt_labels (S,) in 0..C-1.
    The box loss takes each RoI's offsets for its gt class only. Returns the regression and the
    classification loss."""
    n_sample = len(gt_labels)
    roi_locs = roi_cls_locs.view(n_sample, -1, 4)[torch.arange(n_sample), gt_labels]  # (S, 4)
    return (smooth_l1_loss(roi_locs, gt_locs, gt_labels, sigma),
            F.cross_entropy(roi_scores.float(), gt_labels))
