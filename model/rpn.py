"""Region Proposal Network: objectness and box offsets for every anchor, then proposals.

Paper: Ren et al. 2015, sec. 3.1 (the network and its anchors) and sec. 3.3 (proposal
filtering: cross-boundary boxes clipped, NMS at IoU 0.7, the top N kept).

Notation:
    N  images in the batch            A  anchors per feature-map location (3 scales x 3 ratios)
    C  feature channels               H, W  feature-map height and width
    K  anchors in all, H * W * A      R  proposals (RoIs) over the whole batch
    rpn_locs    (N, K, 4) predicted offsets of each anchor, eq. 2 (the paper's t_i)
    rpn_scores  (N, K, 2) logits, background then foreground (softmax gives the paper's p_i)
With a feature pyramid (PyramidRPN, at the end), K counts the anchors of every level.
"""
from itertools import accumulate

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import clip_boxes_to_image

from model.boxes import enumerate_shifted_anchors, generate_anchor_base, loc2bbox
from model.ops import batched_non_maximum_suppression, non_maximum_suppression


def normal_init(layer, std):
    """Zero-mean Gaussian weights and zero biases: how the paper (sec. 3.1.3) initialises the
    layers it adds to the pre-trained network."""
    nn.init.normal_(layer.weight, 0, std)
    nn.init.zeros_(layer.bias)


class ProposalCreator:
    """Turns one image's anchor scores and offsets into proposals (sec. 3.3).

    Decode every anchor by its offsets, clip to the image, drop boxes under min_size (scaled
    like the image), keep the n_pre_nms best-scored, NMS at nms_thresh, keep n_post_nms. The
    counts differ in training (12000 -> 2000, many RoIs to sample from) and at test time
    (6000 -> 300, fewer and faster, as in the paper's test setting).
    No gradient flows through the proposals (the paper's approximate joint training).
    """

    def __init__(self, nms_thresh=0.7, n_train_pre_nms=12000, n_train_post_nms=2000,
                 n_test_pre_nms=6000, n_test_post_nms=300, min_size=16, backend='auto'):
        self.nms_thresh, self.min_size, self.backend = nms_thresh, min_size, backend
        self.n_train_pre_nms, self.n_train_post_nms = n_train_pre_nms, n_train_post_nms
        self.n_test_pre_nms, self.n_test_post_nms = n_test_pre_nms, n_test_post_nms

    def counts(self, training):
        """(n_pre_nms, n_post_nms) in training or at test time."""
        if training:
            return self.n_train_pre_nms, self.n_train_post_nms
        return self.n_test_pre_nms, self.n_test_post_nms

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
        n_pre_nms, n_post_nms = self.counts(training)
        roi = clip_boxes_to_image(loc2bbox(anchor, loc.detach()), img_size)  # (K, 4)

        min_size = self.min_size * scale
        keep = ((roi[:, 2] - roi[:, 0] >= min_size)
                & (roi[:, 3] - roi[:, 1] >= min_size)).nonzero()[:, 0]  # (K',) host sync
        roi, score = roi[keep], score.detach()[keep]
        score, order = score.topk(min(n_pre_nms, len(score)))  # sorted, highest first
        roi = roi[order]  # (min(K', n_pre_nms), 4)
        keep = non_maximum_suppression(roi, self.nms_thresh, score=score, limit=n_post_nms,
                                       backend=self.backend)
        return roi[keep]


class RegionProposalNetwork(nn.Module):
    """A 3x3 conv slides over the features; two 1x1 convs score and regress A anchors per place.

    Args:
        in_channels, mid_channels: feature channels in, and of the 3x3 conv (512 for VGG16).
        ratios, anchor_scales: anchor shapes; sides are feat_stride * scale * sqrt(ratio).
        feat_stride: input pixels per feature-map step.
        proposal_creator: a ProposalCreator.
    """

    def __init__(self, in_channels=512, mid_channels=512, ratios=(0.5, 1, 2),
                 anchor_scales=(8, 16, 32), feat_stride=16, proposal_creator=None):
        super().__init__()
        anchor_base = generate_anchor_base(feat_stride, ratios, anchor_scales)
        self.register_buffer('anchor_base', anchor_base, persistent=False)  # (A, 4)
        self.feat_stride = feat_stride
        self.proposal_creator = proposal_creator or ProposalCreator()
        n_anchor = anchor_base.shape[0]
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, 1, 1)
        self.score = nn.Conv2d(mid_channels, n_anchor * 2, 1)
        self.loc = nn.Conv2d(mid_channels, n_anchor * 4, 1)
        for layer in (self.conv1, self.score, self.loc):
            normal_init(layer, 0.01)  # the paper's std for new layers

    def forward(self, features, img_sizes, scales):
        """Scores every anchor and proposes regions.

        Args:
            features: (N, C, H, W).
            img_sizes: N pairs (height, width) of Python ints, each image's true input size
                (images may be padded to a common size).
            scales: N floats, each image's resize factor from its original size.

        Returns:
            rpn_locs: (N, K, 4); rpn_scores: (N, K, 2) (see the module docstring).
            rois: (R, 4) float32 proposals, x_min y_min x_max y_max in input pixels.
            roi_indices: (R,) int64 image index of each proposal.
            anchor: (K, 4) anchors in input pixels, shared by the batch.
        """
        rpn_locs, rpn_scores, anchor = self.score_anchors(features, self.anchor_base,
                                                          self.feat_stride)
        rois, roi_indices = self.propose(rpn_locs, rpn_scores, anchor, img_sizes, scales)
        return rpn_locs, rpn_scores, rois, roi_indices, anchor

    def score_anchors(self, features, anchor_base, feat_stride):
        """The anchors (K, 4) of a feature map (N, C, H, W) and their rpn_locs (N, K, 4) and
        rpn_scores (N, K, 2)."""
        n, _, height, width = features.shape
        anchor = enumerate_shifted_anchors(anchor_base, feat_stride, height, width)
        hidden = F.relu(self.conv1(features))  # (N, mid_channels, H, W)
        rpn_locs = self.loc(hidden).permute(0, 2, 3, 1).reshape(n, -1, 4)  # (N, K, 4)
        rpn_scores = self.score(hidden).permute(0, 2, 3, 1).reshape(n, -1, 2)  # (N, K, 2)
        return rpn_locs, rpn_scores, anchor

    def propose(self, rpn_locs, rpn_scores, anchor, img_sizes, scales, **kwargs):
        """Each image's proposals by the proposal creator (kwargs go to it): rois (R, 4) and
        roi_indices (R,)."""
        # Proposals are not differentiated through; float32 under mixed precision.
        fg_prob = F.softmax(rpn_scores.detach().float(), dim=2)[..., 1]  # (N, K)
        rois, roi_indices = [], []
        for i in range(len(rpn_locs)):
            roi = self.proposal_creator(rpn_locs[i].detach().float(), fg_prob[i], anchor,
                                        img_sizes[i], scale=scales[i], training=self.training,
                                        **kwargs)
            rois.append(roi)
            roi_indices.append(torch.full((len(roi),), i, dtype=torch.int64,
                                          device=rpn_locs.device))
        return torch.cat(rois), torch.cat(roi_indices)


# With a feature pyramid (Lin et al. 2017, "Feature Pyramid Networks for Object Detection",
# sec. 4.1), the RPN is the same network slid over every level; what changes is below.

class PyramidProposalCreator(ProposalCreator):
    """ProposalCreator over the anchors of all levels: the n_pre_nms best of each level (not
    of all), then clipping, the min-size filter and NMS within each level, and the
    n_post_nms best over all levels. Empty boxes (clipped to zero width or height) are dropped
    whatever min_size. These are torchvision's and Detectron's FPN rules.
    """

    def __call__(self, loc, score, anchor, img_size, scale=1.0, training=False,
                 n_per_level=()):
        """As ProposalCreator's, with n_per_level: the anchors of each level, in order."""
        n_pre_nms, n_post_nms = self.counts(training)
        picked, level = [], []
        for i, (level_score, start) in enumerate(zip(score.split(n_per_level),
                                                     [0, *accumulate(n_per_level)])):
            top = level_score.topk(min(n_pre_nms, len(level_score))).indices + start
            picked.append(top)
            level.append(torch.full_like(top, i))
        picked, level = torch.cat(picked), torch.cat(level)  # (K',) each
        roi = clip_boxes_to_image(loc2bbox(anchor[picked], loc[picked].detach()), img_size)
        width, height = roi[:, 2] - roi[:, 0], roi[:, 3] - roi[:, 1]
        min_size = self.min_size * scale
        keep = ((width >= min_size) & (height >= min_size)
                & (width > 0) & (height > 0)).nonzero()[:, 0]  # host sync
        roi, score, level = roi[keep], score.detach()[picked[keep]], level[keep]
        keep = batched_non_maximum_suppression(roi, score, level, self.nms_thresh,
                                               backend=self.backend)
        return roi[keep[:n_post_nms]]


class PyramidRPN(RegionProposalNetwork):
    """The RPN on a list of feature maps, one per pyramid level, with the same conv weights
    on each level (the paper's shared head) and one anchor size per level.

    Args:
        strides: input pixels per feature-map cell of each level, e.g. (4, 8, 16, 32, 64) for
            P2..P6; the anchor sides on a level are its stride * scale * sqrt(ratio), so
            anchor_scales=(8,) gives 32 px on P2 to 512 px on P6, the paper's sizes.
        proposal_creator: a PyramidProposalCreator.
        Others as RegionProposalNetwork's.
    """

    def __init__(self, in_channels=256, mid_channels=256, ratios=(0.5, 1, 2), anchor_scales=(8,),
                 strides=(4, 8, 16, 32, 64), proposal_creator=None):
        super().__init__(in_channels, mid_channels, ratios, anchor_scales, strides[0],
                         proposal_creator or PyramidProposalCreator())
        self.strides = tuple(strides)
        # Anchors centred on their cell's corner, sides rounded to whole pixels, as in
        # torchvision and Detectron: ResNet's strided convs centre cell x on input pixel
        # x * stride (VGG16's 2x2 pools put it half a stride further: the C4 anchors' offset).
        bases = [(generate_anchor_base(s, ratios, anchor_scales) - s / 2).round() for s in strides]
        self.register_buffer('anchor_base', torch.stack(bases), persistent=False)  # (L, A, 4)

    def forward(self, features, img_sizes, scales):
        """As RegionProposalNetwork's, with features a list of L maps (N, C, H_l, W_l); K counts
        the anchors of all levels, level by level."""
        levels = [self.score_anchors(feature, base, stride) for feature, base, stride
                  in zip(features, self.anchor_base, self.strides, strict=True)]
        rpn_locs, rpn_scores = (torch.cat(column, dim=1) for column in list(zip(*levels))[:2])
        anchor = torch.cat([level[2] for level in levels])  # (K, 4)
        rois, roi_indices = self.propose(rpn_locs, rpn_scores, anchor, img_sizes, scales,
                                         n_per_level=[len(level[2]) for level in levels])
        return rpn_locs, rpn_scores, rois, roi_indices, anchor
