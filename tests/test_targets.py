import pytest
import torch
from torchvision.ops import box_iou as bbox_iou

from model.boxes import bbox2loc, enumerate_shifted_anchors, generate_anchor_base, loc2bbox
from model.targets import AnchorTargetCreator, ProposalTargetCreator, random_subset, sample

IMG_SIZE = (600, 800)  # (H, W)
GT_BBOX = torch.tensor([[60.0, 80, 300, 400], [400, 100, 760, 560], [200, 300, 360, 520]])
GT_LABEL = torch.tensor([3, 0, 7])


def anchors():
    """The default anchors over a 38 x 50 feature map: a 600 x 800 image at stride 16."""
    return enumerate_shifted_anchors(generate_anchor_base(), 16, 38, 50)  # (38*50*9, 4)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def inside_mask(anchor, img_size):
    h, w = img_size
    return ((anchor[:, :2] >= 0).all(1) & (anchor[:, 2] <= w) & (anchor[:, 3] <= h))


# AnchorTargetCreator


def test_anchor_target_hand_case():
    anchor = torch.tensor([
        [0.0, 0, 10, 10],  # IoU 1 with gt 0: positive
        [5, 5, 15, 15],  # IoU 1/7 with gt 0: negative
        [50, 50, 60, 60],  # IoU 100/144 < 0.7 with gt 2, but its best anchor: positive
        [90, 90, 110, 110],  # outside the 100 x 100 image: ignored
        [0, 0, 10, 12],  # IoU 100/120 >= 0.7 with gt 0: positive
        [30, 30, 40, 40],  # overlaps nothing: negative
        [50, 50, 60, 60],  # tied with anchor 2 for gt 2: positive too
    ])
    gt = torch.tensor([
        [0.0, 0, 10, 10],
        [80, 80, 100, 100],  # overlaps only the outside anchor: makes nothing positive
        [50, 50, 62, 62],
    ])
    loc, label = AnchorTargetCreator()(gt, anchor, (100, 100), generator=seeded(0))
    assert label.tolist() == [1, 0, 1, -1, 1, 0, 1]
    assert label.dtype == torch.int64 and loc.dtype == torch.float32 and loc.shape == (7, 4)
    matched = gt[[0, 0, 2, 0, 0, 0, 2]]  # best gt per anchor
    expected = bbox2loc(anchor, matched)
    expected[[1, 3, 5]] = 0  # only positives have a regression target
    torch.testing.assert_close(loc, expected)


def test_anchor_target_properties():
    anchor = anchors()
    loc, label = AnchorTargetCreator()(GT_BBOX, anchor, IMG_SIZE, generator=seeded(0))
    assert label.shape == (len(anchor),) and loc.shape == (len(anchor), 4)
    assert set(label.unique().tolist()) <= {-1, 0, 1}
    n_pos, n_neg = (label == 1).sum().item(), (label == 0).sum().item()
    assert 0 < n_pos <= 128 and n_pos + n_neg == 256
    inside = inside_mask(anchor, IMG_SIZE)
    assert (label[~inside] == -1).all() and (loc[label != 1] == 0).all()

    iou = bbox_iou(anchor, GT_BBOX) * inside[:, None]  # (K, G), outside anchors zeroed
    assert (label[iou.amax(1) >= 0.7] >= 0).all()  # >= 0.7: never sampled as negative
    assert (label[(iou.amax(1) >= 0.3) & (iou.amax(1) < 0.7)] != 0).all()  # in between: no neg
    assert (label[iou.argmax(0)] == 1).all()  # every gt's best anchor (few positives here)
    # Positives decode back onto their best-IoU gt box.
    pos = label == 1
    torch.testing.assert_close(loc2bbox(anchor[pos], loc[pos]), GT_BBOX[iou[pos].argmax(1)],
                               atol=1e-3, rtol=0)


def test_anchor_target_subsampling_quota():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    anchor = torch.cat([gt.repeat(10, 1), torch.tensor([[50.0, 50, 60, 60]]).repeat(10, 1)])
    creator = AnchorTargetCreator(n_sample=4, pos_ratio=0.5)
    _, label = creator(gt, anchor, (100, 100), generator=seeded(0))
    assert (label[:10] == 1).sum() == 2 and (label[10:] == 0).sum() == 2
    assert (label[:10] != 0).all()  # positives over the quota are ignored, never negative
    # Fewer positives than the quota: negatives fill the rest of n_sample.
    creator = AnchorTargetCreator(n_sample=8, pos_ratio=0.5)
    _, label = creator(gt, anchor[8:], (100, 100), generator=seeded(0))
    assert (label == 1).sum() == 2 and (label == 0).sum() == 6


def test_anchor_target_no_gt():
    anchor = anchors()
    loc, label = AnchorTargetCreator()(torch.zeros(0, 4), anchor, IMG_SIZE, generator=seeded(0))
    assert (label == 1).sum() == 0 and (label == 0).sum() == 256
    assert (label[~inside_mask(anchor, IMG_SIZE)] == -1).all()
    assert torch.isfinite(loc).all() and (loc == 0).all()


def test_anchor_target_seeds():
    anchor, creator = anchors(), AnchorTargetCreator()
    label_a = creator(GT_BBOX, anchor, IMG_SIZE, generator=seeded(1))[1]
    label_b = creator(GT_BBOX, anchor, IMG_SIZE, generator=seeded(1))[1]
    label_c = creator(GT_BBOX, anchor, IMG_SIZE, generator=seeded(2))[1]
    assert torch.equal(label_a, label_b) and not torch.equal(label_a, label_c)
    label_global = creator(GT_BBOX, anchor, IMG_SIZE)[1]  # generator=None: global RNG
    assert (label_global == 0).sum() + (label_global == 1).sum() == 256


# The shared steps


def test_random_subset_takes_quota_of_candidates_uniformly():
    mask = torch.arange(10) % 2 == 0  # candidates 0, 2, 4, 6, 8
    counts = torch.zeros(10)
    for seed in range(400):
        subset = random_subset(mask, 2, seeded(seed))
        assert subset.sum() == 2 and not (subset & ~mask).any()
        counts += subset
    # each candidate is drawn with probability 2/5: 160 of 400, binomial sd ~10
    assert ((counts[mask] - 160).abs() < 45).all()
    assert random_subset(mask, 9, seeded(0)).sum() == 5  # fewer candidates than the quota


def test_sample_caps_positives_and_fills_with_negatives():
    pos = torch.tensor([True] * 6 + [False] * 10)
    neg = ~pos
    got_pos, got_neg = sample(pos, neg, n_sample=8, pos_ratio=0.25, generator=seeded(0))
    assert got_pos.sum() == 2 and got_neg.sum() == 6  # round(8 * 0.25) positives
    got_pos, got_neg = sample(pos[:7], neg[:7], n_sample=8, pos_ratio=0.5, generator=seeded(0))
    assert got_pos.sum() == 4 and got_neg.sum() == 1  # only one negative exists


# ProposalTargetCreator


def jittered_rois(n, seed=0):
    """n proposals: half jittered copies of the gt boxes, half random boxes."""
    g = seeded(seed)
    near = GT_BBOX.repeat(n // 6, 1)
    near = near + torch.randn(near.shape, generator=g) * 30
    xy = torch.rand(n - len(near), 2, generator=g) * 600
    far = torch.cat([xy, xy + torch.rand(n - len(near), 2, generator=g) * 200 + 16], 1)
    return torch.cat([near, far])


def test_proposal_target_properties():
    roi = jittered_rois(2000)
    std = torch.tensor([0.1, 0.1, 0.2, 0.2])
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(
        roi, GT_BBOX, GT_LABEL, generator=seeded(0))
    n_sample = len(sample_roi)
    assert n_sample == 128 and gt_roi_loc.shape == (128, 4) and gt_roi_label.shape == (128,)
    assert gt_roi_label.dtype == torch.int64 and sample_roi.dtype == gt_roi_loc.dtype
    is_pos = gt_roi_label > 0
    n_pos = is_pos.sum().item()
    assert n_pos == 32  # plenty of positives: exactly round(128 * 0.25)
    assert is_pos[:n_pos].all() and not is_pos[n_pos:].any()  # positives first

    max_iou, gt_index = bbox_iou(sample_roi, GT_BBOX).max(dim=1)
    assert (max_iou[is_pos] >= 0.5).all() and (max_iou[~is_pos] < 0.5).all()
    assert torch.equal(gt_roi_label[is_pos], GT_LABEL[gt_index[is_pos]] + 1)
    assert (gt_roi_loc[~is_pos] == 0).all()
    decoded = loc2bbox(sample_roi[is_pos], gt_roi_loc[is_pos] * std)
    torch.testing.assert_close(decoded, GT_BBOX[gt_index[is_pos]], atol=1e-3, rtol=0)


def test_proposal_target_includes_gt():
    roi = torch.tensor([[600.0, 500, 660, 580]])  # overlaps no gt box
    bbox, label = GT_BBOX[:1], torch.tensor([4])
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(roi, bbox, label)
    torch.testing.assert_close(sample_roi, torch.cat([bbox, roi]))  # the gt, then the negative
    assert gt_roi_label.tolist() == [5, 0]
    torch.testing.assert_close(gt_roi_loc, torch.zeros(2, 4))


def test_proposal_target_few_candidates_keeps_all():
    roi = jittered_rois(30)
    sample_roi, _, gt_roi_label = ProposalTargetCreator()(roi, GT_BBOX, GT_LABEL)
    iou = bbox_iou(torch.cat([roi, GT_BBOX]), GT_BBOX).amax(1)
    assert len(sample_roi) == min(32, (iou >= 0.5).sum().item()) + (iou < 0.5).sum().item()
    assert len(sample_roi) < 128


def test_proposal_target_negative_range():
    roi = jittered_rois(600)
    creator = ProposalTargetCreator(neg_iou_thresh_lo=0.1)
    sample_roi, _, gt_roi_label = creator(roi, GT_BBOX, GT_LABEL, generator=seeded(0))
    iou = bbox_iou(sample_roi, GT_BBOX).amax(1)
    assert ((iou[gt_roi_label == 0] >= 0.1) & (iou[gt_roi_label == 0] < 0.5)).all()


def test_proposal_target_no_gt():
    roi = jittered_rois(60).double()
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(
        roi, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert len(sample_roi) == 60 and (gt_roi_label == 0).all()
    assert (gt_roi_loc == 0).all() and gt_roi_loc.dtype == torch.float64
    assert gt_roi_label.dtype == torch.int64


def test_proposal_target_seeds():
    roi, creator = jittered_rois(2000), ProposalTargetCreator()
    sample_a = creator(roi, GT_BBOX, GT_LABEL, generator=seeded(1))[0]
    sample_b = creator(roi, GT_BBOX, GT_LABEL, generator=seeded(1))[0]
    sample_c = creator(roi, GT_BBOX, GT_LABEL, generator=seeded(2))[0]
    assert torch.equal(sample_a, sample_b) and not torch.equal(sample_a, sample_c)


# On the GPU: outputs stay on the device; the anchor sampler never syncs with the host.


@pytest.mark.gpu
def test_creators_on_cuda_without_host_sync():
    device = torch.device('cuda')
    anchor, gt_bbox, gt_label = anchors().to(device), GT_BBOX.to(device), GT_LABEL.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        loc, label = AnchorTargetCreator()(gt_bbox, anchor, IMG_SIZE, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert loc.device == label.device == anchor.device
    assert (label == 1).sum().item() + (label == 0).sum().item() == 256

    roi = jittered_rois(2000).to(device)
    sample_roi, gt_roi_loc, gt_roi_label = ProposalTargetCreator()(
        roi, gt_bbox, gt_label, generator=generator)
    assert sample_roi.device == gt_roi_loc.device == gt_roi_label.device == roi.device
    assert len(sample_roi) == 128 and (gt_roi_label > 0).sum().item() == 32
