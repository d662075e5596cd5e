import importlib.util

import pytest
import torch
import torchvision

from model.ops.backend import use_cupy
from model.ops.nms import batched_non_maximum_suppression, non_maximum_suppression

needs_cupy = pytest.mark.skipif(importlib.util.find_spec('cupy') is None, reason='needs CuPy')


def iou(a, b):
    """IoU of two (x_min, y_min, x_max, y_max) lists of Python floats, no +1 on the sides."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def reference_nms(bbox, thresh, score=None):
    """Greedy NMS in plain Python floats (float64): an independent re-implementation of the
    semantics documented in model/ops/nms.py, not a call to torchvision.

    Boxes are visited by descending score (None: in the given order; equal scores keep the
    given order, Python's sort is stable) and one is kept unless its IoU with a box kept
    before it is > thresh.
    """
    boxes = bbox.double().tolist()
    order = list(range(len(boxes)))
    if score is not None:
        priority = score.double().tolist()
        order.sort(key=lambda i: -priority[i])
    keep = []
    for i in order:
        if not any(iou(boxes[i], boxes[k]) > thresh for k in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


def reference_batched_nms(bbox, score, idxs, thresh):
    """reference_nms run on each group of equal idxs by itself, the kept boxes of all groups
    then ordered by descending score: an independent re-implementation of the documented
    semantics of batched_non_maximum_suppression (no coordinate offsets)."""
    group_of = idxs.tolist()
    keep = []
    for group in sorted(set(group_of)):
        members = [i for i, g in enumerate(group_of) if g == group]
        keep += [members[k] for k in reference_nms(bbox[members], thresh, score[members])]
    priority = score.double().tolist()
    keep.sort(key=lambda i: -priority[i])
    return torch.tensor(keep, dtype=torch.int64)


def random_boxes(n, seed=0, extent=100.0, integer=False):
    """(n, 4) boxes like proposals: jittered copies of n / 20 objects, so IoUs spread over
    (0, 1) and many sit near any threshold; unique scores."""
    g = torch.Generator().manual_seed(seed)
    n_object = max(n // 20, 1)
    object_xy = torch.rand(n_object, 2, generator=g) * extent
    object_wh = 5 + torch.rand(n_object, 2, generator=g) * extent / 3
    pick = torch.randint(0, n_object, (n,), generator=g)
    xy = object_xy[pick] + torch.randn(n, 2, generator=g) * object_wh[pick] * 0.15
    wh = object_wh[pick] * (1 + torch.randn(n, 2, generator=g) * 0.15).clamp(min=0.2)
    bbox = torch.cat([xy, xy + wh], dim=1)  # (n, 4)
    if integer:
        bbox = bbox.round()
    score = torch.randperm(n, generator=g).float() / max(n, 1)
    return bbox, score


def without_near_ties(bbox, thresholds, idxs=None, margin=1e-5):
    """Indices of the boxes left after dropping the later box of every pair (of the same
    group, if idxs is given) whose IoU is within `margin` of one of `thresholds`.

    Near such an IoU the op's float32 arithmetic and the reference's float64 may legitimately
    fall on different sides of the threshold (IoU 3/10 is > 0.3 in float32, == 0.3 in float64);
    away from it both are exact enough (float32 rounds an IoU by ~1e-6 at most) to agree.
    """
    b = bbox.double()  # (R, 4); vectorized here only to pick the inputs, not to check results
    inter = (torch.min(b[:, None, 2:], b[None, :, 2:]) -
             torch.max(b[:, None, :2], b[None, :, :2])).clamp(min=0).prod(2)  # (R, R)
    area = (b[:, 2:] - b[:, :2]).prod(1)
    pair_iou = inter / (area[:, None] + area[None, :] - inter)
    near = torch.zeros_like(pair_iou, dtype=torch.bool)
    for thresh in thresholds:
        near |= (pair_iou - thresh).abs() < margin
    if idxs is not None:
        near &= idxs[:, None] == idxs[None, :]
    kept = []
    for i in range(len(b)):
        if not near[i, kept].any():
            kept.append(i)
    assert len(kept) >= 0.9 * len(b)  # the inputs stay what random_boxes made
    return torch.tensor(kept, dtype=torch.int64)


HAND_BBOX = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
HAND_SCORE = torch.tensor([0.9, 0.95, 0.5])
IMPLEMENTATIONS = {
    'auto': lambda bbox, thresh, score=None: non_maximum_suppression(bbox, thresh, score),
    'torchvision': lambda bbox, thresh, score=None: non_maximum_suppression(
        bbox, thresh, score, backend='torchvision'),
    'reference': reference_nms,
}


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_hand_case(implementation):
    nms = IMPLEMENTATIONS[implementation]  # the reference must pass the hand cases too
    # IoU(0, 1) = 81 / (100 + 100 - 81) = 0.68; box 2 overlaps nothing
    keep = nms(HAND_BBOX, 0.5, HAND_SCORE)
    assert keep.dtype == torch.int64 and keep.tolist() == [1, 2]
    assert nms(HAND_BBOX, 0.7, HAND_SCORE).tolist() == [1, 0, 2]
    # IoU > thresh suppresses, IoU == thresh does not
    half_overlap = torch.tensor([[0, 0, 3, 1], [1, 0, 4, 1]], dtype=torch.float32)  # IoU 2/4
    assert nms(half_overlap, 0.5).tolist() == [0, 1]
    assert nms(half_overlap, 0.49).tolist() == [0]
    # a box inside another: IoU = 4 / 16; boxes that only touch: IoU 0, kept even at thresh 0
    inside = torch.tensor([[0, 0, 4, 4], [1, 1, 3, 3], [4, 0, 8, 4]], dtype=torch.float32)
    assert nms(inside, 0.25).tolist() == [0, 1, 2]
    assert nms(inside, 0.2).tolist() == [0, 2]
    assert nms(inside, 0.0).tolist() == [0, 2]
    # suppression is by kept boxes only: 1 is dropped by 0, so 2 (IoU 1/3 with 1, 0 with 0)
    # survives at 0.3
    chain = torch.tensor([[0, 0, 2, 1], [1, 0, 3, 1], [2, 0, 4, 1]], dtype=torch.float32)
    assert nms(chain, 0.3).tolist() == [0, 2]
    # equal scores: the given order decides
    assert nms(HAND_BBOX, 0.5, torch.ones(3)).tolist() == [0, 2]
    assert nms(HAND_BBOX[[1, 0, 2]], 0.5, torch.ones(3)).tolist() == [0, 2]


def test_score_none_is_given_order():
    assert non_maximum_suppression(HAND_BBOX, 0.5).tolist() == [0, 2]
    assert non_maximum_suppression(HAND_BBOX[[1, 0, 2]], 0.5).tolist() == [0, 2]


def test_limit():
    assert non_maximum_suppression(HAND_BBOX, 0.7, HAND_SCORE, limit=2).tolist() == [1, 0]
    assert non_maximum_suppression(HAND_BBOX, 0.7, HAND_SCORE, limit=0).tolist() == []
    assert non_maximum_suppression(HAND_BBOX, 0.7, HAND_SCORE, limit=9).tolist() == [1, 0, 2]


def test_empty():
    for backend in ('auto', 'torchvision'):
        keep = non_maximum_suppression(torch.zeros(0, 4), 0.5, torch.zeros(0), backend=backend)
        assert keep.shape == (0,) and keep.dtype == torch.int64
        keep = batched_non_maximum_suppression(
            torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5,
            backend=backend)
        assert keep.shape == (0,) and keep.dtype == torch.int64


@pytest.mark.parametrize('n', [0, 1, 2, 50, 1000])
@pytest.mark.parametrize('thresh', [0.3, 0.5, 0.7])
def test_matches_reference(n, thresh):
    bbox, score = random_boxes(n, seed=n)
    kept = without_near_ties(bbox, [thresh])
    bbox, score = bbox[kept], score[kept]
    expected = reference_nms(bbox, thresh, score)
    if n >= 50:  # the case is not trivial: NMS drops boxes and keeps several
        assert 1 < len(expected) < len(bbox)
    for backend in ('auto', 'torchvision'):
        assert torch.equal(non_maximum_suppression(bbox, thresh, score, backend=backend), expected)
    assert torch.equal(non_maximum_suppression(bbox, thresh, score, limit=5), expected[:5])
    assert torch.equal(non_maximum_suppression(bbox.double(), thresh, score.double()), expected)
    assert torch.equal(non_maximum_suppression(bbox, thresh), reference_nms(bbox, thresh))


def test_half_runs_in_float32():
    bbox, score = random_boxes(300)
    bbox, score = bbox.half(), score.half()
    kept = without_near_ties(bbox, [0.5])  # half values are exact in float32 and float64
    bbox, score = bbox[kept], score[kept]
    keep = non_maximum_suppression(bbox, 0.5, score)
    assert torch.equal(keep, reference_nms(bbox, 0.5, score))


@pytest.mark.parametrize('n', [500, 1500])  # torchvision offsets groups up to 1000 boxes
def test_batched_matches_reference(n):
    # integer coordinates stay exact after a group offset, so IoUs are unchanged
    bbox, score = random_boxes(n, seed=3, integer=True)
    idxs = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(4))
    kept = without_near_ties(bbox, [0.5], idxs)
    bbox, score, idxs = bbox[kept], score[kept], idxs[kept]
    expected = reference_batched_nms(bbox, score, idxs, 0.5)
    assert expected.tolist() != reference_nms(bbox, 0.5, score).tolist()  # groups matter
    for backend in ('auto', 'torchvision'):
        keep = batched_non_maximum_suppression(bbox, score, idxs, 0.5, backend=backend)
        assert torch.equal(keep, expected)
    # all coordinates negative: groups must still not interact
    assert torch.equal(batched_non_maximum_suppression(bbox - 1000, score, idxs, 0.5), expected)


def test_batched_hand_case():
    # boxes 0 and 1 are the same box in different groups: both stay; 2 is dropped by 0
    bbox = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11]],
                        dtype=torch.float32)
    score = torch.tensor([0.9, 0.8, 0.7, 0.95])
    idxs = torch.tensor([0, 1, 0, 2])
    for batched in (batched_non_maximum_suppression, reference_batched_nms):
        assert batched(bbox, score, idxs, 0.5).tolist() == [3, 0, 1]


def test_batched_groups_straddling_zero():
    # torchvision.ops.batched_nms alone would shift group 1's box by 1 * (60 + 1), exactly onto
    # group 0's box; negative coordinates are moved to >= 0 first
    bbox = torch.tensor([[0, 0, 60, 10], [-61, -61, -1, -51]], dtype=torch.float32)
    score, idxs = torch.tensor([0.9, 0.8]), torch.tensor([0, 1])
    assert reference_batched_nms(bbox, score, idxs, 0.5).tolist() == [0, 1]
    assert batched_non_maximum_suppression(bbox, score, idxs, 0.5).tolist() == [0, 1]


def test_backend_errors():
    with pytest.raises(ValueError, match="backend='cupy' needs a CUDA tensor.*cpu tensor"):
        non_maximum_suppression(HAND_BBOX, 0.5, backend='cupy')
    with pytest.raises(ValueError, match='backend must be one of'):
        non_maximum_suppression(HAND_BBOX, 0.5, backend='cuda')
    assert not use_cupy(HAND_BBOX, 'auto')


@pytest.mark.gpu
@needs_cupy
def test_auto_picks_cupy_on_cuda():
    assert use_cupy(HAND_BBOX.cuda(), 'auto')
    assert not use_cupy(HAND_BBOX.cuda(), 'torchvision')


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize('n', [0, 1, 63, 64, 65, 1000, 12000])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize('thresh', [0.3, 0.5, 0.7])
def test_cupy_matches_torchvision(n, dtype, thresh):
    bbox, score = random_boxes(n, seed=n)
    bbox = bbox.to(dtype)
    compute = bbox.double() if dtype == torch.float64 else bbox.float()
    # torchvision's CPU kernel rounds every operation (IEEE), as our kernels do; its CUDA
    # kernel may fuse multiply-adds, so a borderline IoU can round the other way there.
    expected = torchvision.ops.nms(compute, score.to(compute.dtype), thresh)
    keep = non_maximum_suppression(bbox.cuda(), thresh, score.cuda(), backend='cupy')
    assert keep.device.type == 'cuda' and keep.dtype == torch.int64
    assert torch.equal(keep.cpu(), expected)
    if n <= 1000:
        on_cuda = torchvision.ops.nms(compute.cuda(), score.to(compute.dtype).cuda(), thresh)
        assert torch.equal(keep, on_cuda)
    limited = non_maximum_suppression(bbox.cuda(), thresh, score.cuda(), limit=7, backend='cupy')
    assert torch.equal(limited.cpu(), expected[:7])
    in_order = non_maximum_suppression(bbox.cuda(), thresh, backend='cupy')
    priority = torch.arange(n, 0, -1, dtype=compute.dtype)
    assert torch.equal(in_order.cpu(), torchvision.ops.nms(compute, priority, thresh))


@pytest.mark.gpu
@needs_cupy
def test_cupy_batched_and_equal_scores():
    bbox, score = random_boxes(3000, seed=5, integer=True)
    idxs = torch.randint(0, 20, (3000,), generator=torch.Generator().manual_seed(6))
    keep = batched_non_maximum_suppression(bbox.cuda(), score.cuda(), idxs.cuda(), 0.7,
                                           backend='cupy')
    assert torch.equal(keep.cpu(), batched_non_maximum_suppression(bbox, score, idxs, 0.7))
    # equal scores: the earlier box has priority (stable sort)
    tied = non_maximum_suppression(bbox.cuda(), 0.5, torch.ones(3000).cuda(), backend='cupy')
    assert torch.equal(tied, non_maximum_suppression(bbox.cuda(), 0.5, backend='cupy'))
