"""Training targets: which anchors and RoIs train which loss, and towards what.

Paper: Ren et al. 2015, sec. 3.1.2 (anchor labels) and 3.1.3 (the 256-anchor minibatch) for
the RPN; Girshick 2015 (Fast R-CNN), sec. 2.3 ("Mini-batch sampling") for the RoI head.

Both target creators take the same three steps, with the functions below:
    match   each candidate box (anchor or RoI) to the gt box it overlaps most (its IoU);
    sample  a fixed-size minibatch: at most a quota of positives, negatives fill the rest;
    encode  each positive's gt box relative to the candidate (eq. 2), zero for the others.

Notation: K candidates (anchors or RoIs), G ground-truth boxes, S sampled RoIs. Boxes are
(x_min, y_min, x_max, y_max) float in input pixels; image sizes are (H, W).

Everything stays on the inputs' device. Sampling draws from `generator`: None uses torch's
global RNG, otherwise a torch.Generator on the boxes' device. There is no host round trip but
where an output's length depends on the data (the RoI minibatch).
"""
import torch
from torchvision.ops import box_iou

from model.boxes import bbox2loc


def match(iou, candidate, gt_bbox):
    """Each candidate's best IoU with a gt box and that gt box.

    iou: (K, G); candidate: (K, 4); gt_bbox: (G, 4). Returns max_iou (K,) and the matched gt
    index (K,) and box (K, 4). Without gt boxes (G == 0), every IoU is 0 and each candidate is
    matched to itself, which encodes to a zero loc.
    """
    if not len(gt_bbox):
        return iou.new_zeros(len(candidate)), None, candidate
    max_iou, gt_index = iou.max(dim=1)  # (K,)
    return max_iou, gt_index, gt_bbox[gt_index]


def random_subset(mask, quota, generator):
    """A uniform random subset of at most `quota` of the True entries of `mask`.

    mask: (K,) bool; quota: int or 0-d int tensor on mask's device (no host sync either way).
    Returns a (K,) bool mask. Each candidate gets a random key, non-candidates rank last, and the
    candidates with the `quota` smallest keys are kept.
    """
    key = torch.rand(mask.shape, generator=generator, device=mask.device)  # (K,)
    rank = key.masked_fill(~mask, 2.0).argsort().argsort()  # (K,) rank of each key, 0 = smallest
    return mask & (rank < quota)


def sample(pos, neg, n_sample, pos_ratio, generator):
    """The minibatch: at most round(n_sample * pos_ratio) positives at random, then negatives
    at random up to n_sample in all. Positives over the quota are left out, not made negative.
    """
    pos = random_subset(pos, round(n_sample * pos_ratio), generator)
    neg = random_subset(neg, n_sample - pos.sum(), generator)
    return pos, neg


def encode(candidate, matched_gt, is_pos, std=(1.0, 1.0, 1.0, 1.0)):
    """(K, 4) regression targets: bbox2loc(candidate, matched_gt) / std for positives, 0 else."""
    loc = bbox2loc(candidate, matched_gt).unbind(dim=1)  # 4 x (K,)
    # Divide column by column by Python floats: a std tensor would need a host-to-device copy.
    loc = torch.stack([c / s for c, s in zip(loc, std, strict=True)], dim=1)  # (K, 4)
    return torch.where(is_pos[:, None], loc, 0)


class AnchorTargetCreator:
    """RPN targets: a label and a regression target for every anchor (paper sec. 3.1.2).

    Anchors that cross the image border are ignored (sec. 3.3: they would add large, hard to
    correct error terms). Among the rest, an anchor is positive if its IoU with some gt box is
    >= pos_iou_thresh, or if it is (one of) a gt box's best-overlapping anchors, so that every
    gt box gets an anchor; negative if its best IoU is < neg_iou_thresh. The minibatch keeps
    n_sample anchors, at most half of them positive (the paper's 1:1 ratio).
    """

    def __init__(self, n_sample=256, pos_iou_thresh=0.7, neg_iou_thresh=0.3, pos_ratio=0.5):
        self.n_sample, self.pos_ratio = n_sample, pos_ratio
        self.pos_iou_thresh, self.neg_iou_thresh = pos_iou_thresh, neg_iou_thresh

    def __call__(self, gt_bbox, anchor, img_size, generator=None):
        """Targets for one image's K anchors. No host sync.

        Args:
            gt_bbox: (G, 4) float32 in input pixels; G == 0 is valid (negatives only).
            anchor: (K, 4) float32 anchors in input pixels.
            img_size: (H, W) of the input image.

        Returns:
            loc: (K, 4) bbox2loc(anchor, its best-IoU gt box) for positives, zeros elsewhere.
            label: (K,) int64, 1 positive, 0 negative, -1 ignored.
        """
        img_h, img_w = img_size
        inside = ((anchor[:, 0] >= 0) & (anchor[:, 1] >= 0)
                  & (anchor[:, 2] <= img_w) & (anchor[:, 3] <= img_h))  # (K,)
        # Anchors across the border get IoU 0: they are never anyone's best match.
        iou = box_iou(anchor, gt_bbox).masked_fill(~inside[:, None], 0)  # (K, G)
        max_iou, _, matched_gt = match(iou, anchor, gt_bbox)
        gt_max_iou = iou.max(dim=0).values  # (G,)
        # All anchors tied at a gt's best IoU; a gt overlapping no anchor has no best anchor.
        gt_best = ((iou == gt_max_iou) & (gt_max_iou > 0)).any(dim=1)  # (K,)

        pos = inside & ((max_iou >= self.pos_iou_thresh) | gt_best)
        neg = inside & (max_iou < self.neg_iou_thresh) & ~pos  # a gt's best anchor stays positive
        pos, neg = sample(pos, neg, self.n_sample, self.pos_ratio, generator)
        label = torch.where(pos, 1, torch.where(neg, 0, -1))  # (K,) int64
        return encode(anchor, matched_gt, pos), label


class ProposalTargetCreator:
    """RoI head targets: a minibatch of RoIs, each with a class and a regression target.

    The gt boxes join the proposals as candidates, so that the head sees positives even while
    the RPN still proposes badly. A candidate with IoU >= pos_iou_thresh to a gt box is a
    positive of that box's class; one with best IoU in [neg_iou_thresh_lo, neg_iou_thresh_hi)
    is background. The minibatch has n_sample RoIs, at most a quarter positive (Fast R-CNN's
    25%), or all the candidates there are, so S may be < n_sample.

    loc_normalize_std: the regression targets are divided by it, so that they have roughly unit
    variance and the loc loss weighs about as much as the classification loss (the Caffe
    code's BBOX_NORMALIZE_STDS: fixed values, not statistics of the data). predict multiplies
    the head's output by the same values.
    """

    def __init__(self, n_sample=128, pos_ratio=0.25, pos_iou_thresh=0.5, neg_iou_thresh_hi=0.5,
                 neg_iou_thresh_lo=0.0, loc_normalize_std=(0.1, 0.1, 0.2, 0.2)):
        self.n_sample, self.pos_ratio, self.pos_iou_thresh = n_sample, pos_ratio, pos_iou_thresh
        self.neg_iou_thresh_hi, self.neg_iou_thresh_lo = neg_iou_thresh_hi, neg_iou_thresh_lo
        self.loc_normalize_std = loc_normalize_std

    def __call__(self, roi, gt_bbox, gt_label, generator=None):
        """Sample S RoIs of one image. One host sync: S depends on the data.

        Args:
            roi: (R, 4) float proposals in input pixels.
            gt_bbox: (G, 4) in input pixels; G == 0 is valid (background only).
            gt_label: (G,) int64 gt classes, 0..n_fg-1.

        Returns:
            sample_roi: (S, 4) roi's dtype, positives first, then negatives.
            gt_roi_loc: (S, 4) bbox2loc(sample_roi, matched gt) / loc_normalize_std; zeros for
                negatives.
            gt_roi_label: (S,) int64, 0 background, gt class k -> k + 1.
        """
        gt_bbox = gt_bbox.to(roi.dtype)
        roi = torch.cat([roi, gt_bbox])  # (R + G, 4)
        max_iou, gt_index, matched_gt = match(box_iou(roi, gt_bbox), roi, gt_bbox)

        pos = max_iou >= self.pos_iou_thresh
        neg = (max_iou < self.neg_iou_thresh_hi) & (max_iou >= self.neg_iou_thresh_lo)
        pos, neg = sample(pos, neg, self.n_sample, self.pos_ratio, generator)
        keep = (pos | neg).nonzero()[:, 0]  # (S,) the host sync
        keep = keep[neg[keep].argsort(stable=True)]  # (S,) positives first

        sample_roi, is_pos = roi[keep], pos[keep]
        gt_roi_loc = encode(sample_roi, matched_gt[keep], is_pos, self.loc_normalize_std)
        if len(gt_bbox):
            gt_roi_label = torch.where(is_pos, gt_label[gt_index[keep]] + 1, 0)  # (S,)
        else:
            gt_roi_label = gt_label.new_zeros(len(keep))  # (S,) all background
        return sample_roi, gt_roi_loc, gt_roi_label
