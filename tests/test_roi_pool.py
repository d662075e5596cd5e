import importlib.util
import math

import pytest
import torch
import torchvision

from model.ops.roi_pool import RoIPool, RoIPoolFunction

needs_cupy = pytest.mark.skipif(importlib.util.find_spec('cupy') is None, reason='needs CuPy')
# Where RoIPool runs: torchvision.ops on the CPU, our CuPy kernels on CUDA.
BACKENDS = ['torchvision', pytest.param('cupy', marks=[pytest.mark.gpu, needs_cupy])]


def pool(x, rois, outh, outw, scale, backend):
    """RoIPool with backend, on the device the backend runs on (CUDA for cupy)."""
    device = 'cuda' if backend == 'cupy' else 'cpu'
    return RoIPool(outh, outw, scale, backend)(x.to(device), rois.to(device))


def round_half_away(v):
    """C's round(): half away from zero (Python's round() goes half to even)."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def reference_roi_pool(x, rois, outh, outw, spatial_scale):
    """RoI max pooling in plain Python loops over float64: an independent re-implementation of
    the Caffe arithmetic documented in model/ops/roi_pool.py, not a call to torchvision.

    Bin edges are exact integer arithmetic: floor(p * size / P) and ceil((p + 1) * size / P).
    The ops compute them in floating point, which agrees for RoIs under 29 cells (float64) or
    57 cells (float32) with 7 bins, and any size with up to 6 bins; keep test RoIs smaller.

    Returns (out, argmax): out (R, C, outh, outw) float64; argmax maps each (r, c, ph, pw)
    whose bin is not empty to the (n, c, h, w) of its max.
    """
    feature = x.double().tolist()  # (N, C, H, W)
    channels, height, width = x.shape[1:]
    out = [[[[0.0] * outw for _ in range(outh)] for _ in range(channels)] for _ in rois]
    argmax = {}
    for r, (n, *box) in enumerate(rois.double().tolist()):
        n = int(n)
        x_min, y_min, x_max, y_max = (round_half_away(v * spatial_scale) for v in box)
        roi_w, roi_h = max(x_max - x_min + 1, 1), max(y_max - y_min + 1, 1)
        for ph in range(outh):
            h_lo = min(max(y_min + ph * roi_h // outh, 0), height)
            h_hi = min(max(y_min - (-(ph + 1) * roi_h // outh), 0), height)  # ceil division
            for pw in range(outw):
                w_lo = min(max(x_min + pw * roi_w // outw, 0), width)
                w_hi = min(max(x_min - (-(pw + 1) * roi_w // outw), 0), width)
                for c in range(channels):
                    best = None  # an empty bin stays 0 and has no argmax
                    for h in range(h_lo, h_hi):
                        for w in range(w_lo, w_hi):
                            if best is None or feature[n][c][h][w] > best:
                                best = feature[n][c][h][w]
                                argmax[r, c, ph, pw] = (n, c, h, w)
                    out[r][c][ph][pw] = 0.0 if best is None else best
    return torch.tensor(out, dtype=torch.float64).view(len(rois), channels, outh, outw), argmax


def reference_roi_pool_grad(x_shape, argmax, grad_output):
    """The gradient w.r.t. x (float64) of reference_roi_pool, in a plain loop: each output
    gradient is added at the position of its max, empty bins add nothing."""
    grad = torch.zeros(x_shape, dtype=torch.float64)
    grad_output = grad_output.double()
    for (r, c, ph, pw), position in argmax.items():
        grad[position] += grad_output[r, c, ph, pw]
    return grad


def distinct_features(shape, seed=0, dtype=torch.float32):
    """Features whose values all differ by >= 0.1, so every max is unique and gradcheck-stable."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    return (torch.randperm(n, generator=g).to(dtype) / 10 - n / 20).view(shape)


def random_rois(n_roi, n_image, img_h, img_w, seed=0, scale=None):
    """(R, 5) rois: tiny, large, partly or wholly outside the image, and degenerate ones.

    With `scale` (a power of 2, so that coordinate * scale is exact), every third roi has its
    corners on half feature cells, where rounding half away from zero decides the cell.
    """
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n_roi, 2, generator=g) * torch.tensor([img_w * 1.4, img_h * 1.4]) - 0.2 * \
        torch.tensor([img_w, img_h])
    wh = torch.rand(n_roi, 2, generator=g) ** 3 * torch.tensor([img_w, img_h])  # many tiny
    wh[:3] = torch.tensor([[0.0, 0.0], [-5.0, 3.0], [0.3, 0.2]])  # empty, inverted, sub-pixel
    index = torch.randint(0, n_image, (n_roi, 1), generator=g).float()
    box = torch.cat([xy, xy + wh], dim=1)  # (R, 4)
    if scale is not None:
        box[::3] = ((box[::3] * scale).floor() + 0.5) / scale
    return torch.cat([index, box], dim=1)


def integer_grad(shape, seed):
    """Small integer gradients: any sum of them is exact, in any order, in float32."""
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).float()


def test_hand_case():
    # x[0, 0] = 15 - arange: each bin's max is its top-left cell.
    #   15 14 13 12
    #   11 10  9  8
    #    7  6  5  4
    #    3  2  1  0
    x = (15 - torch.arange(16.0)).view(1, 1, 4, 4)
    # scale 0.5: x 2 -> col 1, y 1 -> 0.5 -> row 1 (half away from zero), x 6 -> 3, y 4 -> 2.
    # Cols 1..3 (3 wide, bins [floor(0), ceil(1.5)) = [0, 2), [1, 3) -> cols 1-2, 2-3);
    # rows 1..2 (2 high, bins [0, 1), [1, 2) -> row 1, row 2).
    rois = torch.tensor([[0, 2.0, 1.0, 6.0, 4.0]])
    expected = [[[[10.0, 9.0], [6.0, 5.0]]]]
    assert RoIPool(2, 2, 0.5)(x, rois).tolist() == expected
    assert reference_roi_pool(x, rois, 2, 2, 0.5)[0].tolist() == expected
    # the second image, and a roi wholly outside the map: empty bins give 0
    x2 = torch.cat([x, 100 + x])
    rois2 = torch.tensor([[1, 0.0, 0.0, 7.0, 7.0], [0, 20.0, 20.0, 30.0, 30.0]])
    expected = [[[[115.0, 113.0], [107.0, 105.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]
    assert RoIPool(2, 2, 0.5)(x2, rois2).tolist() == expected
    assert reference_roi_pool(x2, rois2, 2, 2, 0.5)[0].tolist() == expected
    # x -1 -> -0.5 -> col -1 (half away from zero; half to even would give 0): cols -1..3, 5
    # wide, bins [-1, 2) and [1, 4) clipped to the map -> maxes at cols 0 and 1. An inverted
    # roi (x 4 -> 2, x 2 -> 1) is 1 x 1 at its start: every bin is that cell.
    rois3 = torch.tensor([[0, -1.0, 0.0, 6.0, 0.0], [0, 4.0, 4.0, 2.0, 2.0]])
    expected = [[[[15.0, 14.0]]], [[[5.0, 5.0]]]]
    assert RoIPool(1, 2, 0.5)(x, rois3).tolist() == expected
    assert reference_roi_pool(x, rois3, 1, 2, 0.5)[0].tolist() == expected


def test_hand_gradient():
    x = (15 - torch.arange(16.0)).view(1, 1, 4, 4).requires_grad_()
    # two overlapping rois whose maxes share a cell: the gradient adds up there
    rois = torch.tensor([[0, 2.0, 1.0, 6.0, 4.0], [0, 2.0, 2.0, 6.0, 6.0]])
    out = RoIPool(2, 2, 0.5)(x, rois)  # roi 1: rows 1..3, bins rows 1-2 and 2-3
    grad_output = torch.arange(1.0, 9.0).view(2, 1, 2, 2)
    out.backward(grad_output)
    expected = torch.zeros(4, 4)
    expected[1, 1], expected[1, 2], expected[2, 1], expected[2, 2] = 1 + 5, 2 + 6, 3 + 7, 4 + 8
    assert torch.equal(x.grad[0, 0], expected)
    argmax = reference_roi_pool(x.detach(), rois, 2, 2, 0.5)[1]
    assert torch.equal(reference_roi_pool_grad(x.shape, argmax, grad_output)[0, 0],
                       expected.double())


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('scale', [1.0, 0.5, 1 / 16])
@pytest.mark.parametrize('outh, outw', [(7, 7), (2, 3)])
def test_matches_reference(scale, outh, outw, backend):
    x = distinct_features((2, 3, 13, 17), seed=1).requires_grad_()
    rois = random_rois(40, 2, 13 / scale, 17 / scale, seed=2, scale=scale)
    assert ((rois[:, 3:] - rois[:, 1:3]) * scale).max() < 27  # see reference_roi_pool
    out = pool(x, rois, outh, outw, scale, backend)
    # float32 features are exact in float64, and a max picks one of them: no rounding at all
    expected, argmax = reference_roi_pool(x.detach(), rois, outh, outw, scale)
    assert out.dtype == torch.float32 and torch.equal(out.cpu().double(), expected)
    assert (expected == 0).any() and len(argmax) > 0.5 * expected.numel()  # both kinds of bins
    grad_output = integer_grad(out.shape, seed=3)
    out.backward(grad_output.to(out.device))
    expected_grad = reference_roi_pool_grad(x.shape, argmax, grad_output)
    assert torch.equal(x.grad.double(), expected_grad)


@pytest.mark.parametrize('backend', BACKENDS)
def test_gradcheck(backend):
    x = distinct_features((2, 2, 9, 11), seed=4, dtype=torch.float64).requires_grad_()
    rois = random_rois(12, 2, 9 * 4, 11 * 4, seed=5).double()
    assert torch.autograd.gradcheck(lambda x: pool(x, rois, 3, 2, 0.25, backend), (x,))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_runs_in_float32(backend, dtype):
    x = distinct_features((2, 3, 13, 17), seed=6).to(dtype).requires_grad_()
    rois = random_rois(20, 2, 13 * 16, 17 * 16, seed=7, scale=1 / 16)
    out = pool(x, rois, 7, 7, 1 / 16, backend)
    assert out.dtype == dtype
    expected, argmax = reference_roi_pool(x.detach(), rois, 7, 7, 1 / 16)
    assert torch.equal(out.cpu().double(), expected)  # half values are exact in float32 and 64
    out.sum().backward()
    assert x.grad.dtype == dtype
    # the gradient counts how often each cell is a max: small integers, exact in half
    expected_grad = reference_roi_pool_grad(x.shape, argmax, torch.ones(out.shape))
    assert torch.equal(x.grad.double(), expected_grad)


@pytest.mark.parametrize('backend', BACKENDS)
def test_no_rois(backend):
    x = distinct_features((1, 3, 5, 5)).requires_grad_()
    out = pool(x, torch.zeros(0, 5), 7, 7, 1.0, backend)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_errors():
    x = distinct_features((1, 3, 5, 5))
    with pytest.raises(ValueError, match=r'rois must be \(R, 5\)'):
        RoIPool(7, 7, 1.0)(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r'rois must be \(R, 5\)'):
        RoIPool(7, 7, 1.0)(x, torch.zeros(5))
    with pytest.raises(ValueError, match="backend='cupy' needs a CUDA tensor.*cpu tensor"):
        RoIPool(7, 7, 1.0, backend='cupy')(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match='backend must be one of'):
        RoIPool(7, 7, 1.0, backend='cuda')(x, torch.zeros(2, 5))


@pytest.mark.gpu
def test_torchvision_backend_on_cuda():
    x = distinct_features((2, 8, 13, 17), seed=12).cuda().requires_grad_()
    rois = random_rois(50, 2, 13 * 16, 17 * 16, seed=13).cuda()
    out = RoIPool(7, 7, 1 / 16, backend='torchvision')(x, rois)
    x_ref = x.detach().clone().requires_grad_()
    expected = torchvision.ops.roi_pool(x_ref, rois, (7, 7), 1 / 16)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize('scale', [1.0, 1 / 16])
def test_cupy_matches_torchvision(dtype, scale):
    x = distinct_features((2, 64, 38, 50), seed=8).cuda().to(dtype).requires_grad_()
    rois = random_rois(300, 2, 38 / scale, 50 / scale, seed=9).cuda()
    out = RoIPool(7, 7, scale, backend='cupy')(x, rois)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x_ref = x.detach().to(compute).requires_grad_()
    expected = torchvision.ops.roi_pool(x_ref, rois.to(compute), (7, 7), scale)
    assert out.dtype == dtype and torch.equal(out, expected.to(dtype))
    grad_output = torch.randn(out.shape, device='cuda', dtype=dtype)
    out.backward(grad_output)
    expected.backward(grad_output.to(compute))
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, x_ref.grad.to(dtype))


@pytest.mark.gpu
@needs_cupy
def test_cupy_gradcheck():
    x = distinct_features((2, 2, 9, 11), seed=10, dtype=torch.float64).cuda().requires_grad_()
    rois = random_rois(12, 2, 9 * 4, 11 * 4, seed=11).double().cuda()
    assert torch.autograd.gradcheck(
        lambda x: RoIPoolFunction.apply(x, rois, (3, 2), 0.25), (x,))
