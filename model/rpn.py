"""Region Proposal Network: objectness and box offsets for every anchor, then proposals.

Paper: Ren et al. 2015, sec. 3.1 (the network and its anchors) and sec. 3.3 (proposal
filtering: cross-boundary boxes clipped, NMS at IoU 0.7, the top N kept).

Notation:
    N  images in the batch            A  anchors per feature-map location (3 scales x 3 ratios)
    C  feature channels               H, W  feature-map height and width
    K  anchors in all, H * W * A      R  proposals (RoIs) over the whole batch
    rpn_locs    (N, K, 4) predicted offsets of each anchor, eq. 2 (the paper's t_i)
    rpn_scores  (N, K, 2) logits, background then foreground (softmax gives the paper's p_i)
With a feature pyramid, K counts the anchors of every level; a C4 backbone is a pyramid of
one level.
"""
from itertools import accumulate

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import clip_boxes_to_image

from model.boxes import enumerate_shifted_anchors, loc2bbox
from model.ops import batched_non_maximum_suppression


def normal_init(layer, std):
    """Zero-mean Gaussian weights and zero biases: how the paper (sec. 3.1.3) initialises the
    layers it adds to the pre-trained network."""
    nn.init.normal_(layer.weight, 0, std)
    nn.init.zeros_(layer.bias)


class ProposalCreator:
    """Turns one image's anchor scores and offsets into proposals (sec. 3.3).

    On each feature map (one for a C4 backbone, one per level for a pyramid): keep the
    n_pre_nms best-scored anchors, decode them by their offsets, clip them to the image, drop
    boxes under min_size (scaled like the image) and empty ones, NMS at nms_thresh; then keep
    the n_post_nms best over all maps. Choosing per level keeps the many small anchors of the
    fine levels from crowding out the large ones; it is torchvision's and Detectron's rule, for
    C4 models too (the Caffe code filtered by size before choosing the best). The counts differ
    in training (12000 -> 2000, many RoIs to sample from) and at test time (6000 -> 300, fewer
    and faster, as in the paper's test setting).
    No gradient flows through the proposals (the paper's approximate joint training).
    """

    def __init__(self, nms_thresh=0.7, n_train_pre_nms=12000, n_train_post_nms=2000,
                 n_test_pre_nms=6000, n_test_post_nms=300, min_size=16, backend='auto'):
        self.nms_thresh, self.min_size, self.backend = nms_thresh, min_size, backend
        self.n_train_pre_nms, self.n_train_post_nms = n_train_pre_nms, n_train_post_nms
        self.n_test_pre_nms, self.n_test_post_nms = n_test_pre_nms, n_test_post_nms

    def __call__(self, loc, score, anchor, img_size, scale=1.0, training=False, n_per_level=None):
        """Proposals for one image. Host syncs: the size filter and NMS (data-dependent R).

        Args:
            loc: (K, 4) predicted offsets for each anchor.
            score: (K,) objectness, the foreground probability of each anchor.
            anchor: (K, 4) anchors in input pixels, level by level.
            img_size: (H, W) of the (resized) input image, ints or a tensor.
            scale: the image's resize factor, a float or a 0-dim tensor; boxes under
                min_size * scale px are dropped.
            training: picks the n_train_* counts, else n_test_*.
            n_per_level: the anchors of each level, in order; None: one level.

        Returns:
            roi: (R, 4) anchor's dtype, inside [0, W] x [0, H], highest score first,
                R <= n_*_post_nms.
        """
        n_pre_nms, n_post_nms = ((self.n_train_pre_nms, self.n_train_post_nms) if training
                                 else (self.n_test_pre_nms, self.n_test_post_nms))
        n_per_level = n_per_level or [score.shape[0]]
        starts = [0, *accumulate(n_per_level)]  # of each level's anchors in score
        # min(n_pre_nms, the level's anchors), as a tensor: a trace keeps it dynamic (export)
        n_best = [torch.as_tensor(n).clamp(max=n_pre_nms) for n in n_per_level]
        tops = [level_score.topk(k).indices + start
                for level_score, k, start in zip(score.split(n_per_level), n_best, starts)]
        level = torch.cat([torch.full_like(top, i) for i, top in enumerate(tops)])  # (K',)
        picked = torch.cat(tops)  # (K',) anchor indices, level by level
        roi = clip_boxes_to_image(loc2bbox(anchor[picked], loc[picked].detach()), img_size)
        side = torch.minimum(roi[:, 2] - roi[:, 0], roi[:, 3] - roi[:, 1])  # (K',) shorter sides
        keep = ((side >= self.min_size * scale) & (side > 0)).nonzero()[:, 0]  # host sync
        roi, score, level = roi[keep], score.detach()[picked[keep]], level[keep]
        keep = batched_non_maximum_suppression(roi, score, level, self.nms_thresh,
                                               backend=self.backend)  # highest score first
        return roi[keep[:n_post_nms]]


class RegionProposalNetwork(nn.Module):
    """A 3x3 conv slides over the features; two 1x1 convs score and regress A anchors per place.
    With a feature pyramid, the same convs slide over every level (the paper's shared head).

    Args:
        in_channels, mid_channels: feature channels in, and of the 3x3 conv (512 for VGG16).
        anchor_bases: L (A, 4) tensors, the anchors of one location of each feature map (L = 1
            for a C4 backbone), relative to the location's corner (boxes.generate_anchor_base).
        strides: L input pixels per feature-map step, (16,) for VGG16's conv5_3.
        proposal_creator: a ProposalCreator.
    """

    def __init__(self, in_channels, mid_channels, anchor_bases, strides, proposal_creator):
        super().__init__()
        self.register_buffer('anchor_base', torch.stack(anchor_bases), persistent=False)
        self.strides, self.proposal_creator = tuple(strides), proposal_creator
        n_anchor = self.anchor_base.shape[1]  # anchor_base: (L, A, 4)
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, 1, 1)
        self.score = nn.Conv2d(mid_channels, n_anchor * 2, 1)
        self.loc = nn.Conv2d(mid_channels, n_anchor * 4, 1)
        for layer in (self.conv1, self.score, self.loc):
            normal_init(layer, 0.01)  # the paper's std for new layers

    def forward(self, features, img_sizes, scales):
        """Scores every anchor and proposes regions.

        Args:
            features: (N, C, H, W), or a list of L such maps (a pyramid's levels).
            img_sizes: N pairs (height, width) of ints, or an (N, 2) tensor: each image's true
                input size (images may be padded to a common size).
            scales: N floats, or an (N,) tensor: each image's resize factor from its original
                size.

        Returns:
            rpn_locs: (N, K, 4); rpn_scores: (N, K, 2) (see the module docstring), K counting
                the anchors of every level, level by level.
            rois: (R, 4) float32 proposals, x_min y_min x_max y_max in input pixels.
            roi_indices: (R,) int64 image index of each proposal.
            anchor: (K, 4) anchors in input pixels, shared by the batch.
        """
        if isinstance(features, torch.Tensor):  # a C4 backbone: a pyramid of one level
            features = [features]
        rpn_locs, rpn_scores, anchors = [], [], []
        for feature, anchor_base, stride in zip(features, self.anchor_base, self.strides,
                                                strict=True):
            n, _, height, width = feature.shape
            anchors.append(enumerate_shifted_anchors(anchor_base, stride, height, width))
            hidden = F.relu(self.conv1(feature))  # (N, mid_channels, H, W)
            rpn_locs.append(self.loc(hidden).permute(0, 2, 3, 1).reshape(n, -1, 4))  # (N, HWA, 4)
            rpn_scores.append(self.score(hidden).permute(0, 2, 3, 1).reshape(n, -1, 2))
        rpn_locs, rpn_scores = torch.cat(rpn_locs, dim=1), torch.cat(rpn_scores, dim=1)
        anchor = torch.cat(anchors)  # (K, 4)
        # Proposals are not differentiated through; float32 under mixed precision.
        fg_prob = F.softmax(rpn_scores.detach().float(), dim=2)[..., 1]  # (N, K)
        n_per_level = [a.shape[0] for a in anchors]
        rois = [self.proposal_creator(rpn_locs[i].detach().float(), fg_prob[i], anchor,
                                      img_sizes[i], scales[i], self.training, n_per_level)
                for i in range(n)]
        roi_indices = torch.cat([torch.full_like(roi[:, 0], i, dtype=torch.int64)
                                 for i, roi in enumerate(rois)])  # (R,) image of each RoI
        return rpn_locs, rpn_scores, torch.cat(rois), roi_indices, anchor
