import importlib.util

import pytest
import torch
import torchvision

from model.utils.backend import use_cupy
from model.utils.nms import batched_non_maximum_suppression, non_maximum_suppression

needs_cupy = pytest.mark.skipif(importlib.util.find_spec('cupy') is None, reason='needs CuPy')


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


HAND_BBOX = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
HAND_SCORE = torch.tensor([0.9, 0.95, 0.5])


@pytest.mark.parametrize('backend', ['auto', 'torchvision'])
def test_hand_case(backend):
    # IoU(0, 1) = 81 / (100 + 100 - 81) = 0.68; box 2 overlaps nothing
    keep = non_maximum_suppression(HAND_BBOX, 0.5, HAND_SCORE, backend=backend)
    assert keep.dtype == torch.int64 and keep.tolist() == [1, 2]
    keep = non_maximum_suppression(HAND_BBOX, 0.7, HAND_SCORE, backend=backend)
    assert keep.tolist() == [1, 0, 2]
    # IoU > thresh suppresses, IoU == thresh does not
    half_overlap = torch.tensor([[0, 0, 3, 1], [1, 0, 4, 1]], dtype=torch.float32)  # IoU 2/4
    assert non_maximum_suppression(half_overlap, 0.5, backend=backend).tolist() == [0, 1]
    assert non_maximum_suppression(half_overlap, 0.49, backend=backend).tolist() == [0]


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
            torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
        assert keep.shape == (0,) and keep.dtype == torch.int64


@pytest.mark.parametrize('n', [0, 1, 2, 50, 2000])
@pytest.mark.parametrize('thresh', [0.3, 0.5, 0.7])
def test_matches_torchvision(n, thresh):
    bbox, score = random_boxes(n, seed=n)
    expected = torchvision.ops.nms(bbox, score, thresh)
    for backend in ('auto', 'torchvision'):
        assert torch.equal(non_maximum_suppression(bbox, thresh, score, backend=backend), expected)
    assert torch.equal(non_maximum_suppression(bbox, thresh, score, limit=5), expected[:5])
    assert torch.equal(non_maximum_suppression(bbox.double(), thresh, score.double()),
                       torchvision.ops.nms(bbox.double(), score.double(), thresh))


def test_half_runs_in_float32():
    bbox, score = random_boxes(300)
    keep = non_maximum_suppression(bbox.half(), 0.5, score.half())
    assert torch.equal(keep, torchvision.ops.nms(bbox.half().float(), score.half().float(), 0.5))


def test_batched_equals_per_group_loop():
    # integer coordinates stay exact after the group offset, so IoUs are unchanged
    bbox, score = random_boxes(500, seed=3, integer=True)
    idxs = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(4))
    keep = batched_non_maximum_suppression(bbox, score, idxs, 0.5)
    per_group = []
    for group in range(5):
        index = torch.nonzero(idxs == group).squeeze(1)
        per_group.append(index[non_maximum_suppression(bbox[index], 0.5, score[index])])
    expected = torch.cat(per_group)
    expected = expected[torch.argsort(score[expected], descending=True)]
    assert torch.equal(keep, expected)
    assert keep.tolist() != non_maximum_suppression(bbox, 0.5, score).tolist()
    # negative coordinates: groups must still not interact
    shifted = batched_non_maximum_suppression(bbox - 1000, score, idxs, 0.5)
    assert torch.equal(shifted, expected)


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
