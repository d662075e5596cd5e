import importlib.util
import math

import pytest
import torch
import torchvision

from model.ops.roi_pool import CROPS_MIN_CHANNELS, RoIPool, RoIPool2DFunction, roi_cells

needs_cupy = pytest.mark.skipif(importlib.util.find_spec('cupy') is None, reason='needs CuPy')


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


@pytest.mark.parametrize('impl', ['torchvision', 'crops'])
@pytest.mark.parametrize('scale', [1.0, 0.5, 1 / 16])
@pytest.mark.parametrize('outh, outw', [(7, 7), (2, 3)])
def test_matches_reference(scale, outh, outw, impl):
    x = distinct_features((2, 3, 13, 17), seed=1).requires_grad_()
    rois = random_rois(40, 2, 13 / scale, 17 / scale, seed=2, scale=scale)
    assert ((rois[:, 3:] - rois[:, 1:3]) * scale).max() < 27  # see reference_roi_pool
    out = RoIPool2DFunction.apply(x, rois, outh, outw, scale, impl)
    # float32 features are exact in float64, and a max picks one of them: no rounding at all
    expected, argmax = reference_roi_pool(x.detach(), rois, outh, outw, scale)
    assert out.dtype == torch.float32 and torch.equal(out.double(), expected)
    assert (expected == 0).any() and len(argmax) > 0.5 * expected.numel()  # both kinds of bins
    grad_output = integer_grad(out.shape, seed=3)
    out.backward(grad_output)
    expected_grad = reference_roi_pool_grad(x.shape, argmax, grad_output)
    assert torch.equal(x.grad.double(), expected_grad)


@pytest.mark.parametrize('impl', ['torchvision', 'crops'])
def test_gradcheck(impl):
    x = distinct_features((2, 2, 9, 11), seed=4, dtype=torch.float64).requires_grad_()
    rois = random_rois(12, 2, 9 * 4, 11 * 4, seed=5).double()
    assert torch.autograd.gradcheck(
        lambda x: RoIPool2DFunction.apply(x, rois, 3, 2, 0.25, impl), (x,))


@pytest.mark.parametrize('impl', ['torchvision', 'crops'])
def test_half_runs_in_float32(impl):
    x = distinct_features((2, 3, 13, 17), seed=6).half().requires_grad_()
    rois = random_rois(20, 2, 13 * 16, 17 * 16, seed=7, scale=1 / 16)
    out = RoIPool2DFunction.apply(x, rois, 7, 7, 1 / 16, impl)
    assert out.dtype == torch.float16
    expected, argmax = reference_roi_pool(x.detach(), rois, 7, 7, 1 / 16)
    assert torch.equal(out.double(), expected)  # half values are exact in float32 and 64
    out.sum().backward()
    assert x.grad.dtype == torch.float16
    # the gradient counts how often each cell is a max: small integers, exact in half
    expected_grad = reference_roi_pool_grad(x.shape, argmax, torch.ones(out.shape))
    assert torch.equal(x.grad.double(), expected_grad)


@pytest.mark.parametrize('impl', ['torchvision', 'crops'])
def test_no_rois(impl):
    x = distinct_features((1, 3, 5, 5)).requires_grad_()
    out = RoIPool2DFunction.apply(x, torch.zeros(0, 5), 7, 7, 1.0, impl)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_roi_cells_flags_the_sizes_whose_float_bins_are_inexact():
    """torchvision cuts a RoI into bins at p * (size / 7) in floating point: exact below 57
    cells in float32 (29 in float64); 57 cells: 7 * float32(57 / 7) rounds up past 57, so
    ceil makes the last bin one cell longer than the exact ceil(7 * 57 / 7) = 57."""
    sizes = torch.arange(1, 130)
    rois = torch.zeros(len(sizes), 5)
    rois[:, 3:] = (sizes - 1)[:, None]  # cells 0..size-1 at scale 1
    for dtype, expected in ((torch.float32, [57, 114, 121]), (torch.float64, [29, 58, 116, 123])):
        start, size, inexact = roi_cells(rois.to(dtype), 1.0, 7, 7)
        assert torch.equal(size[:, 0], sizes) and (start == 0).all()
        assert sizes[inexact].tolist() == expected
        float_end = math.ceil(7 * (torch.tensor(expected[0], dtype=dtype) / 7).item())
        assert float_end == expected[0] + 1


def vgg_like_rois(n_roi, height, width, seed):
    """(R, 5) rois on a height x width map at stride 16 over two images: most inside the
    image, some over its edge, some of 57+ cells (torchvision's inexact bins), some far out."""
    g = torch.Generator().manual_seed(seed)
    img = torch.tensor([width * 16.0, height * 16.0])
    xy = torch.rand(n_roi, 2, generator=g) * img
    wh = torch.rand(n_roi, 2, generator=g) ** 2 * img * 0.6 + 8
    box = torch.cat([xy, (xy + wh).minimum(img)], dim=1)  # (R, 4) clipped like proposals
    box[:5] = torch.tensor([[16.0, 0, 912, 896], [0, 0, 1000, 1000], [-300, -200, 100, 60],
                            [900, 500, 1200, 700], [20000, 10, 30000, 20]])
    index = torch.randint(0, 2, (n_roi, 1), generator=g).float()
    return torch.cat([index, box], dim=1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('layout', [torch.channels_last, torch.contiguous_format])
def test_crops_equal_torchvision_on_vgg_sizes(dtype, layout):
    """Post-ReLU features (many tied zeros) of VGG16's shape: output, argmax and gradient equal
    torchvision's op bit for bit, in either layout, bfloat16 included (a max is exact)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 512, 38, 50, generator=g).relu().to(dtype)
    x = x.contiguous(memory_format=layout).requires_grad_()
    rois = vgg_like_rois(300, 38, 50, seed=1)
    assert roi_cells(rois, 1 / 16, 7, 7)[2][0]  # 57 x 57 cells: handed to torchvision
    out = RoIPool2DFunction.apply(x, rois, 7, 7, 1 / 16, 'crops')
    x_ref = x.detach().float().contiguous().requires_grad_()
    expected, argmax = torch.ops.torchvision.roi_pool(x_ref, rois, 1 / 16, 7, 7)
    assert out.dtype == dtype and torch.equal(out, expected.to(dtype))
    assert (argmax == -1).any() and (expected == 0).float().mean() > 0.1  # empty bins, ties
    grad = integer_grad(out.shape, seed=2)
    out.backward(grad.to(dtype))
    expected_grad = torchvision.ops.roi_pool(x_ref, rois, (7, 7), 1 / 16)
    expected_grad.backward(grad)
    assert torch.equal(x.grad, x_ref.grad.to(dtype))


@pytest.mark.parametrize('channels, backend, expected', [
    (CROPS_MIN_CHANNELS, 'auto', 'crops'), (CROPS_MIN_CHANNELS - 1, 'auto', 'torchvision'),
    (CROPS_MIN_CHANNELS, 'torchvision', 'torchvision')])
def test_cpu_picks_crops_for_many_channels(monkeypatch, channels, backend, expected):
    used = []
    apply = RoIPool2DFunction.apply
    monkeypatch.setattr(RoIPool2DFunction, 'apply',
                        lambda *args: used.append(args[-1]) or apply(*args))
    x = distinct_features((1, channels, 6, 7))
    rois = random_rois(10, 1, 6 * 16, 7 * 16, seed=3)
    out = RoIPool(7, 7, 1 / 16, backend)(x, rois)
    assert used == [expected]
    assert torch.equal(out, torchvision.ops.roi_pool(x, rois, (7, 7), 1 / 16))


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
        lambda x: RoIPool2DFunction.apply(x, rois, 3, 2, 0.25, 'cupy'), (x,))
