"""Region Proposal Network (Ren et al. 2015, section 3.1).

Shape shorthand:
    N  images in the batch            A  anchors per feature-map location (3 scales x 3 ratios)
    C  feature channels               H, W  feature-map height and width
    K  anchors in all, H * W * A      R  proposals over the whole batch
"""
import torch
from torch import nn
from torch.nn import functional as F

from model.utils.bbox_tools import enumerate_shifted_anchors, generate_anchor_base
from model.utils.creator_tool import ProposalCreator


def normal_init(layer, std):
    nn.init.normal_(layer.weight, 0, std)
    nn.init.zeros_(layer.bias)


class RegionProposalNetwork(nn.Module):
    """A 3x3 conv slides over the features; two 1x1 convs score and regress A anchors per place.

    Args:
        in_channels, mid_channels: feature channels in, and of the 3x3 conv.
        ratios, anchor_scales: anchor shapes; sides are feat_stride * scale * sqrt(ratio).
        feat_stride: input pixels per feature-map step.
        proposal_creator: turns scores and locs into proposals (NMS etc.).
    """

    def __init__(self, in_channels=512, mid_channels=512, ratios=(0.5, 1, 2),
                 anchor_scales=(8, 16, 32), feat_stride=16, proposal_creator=None):
        super().__init__()
        anchor_base = generate_anchor_base(feat_stride, ratios, anchor_scales)
        self.register_buffer('anchor_base', anchor_base, persistent=False)  # (A, 4)
        self.feat_stride = feat_stride
        self.proposal_layer = proposal_creator or ProposalCreator()
        n_anchor = anchor_base.shape[0]
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, 1, 1)
        self.score = nn.Conv2d(mid_channels, n_anchor * 2, 1)
        self.loc = nn.Conv2d(mid_channels, n_anchor * 4, 1)
        for layer in (self.conv1, self.score, self.loc):
            normal_init(layer, 0.01)

    def forward(self, x, img_sizes, scales):
        """Scores every anchor and proposes regions.

        Args:
            x: (N, C, H, W) features.
            img_sizes: N pairs (height, width) of Python ints, each image's true input size
                (images may be padded to a common size).
            scales: N floats, each image's resize factor from its original size.

        Returns:
            rpn_locs: (N, K, 4) anchor offsets (dx, dy, dw, dh).
            rpn_scores: (N, K, 2) logits, background then foreground.
            rois: (R, 4) float32 proposals, x_min y_min x_max y_max in input pixels.
            roi_indices: (R,) int64 image index of each proposal.
            anchor: (K, 4) anchors in input pixels, shared by the batch.
        """
        n, _, hh, ww = x.shape
        anchor = enumerate_shifted_anchors(self.anchor_base, self.feat_stride, hh, ww)  # (K, 4)
        h = F.relu(self.conv1(x))
        rpn_locs = self.loc(h).permute(0, 2, 3, 1).reshape(n, -1, 4)  # (N, K, 4)
        rpn_scores = self.score(h).permute(0, 2, 3, 1).reshape(n, -1, 2)  # (N, K, 2)
        # Proposals are not differentiated through (as in the paper); float32 under mixed precision.
        fg_prob = F.softmax(rpn_scores.detach().float(), dim=2)[..., 1]  # (N, K)

        rois, roi_indices = [], []
        for i in range(n):
            roi = self.proposal_layer(rpn_locs[i].detach().float(), fg_prob[i], anchor,
                                      img_sizes[i], scale=scales[i], training=self.training)
            rois.append(roi)
            roi_indices.append(torch.full((len(roi),), i, dtype=torch.int64, device=x.device))
        return rpn_locs, rpn_scores, torch.cat(rois), torch.cat(roi_indices), anchor
