"""Target creators: which anchors and RoIs train which loss, and the RPN's proposals.

Notation: K anchors, R boxes (ground truth or proposals), G ground-truth boxes, S sampled RoIs.
Boxes are (x_min, y_min, x_max, y_max) float in input pixels; image sizes are (H, W).

Everything stays on the inputs' device. Sampling draws from `generator`: None uses torch's
global RNG for that device, otherwise pass a torch.Generator on the same device as the boxes
(a generator lives on one device). Sampling masks are built without host round trips; the
only syncs are where an output's length depends on the data (see each __call__).
"""

import torch

from model.utils.bbox_tools import bbox2loc, bbox_iou, clip_bbox, loc2bbox
from model.utils.nms import non_maximum_suppression


def _random_subset(mask, quota, generator):
    """A uniform random subset of at most `quota` of the True entries of `mask`.

    mask: (K,) bool; quota: int or 0-d int tensor on mask's device (no host sync either way).
    Returns a (K,) bool mask. Each candidate gets a random key, non-candidates rank last, and the
    candidates with the `quota` smallest keys are kept.
    """
    key = torch.rand(mask.shape, generator=generator, device=mask.device)  # (K,)
    rank = key.masked_fill(~mask, 2.0).argsort().argsort()  # (K,) rank of each key, 0 = smallest
    return mask & (rank < quota)


class AnchorTargetCreator:
    """RPN training targets: label and regression target for every anchor (paper sec. 3.1.2).

    Anchors not fully inside the image are ignored. Among the rest, an anchor is positive if its
    IoU with some gt box is >= pos_iou_thresh or it is (one of) a gt box's best-overlapping
    anchors (so every gt that overlaps an inside anchor gets one), and negative if its best IoU
    is < neg_iou_thresh. Then at most n_sample * pos_ratio positives are kept at random and
    negatives fill n_sample; the rest are ignored.
    """

    def __init__(self, n_sample=256, pos_iou_thresh=0.7, neg_iou_thresh=0.3, pos_ratio=0.5):
        self.n_sample = n_sample
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh = neg_iou_thresh
        self.pos_ratio = pos_ratio

    def __call__(self, bbox, anchor, img_size, generator=None):
        """Assign targets to anchors. No host sync.

        Args:
            bbox: (R, 4) float32 gt boxes in input pixels; R == 0 is valid (negatives only).
            anchor: (K, 4) float32 anchors in input pixels.
            img_size: (H, W) of the input image.
            generator: optional torch.Generator on anchor's device, for the sampling.

        Returns:
            loc: (K, 4) bbox2loc(anchor, its best-IoU gt box); zeros outside the image or
                when R == 0.
            label: (K,) int64, 1 positive, 0 negative, -1 ignore.
        """
        img_h, img_w = img_size
        inside = ((anchor[:, 0] >= 0) & (anchor[:, 1] >= 0)
                  & (anchor[:, 2] <= img_w) & (anchor[:, 3] <= img_h))  # (K,)
        if len(bbox):
            # Outside anchors get IoU 0: they are never anyone's best match.
            iou = bbox_iou(anchor, bbox).masked_fill(~inside[:, None], 0)  # (K, R)
            max_iou, argmax_iou = iou.max(dim=1)  # (K,)
            gt_max_iou = iou.max(dim=0).values  # (R,)
            # All anchors tied at a gt's best IoU; a gt overlapping nothing has no best anchor.
            gt_best = ((iou == gt_max_iou) & (gt_max_iou > 0)).any(dim=1)  # (K,)
            loc = bbox2loc(anchor, bbox[argmax_iou])  # (K, 4)
            loc = torch.where(inside[:, None], loc, 0)
        else:
            max_iou = anchor.new_zeros(len(anchor))
            gt_best = torch.zeros_like(inside)
            loc = anchor.new_zeros(anchor.shape)

        pos = inside & ((max_iou >= self.pos_iou_thresh) | gt_best)
        neg = inside & (max_iou < self.neg_iou_thresh) & ~pos  # a gt's best anchor stays positive
        # Positives over the quota are ignored, not turned negative.
        pos = _random_subset(pos, int(self.n_sample * self.pos_ratio), generator)
        neg = _random_subset(neg, self.n_sample - pos.sum(), generator)
        label = torch.full((len(anchor),), -1, dtype=torch.int64, device=anchor.device)
        label = torch.where(neg, 0, torch.where(pos, 1, label))
        return loc, label


class ProposalTargetCreator:
    """RoI head training targets: sample RoIs and give each a class and a box target.

    The gt boxes join the candidate RoIs (so early in training the head still sees positives).
    Candidates with IoU >= pos_iou_thresh to a gt box are positives, at most
    round(n_sample * pos_ratio) of them, picked at random; candidates with best IoU in
    [neg_iou_thresh_lo, neg_iou_thresh_hi) are negatives, filling n_sample (all of them if there
    are fewer, so S may be < n_sample).
    """

    def __init__(self, n_sample=128, pos_ratio=0.25, pos_iou_thresh=0.5, neg_iou_thresh_hi=0.5,
                 neg_iou_thresh_lo=0.0, loc_normalize_std=(0.1, 0.1, 0.2, 0.2)):
        self.n_sample = n_sample
        self.pos_ratio = pos_ratio
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh_hi = neg_iou_thresh_hi
        self.neg_iou_thresh_lo = neg_iou_thresh_lo
        self.loc_normalize_std = loc_normalize_std

    def __call__(self, roi, bbox, label, generator=None):
        """Sample S RoIs. One host sync: S depends on the data.

        Args:
            roi: (R, 4) float proposals in input pixels.
            bbox: (G, 4) gt boxes; G == 0 is valid (negatives only).
            label: (G,) int64 gt classes, 0..n_fg-1.
            generator: optional torch.Generator on roi's device, for the sampling.

        Returns:
            sample_roi: (S, 4) roi's dtype, positives first, then negatives.
            gt_roi_loc: (S, 4) bbox2loc(sample_roi, matched gt) / loc_normalize_std (mean 0);
                zeros for negatives.
            gt_roi_label: (S,) int64, 0 background, gt class k -> k + 1.
        """
        bbox = bbox.to(roi.dtype)
        roi = torch.cat([roi, bbox])  # (R + G, 4)
        if len(bbox):
            max_iou, argmax_iou = bbox_iou(roi, bbox).max(dim=1)  # (R + G,)
            matched_bbox, matched_label = bbox[argmax_iou], label[argmax_iou] + 1
        else:  # no objects: every candidate is background; loc targets come out zero
            max_iou = roi.new_zeros(len(roi))
            matched_bbox, matched_label = roi, label.new_zeros(len(roi))

        pos = max_iou >= self.pos_iou_thresh
        pos = _random_subset(pos, round(self.n_sample * self.pos_ratio), generator)
        neg = (max_iou < self.neg_iou_thresh_hi) & (max_iou >= self.neg_iou_thresh_lo)
        neg = _random_subset(neg, self.n_sample - pos.sum(), generator)
        keep = (pos | neg).nonzero()[:, 0]  # (S,) the host sync
        keep = keep[neg[keep].argsort(stable=True)]  # (S,) positives first

        sample_roi, is_pos = roi[keep], pos[keep]
        loc = bbox2loc(sample_roi, matched_bbox[keep]).unbind(dim=1)  # 4 x (S,)
        # Divide column by column by Python floats: a std tensor would need a host-to-device copy.
        std = self.loc_normalize_std
        gt_roi_loc = torch.stack([c / s for c, s in zip(loc, std, strict=True)], dim=1)  # (S, 4)
        gt_roi_loc = torch.where(is_pos[:, None], gt_roi_loc, 0)
        gt_roi_label = torch.where(is_pos, matched_label[keep], 0)  # (S,)
        return sample_roi, gt_roi_loc, gt_roi_label


class ProposalCreator:
    """RPN proposals: decode anchors by the predicted loc, clip, filter small boxes, NMS.

    No gradient flows through the proposals (the paper's approximate joint training).
    """

    def __init__(self, nms_thresh=0.7, n_train_pre_nms=12000, n_train_post_nms=2000,
                 n_test_pre_nms=6000, n_test_post_nms=300, min_size=16, backend='auto'):
        self.nms_thresh = nms_thresh
        self.n_train_pre_nms = n_train_pre_nms
        self.n_train_post_nms = n_train_post_nms
        self.n_test_pre_nms = n_test_pre_nms
        self.n_test_post_nms = n_test_post_nms
        self.min_size = min_size
        self.backend = backend

    def __call__(self, loc, score, anchor, img_size, scale=1.0, training=False):
        """Proposals for one image. Host syncs: the min-size filter and NMS (data-dependent R).

        Args:
            loc: (K, 4) predicted offsets for each anchor.
            score: (K,) objectness, the foreground probability of each anchor.
            anchor: (K, 4) anchors in input pixels.
            img_size: (H, W) of the (resized) input image.
            scale: the image's resize factor; boxes under min_size * scale px are dropped.
            training: picks the n_train_* counts, else n_test_*.

        Returns:
            roi: (R, 4) anchor's dtype, inside [0, W] x [0, H], highest score first,
                R <= n_*_post_nms.
        """
        if training:
            n_pre_nms, n_post_nms = self.n_train_pre_nms, self.n_train_post_nms
        else:
            n_pre_nms, n_post_nms = self.n_test_pre_nms, self.n_test_post_nms
        roi = clip_bbox(loc2bbox(anchor, loc.detach()), img_size)  # (K, 4)

        min_size = self.min_size * scale
        keep = ((roi[:, 2] - roi[:, 0] >= min_size)
                & (roi[:, 3] - roi[:, 1] >= min_size)).nonzero()[:, 0]  # (K',) host sync
        roi, score = roi[keep], score.detach()[keep]
        score, order = score.topk(min(n_pre_nms, len(score)))  # sorted, highest first
        roi = roi[order]  # (min(K', n_pre_nms), 4)
        keep = non_maximum_suppression(roi, self.nms_thresh, score=score, limit=n_post_nms,
                                       backend=self.backend)
        return roi[keep]
