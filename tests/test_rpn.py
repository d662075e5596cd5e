import pytest
import torch
import torchvision
from torchvision.ops import box_iou as bbox_iou

from model.boxes import enumerate_shifted_anchors, generate_anchor_base, loc2bbox
from model.rpn import ProposalCreator, RegionProposalNetwork

IMG_SIZE = (600, 800)  # (H, W)


def anchors():
    """The default anchors over a 38 x 50 feature map: a 600 x 800 image at stride 16."""
    return enumerate_shifted_anchors(generate_anchor_base(), 16, 38, 50)  # (38*50*9, 4)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ProposalCreator


def rpn_outputs(seed=0):
    anchor = anchors()
    g = seeded(seed)
    loc = torch.randn(len(anchor), 4, generator=g) * 0.2
    return loc, torch.rand(len(anchor), generator=g), anchor


def reference_proposals(loc, score, anchor, img_size, min_size, n_pre, n_post, thresh):
    """The same pipeline written directly with torchvision.ops: the n_pre best anchors,
    decoded, clipped, the small ones dropped, NMS, the n_post best."""
    order = score.argsort(descending=True)[:n_pre]
    roi = torchvision.ops.clip_boxes_to_image(loc2bbox(anchor[order], loc[order]), img_size)
    keep = torchvision.ops.remove_small_boxes(roi, min_size)
    roi, score = roi[keep], score[order][keep]
    return roi[torchvision.ops.nms(roi, score, thresh)[:n_post]]


def test_proposal_creator_hand_case():
    anchor = torch.tensor([[0.0, 0, 10, 10], [20, 20, 60, 60], [100, 100, 140, 140],
                           [22, 20, 60, 60]])  # the last overlaps the second, lower score
    score = torch.tensor([0.9, 0.5, 0.8, 0.4])
    loc = torch.zeros(4, 4)
    roi = ProposalCreator()(loc, score, anchor, (200, 200))
    torch.testing.assert_close(roi, anchor[[2, 1]])  # 10 px box dropped, overlap suppressed
    roi = ProposalCreator()(loc, score, anchor, (200, 200), scale=0.5)  # min size 8 px
    torch.testing.assert_close(roi, anchor[[0, 2, 1]])
    roi = ProposalCreator()(loc, score, anchor, (120, 50))  # clipped to 50 x 120 (W x H)
    torch.testing.assert_close(roi, torch.tensor([[20.0, 20, 50, 60]]))
    # the n_pre_nms best come first, then the size filter: the small best one is not replaced
    roi = ProposalCreator(n_test_pre_nms=2)(loc, score, anchor, (200, 200))
    torch.testing.assert_close(roi, anchor[[2]])


@pytest.mark.parametrize('training', [False, True])
def test_proposal_creator_matches_reference(training):
    loc, score, anchor = rpn_outputs()
    creator = ProposalCreator(n_test_pre_nms=1000, n_test_post_nms=100,
                              n_train_pre_nms=3000, n_train_post_nms=500)
    roi = creator(loc, score, anchor, IMG_SIZE, scale=1.2, training=training)
    n_pre, n_post = (3000, 500) if training else (1000, 100)
    assert len(roi) == n_post and roi.dtype == torch.float32
    expected = reference_proposals(loc, score, anchor, IMG_SIZE, 16 * 1.2, n_pre, n_post, 0.7)
    torch.testing.assert_close(roi, expected)


def test_proposal_creator_properties():
    loc, score, anchor = rpn_outputs(seed=1)
    creator = ProposalCreator()
    for training, n_post in ((False, 300), (True, 2000)):
        roi = creator(loc, score, anchor, IMG_SIZE, scale=1.5, training=training)
        assert 0 < len(roi) <= n_post
        assert (roi >= 0).all() and (roi[:, 2] <= 800).all() and (roi[:, 3] <= 600).all()
        assert ((roi[:, 2:] - roi[:, :2]) >= 24).all()
        iou = bbox_iou(roi, roi).triu(diagonal=1)
        assert (iou <= 0.7).all()
    assert len(creator(loc, score, anchor, IMG_SIZE, training=False)) == 300


def test_proposal_creator_no_gradient():
    loc, score, anchor = rpn_outputs()
    loc.requires_grad_(True)
    score.requires_grad_(True)
    assert not ProposalCreator()(loc, score, anchor, IMG_SIZE).requires_grad


# RegionProposalNetwork


def test_rpn_shapes_and_anchor_order():
    torch.manual_seed(0)
    anchor_base = generate_anchor_base(16, (0.5, 1, 2), (2, 4))
    rpn = RegionProposalNetwork(8, 8, [anchor_base], [16], ProposalCreator())
    features = torch.randn(2, 8, 5, 7)
    rpn_locs, rpn_scores, rois, roi_indices, anchor = rpn(features, [(80, 112), (64, 96)],
                                                          [1.0, 1.0])
    n_anchor = 5 * 7 * 6
    assert rpn_locs.shape == (2, n_anchor, 4) and rpn_scores.shape == (2, n_anchor, 2)
    assert anchor.shape == (n_anchor, 4)
    # anchor k of location (y, x) is row (y * W + x) * A + k, as the conv output is reshaped
    torch.testing.assert_close(anchor[(2 * 7 + 3) * 6 + 1],
                               anchor_base[1] + torch.tensor([3 * 16, 2 * 16, 3 * 16, 2 * 16]))
    loc_map = rpn.loc(torch.relu(rpn.conv1(features)))  # (N, A * 4, H, W)
    torch.testing.assert_close(rpn_locs[1, (2 * 7 + 3) * 6 + 1], loc_map[1, 4:8, 2, 3])
    assert roi_indices.tolist() == sorted(roi_indices.tolist())
    for i, (h, w) in enumerate([(80, 112), (64, 96)]):
        mine = rois[roi_indices == i]
        assert len(mine) > 0 and (mine[:, 2] <= w).all() and (mine[:, 3] <= h).all()


@pytest.mark.gpu
def test_proposal_creator_on_cuda():
    loc, score, anchor = (x.cuda() for x in rpn_outputs())
    roi = ProposalCreator()(loc, score, anchor, IMG_SIZE, training=True)
    assert roi.device == anchor.device and 0 < len(roi) <= 2000
