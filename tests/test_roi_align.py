import importlib.util
import math

import pytest
import torch
import torchvision

from model.ops.roi_align import RoIAlign, RoIAlignFunction

needs_cupy = pytest.mark.skipif(importlib.util.find_spec('cupy') is None, reason='needs CuPy')


def bilinear_sample(plane, y, x):
    """plane (a list of H rows of W floats) at (y, x), by the rules of model/ops/roi_align.py:
    0 outside [-1, H] x [-1, W], else (y, x) clamped to [0, H - 1] x [0, W - 1] and
    interpolated between the four cells around it."""
    height, width = len(plane), len(plane[0])
    if not (-1 <= y <= height and -1 <= x <= width):
        return 0.0
    y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * ((1 - lx) * plane[y0][x0] + lx * plane[y0][x1])
            + ly * ((1 - lx) * plane[y1][x0] + lx * plane[y1][x1]))


def reference_roi_align(x, rois, outh, outw, spatial_scale, sampling_ratio, aligned):
    """RoIAlign in plain Python loops over float64: an independent re-implementation of the
    semantics documented in model/ops/roi_align.py, not a call to torchvision. It rounds
    differently from the ops (bin by bin here), so compare with a tolerance.

    Returns (R, C, outh, outw) float64.
    """
    feature = x.double().tolist()  # (N, C, H, W)
    channels = x.shape[1]
    out = torch.zeros(len(rois), channels, outh, outw, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for r, (n, *box) in enumerate(rois.double().tolist()):
        x_min, y_min, x_max, y_max = (v * spatial_scale - offset for v in box)
        roi_w, roi_h = x_max - x_min, y_max - y_min
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        grid_h = sampling_ratio or math.ceil(roi_h / outh)
        grid_w = sampling_ratio or math.ceil(roi_w / outw)
        for ph in range(outh):
            for pw in range(outw):
                # sample centres of a grid_h x grid_w grid over the bin (none if the grid is empty)
                points = [(y_min + (ph + (iy + 0.5) / grid_h) * roi_h / outh,
                           x_min + (pw + (ix + 0.5) / grid_w) * roi_w / outw)
                          for iy in range(grid_h) for ix in range(grid_w)]
                for c in range(channels):
                    total = sum(bilinear_sample(feature[int(n)][c], y, x) for y, x in points)
                    out[r, c, ph, pw] = total / max(len(points), 1)
    return out


def random_rois(n_roi, n_image, img_h, img_w, seed=0):
    """(R, 5) rois in input pixels: large, tiny (many), partly or wholly outside the image, and
    an empty, an inverted and a sub-pixel one."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([img_w, img_h])
    xy = torch.rand(n_roi, 2, generator=g) * size * 1.4 - 0.2 * size
    wh = torch.rand(n_roi, 2, generator=g) ** 3 * size
    wh[:3] = torch.tensor([[0.0, 0.0], [-40.0, -30.0], [0.3, 0.2]])  # empty, inverted, tiny
    index = torch.randint(0, n_image, (n_roi, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], dim=1)


def test_constant_map():
    # Bilinear weights sum to 1: a constant map gives the constant in every bin whose samples
    # lie in [-1, H] x [-1, W] (within 1 cell of the map, clamped), whatever the options.
    x = torch.full((1, 2, 6, 8), 3.5)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 3.0], [0, 0.0, 0.0, 8.0, 6.0],
                         [0, 0.0, -0.5, 2.0, 6.0], [0, 2.5, 2.0, 2.5, 2.0]])
    for sampling_ratio in (0, 2):
        for aligned in (True, False):
            out = RoIAlign(2, 1.0, sampling_ratio, aligned)(x, rois)
            # an empty RoI (the last) has an empty adaptive grid when aligned: 0
            empty = 0.0 if aligned and sampling_ratio == 0 else 3.5
            assert torch.equal(out[:3], torch.full((3, 2, 2, 2), 3.5))
            assert torch.equal(out[3], torch.full((2, 2, 2), empty))


@pytest.mark.parametrize('spatial_scale', [1.0, 1 / 16])
@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_linear_ramp(spatial_scale, sampling_ratio):
    # x[h, w] = 10 h + w is linear, so bilinear sampling is exact and the average of a bin's
    # samples is the ramp at the bin centre. The RoI x 1..5, y 1..3 (2 x 2 bins of 2 x 1):
    # aligned, shifted to x 0.5..4.5, y 0.5..2.5: centres x 1.5, 3.5 and y 1, 2;
    # not aligned: centres x 2, 4 and y 1.5, 2.5.
    x = (10 * torch.arange(6.0)[:, None] + torch.arange(8.0)).view(1, 1, 6, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 3.0]])
    rois[:, 1:] /= spatial_scale
    aligned = RoIAlign(2, spatial_scale, sampling_ratio, aligned=True)(x, rois)
    assert aligned.tolist() == [[[[11.5, 13.5], [21.5, 23.5]]]]
    not_aligned = RoIAlign(2, spatial_scale, sampling_ratio, aligned=False)(x, rois)
    assert not_aligned.tolist() == [[[[17.0, 19.0], [27.0, 29.0]]]]


def test_samples_outside_the_map():
    # One sample per RoI (1 x 1 output, sampling_ratio 1, not aligned, RoIs 1 x 1): at the
    # RoI centre, on the ramp x[h, w] = 10 h + w of a 4 x 4 map. Within 1 cell of the map the
    # sample is clamped to the edge cells, beyond it the sample is 0.
    x = (10 * torch.arange(4.0)[:, None] + torch.arange(4.0)).view(1, 1, 4, 4)
    centres = [(-0.5, 1.5), (-1.0, 1.5), (-1.25, 1.5), (3.5, 2.0), (4.0, 2.0), (4.25, 2.0),
               (1.0, -1.0), (1.0, 4.0), (1.0, 4.5), (-0.5, 4.0)]  # (y, x)
    expected = [1.5, 1.5, 0.0, 32.0, 32.0, 0.0, 10.0, 13.0, 0.0, 3.0]
    rois = torch.tensor([[0, cx - 0.5, cy - 0.5, cx + 0.5, cy + 0.5] for cy, cx in centres])
    out = RoIAlign(1, 1.0, sampling_ratio=1, aligned=False)(x, rois)
    assert out.flatten().tolist() == expected
    assert reference_roi_align(x, rois, 1, 1, 1.0, 1, False).flatten().tolist() == expected


@pytest.mark.parametrize('spatial_scale', [1.0, 1 / 16])
@pytest.mark.parametrize('sampling_ratio', [0, 2])
@pytest.mark.parametrize('aligned', [True, False])
def test_matches_reference(spatial_scale, sampling_ratio, aligned):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = random_rois(16, 2, 9 / spatial_scale, 11 / spatial_scale, seed=2).double()
    expected = reference_roi_align(x, rois, 3, 4, spatial_scale, sampling_ratio, aligned)
    assert (expected == 0).any() and (expected != 0).mean(dtype=torch.float64) > 0.5
    out = RoIAlign((3, 4), spatial_scale, sampling_ratio, aligned)(x, rois)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out = RoIAlign((3, 4), spatial_scale, sampling_ratio, aligned)(x.float(), rois.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_half_runs_in_float32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 13, 17, generator=g).half().requires_grad_()
    rois = random_rois(20, 2, 13 * 16, 17 * 16, seed=4)
    out = RoIAlign(7, 1 / 16)(x, rois)
    assert out.dtype == torch.float16
    x_float = x.detach().float().requires_grad_()
    expected = RoIAlign(7, 1 / 16)(x_float, rois)
    assert torch.equal(out, expected.half())
    out.sum().backward()
    expected.sum().backward()
    assert x.grad.dtype == torch.float16 and torch.equal(x.grad, x_float.grad.half())


def test_gradcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64).requires_grad_()
    rois = random_rois(8, 2, 6 * 4, 7 * 4, seed=6).double()
    assert torch.autograd.gradcheck(lambda x: RoIAlign((3, 2), 0.25, 2)(x, rois), (x,))


def test_no_rois():
    x = torch.randn(1, 3, 5, 5).requires_grad_()
    out = RoIAlign(7, 1.0)(x, torch.zeros(0, 5))
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_errors():
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match=r'rois must be \(R, 5\), got \(2, 4\)'):
        RoIAlign(7, 1.0)(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r'rois must be \(R, 5\), got \(5,\)'):
        RoIAlign(7, 1.0)(x, torch.zeros(5))
    with pytest.raises(ValueError, match="backend='cupy' needs a CUDA tensor.*cpu tensor"):
        RoIAlign(7, 1.0, backend='cupy')(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match='backend must be one of'):
        RoIAlign(7, 1.0, backend='cuda')(x, torch.zeros(2, 5))


def half_cell_rois(n_roi, n_image, img_h, img_w, spatial_scale, seed):
    """random_rois with corners on half feature cells (spatial_scale a power of 2): with 4 x 4
    bins and sampling_ratio 2, every term of the backward's sums is then a multiple of 2^-12
    for integer gradients in [-8, 8], so the sums are exact in any order while below 2^12 (see
    tests/test_cuda_kernels_host.py test_roi_align_backward_equals_torchvision)."""
    rois = random_rois(n_roi, n_image, img_h, img_w, seed)
    rois[:, 1:] = (rois[:, 1:] * spatial_scale * 2).round() / 2 / spatial_scale
    return rois


@pytest.mark.gpu
def test_torchvision_backend_on_cuda():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 13, 17, generator=g).cuda().requires_grad_()
    rois = random_rois(50, 2, 13 * 16, 17 * 16, seed=8).cuda()
    out = RoIAlign(7, 1 / 16, backend='torchvision')(x, rois)
    x_ref = x.detach().clone().requires_grad_()
    expected = torchvision.ops.roi_align(x_ref, rois, 7, 1 / 16, 0, True)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)  # atomicAdd: any order of the sums


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize('spatial_scale', [1.0, 1 / 16])
@pytest.mark.parametrize('sampling_ratio, aligned', [(0, True), (2, True), (0, False)])
def test_cupy_forward_matches_torchvision(dtype, spatial_scale, sampling_ratio, aligned):
    # Our kernel does torchvision's CPU operations in the same order without FMA contraction:
    # bit for bit equal. torchvision's CUDA kernel is compiled with FMA contraction: close.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 64, 38, 50, generator=g).to(dtype)
    rois = random_rois(300, 2, 38 / spatial_scale, 50 / spatial_scale, seed=10)
    module = RoIAlign(7, spatial_scale, sampling_ratio, aligned, backend='cupy')
    out = module(x.cuda(), rois.cuda())
    assert out.dtype == dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected_cpu = torchvision.ops.roi_align(x.to(compute), rois.to(compute), 7, spatial_scale,
                                             sampling_ratio, aligned).to(dtype)
    assert torch.equal(out.cpu(), expected_cpu)
    expected_cuda = torchvision.ops.roi_align(x.cuda().to(compute), rois.cuda().to(compute), 7,
                                              spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected_cuda.to(dtype))


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('aligned', [True, False])
def test_cupy_backward_matches_torchvision(dtype, aligned):
    # Exact against torchvision's CPU backward where every sum is exact in any order (see
    # half_cell_rois), close to its CUDA backward elsewhere (atomicAdd, FMA: other roundings).
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 38, 50, generator=g, dtype=dtype)
    rois = half_cell_rois(80, 2, 38 * 16, 50 * 16, 1 / 16, seed=12).to(dtype)
    grad = torch.randint(-8, 9, (80, 16, 4, 4), generator=g).to(dtype)
    x_ours = x.cuda().requires_grad_()
    RoIAlign(4, 1 / 16, 2, aligned, backend='cupy')(x_ours, rois.cuda()).backward(grad.cuda())
    expected = torch.ops.torchvision._roi_align_backward(
        grad, rois, 1 / 16, 4, 4, *x.shape, 2, aligned)
    sum_abs = torch.ops.torchvision._roi_align_backward(
        grad.abs(), rois, 1 / 16, 4, 4, *x.shape, 2, aligned)
    assert sum_abs.max() < 2 ** 12
    assert torch.equal(x_ours.grad.cpu(), expected)

    rois = random_rois(300, 2, 38 * 16, 50 * 16, seed=13).to(dtype).cuda()
    x_ours, x_theirs = x.cuda().requires_grad_(), x.cuda().requires_grad_()
    out = RoIAlign(7, 1 / 16, 0, aligned, backend='cupy')(x_ours, rois)
    expected = torchvision.ops.roi_align(x_theirs, rois, 7, 1 / 16, 0, aligned)
    grad = torch.randn(out.shape, dtype=dtype).cuda()
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)


@pytest.mark.gpu
@needs_cupy
def test_cupy_gradcheck():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64).cuda().requires_grad_()
    rois = random_rois(8, 2, 6 * 4, 7 * 4, seed=15).double().cuda()
    assert torch.autograd.gradcheck(
        lambda x: RoIAlignFunction.apply(x, rois, (3, 2), 0.25, 2, True), (x,))
