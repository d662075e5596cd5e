import importlib.util

import pytest
import torch
import torchvision

from model.roi_module import RoIPool2DFunction, RoIPooling2D

needs_cupy = pytest.mark.skipif(importlib.util.find_spec('cupy') is None, reason='needs CuPy')


def distinct_features(shape, seed=0, dtype=torch.float32):
    """Features whose values all differ by >= 0.1, so every max is unique and gradcheck-stable."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    return (torch.randperm(n, generator=g).to(dtype) / 10 - n / 20).view(shape)


def random_rois(n_roi, n_image, img_h, img_w, seed=0):
    """(R, 5) rois: tiny, large, partly or wholly outside the image, and degenerate ones."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n_roi, 2, generator=g) * torch.tensor([img_w * 1.4, img_h * 1.4]) - 0.2 * \
        torch.tensor([img_w, img_h])
    wh = torch.rand(n_roi, 2, generator=g) ** 3 * torch.tensor([img_w, img_h])  # many tiny
    wh[:3] = torch.tensor([[0.0, 0.0], [-5.0, 3.0], [0.3, 0.2]])  # empty, inverted, sub-pixel
    index = torch.randint(0, n_image, (n_roi, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], dim=1)


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
    out = RoIPooling2D(2, 2, 0.5)(x, rois)
    assert out.tolist() == [[[[10.0, 9.0], [6.0, 5.0]]]]
    # the second image, and a roi wholly outside the map: empty bins give 0
    x2 = torch.cat([x, 100 + x])
    rois2 = torch.tensor([[1, 0.0, 0.0, 7.0, 7.0], [0, 20.0, 20.0, 30.0, 30.0]])
    out = RoIPooling2D(2, 2, 0.5)(x2, rois2)
    assert out.tolist() == [[[[115.0, 113.0], [107.0, 105.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]


def test_hand_gradient():
    x = (15 - torch.arange(16.0)).view(1, 1, 4, 4).requires_grad_()
    # two overlapping rois whose maxes share a cell: the gradient adds up there
    rois = torch.tensor([[0, 2.0, 1.0, 6.0, 4.0], [0, 2.0, 2.0, 6.0, 6.0]])
    out = RoIPooling2D(2, 2, 0.5)(x, rois)  # roi 1: rows 1..3, bins rows 1-2 and 2-3
    out.backward(torch.arange(1.0, 9.0).view(2, 1, 2, 2))
    expected = torch.zeros(4, 4)
    expected[1, 1], expected[1, 2], expected[2, 1], expected[2, 2] = 1 + 5, 2 + 6, 3 + 7, 4 + 8
    assert torch.equal(x.grad[0, 0], expected)


@pytest.mark.parametrize('scale', [1.0, 0.5, 1 / 16])
@pytest.mark.parametrize('outh, outw', [(7, 7), (2, 3)])
def test_matches_torchvision(scale, outh, outw):
    x = distinct_features((2, 3, 13, 17), seed=1).requires_grad_()
    rois = random_rois(40, 2, 13 / scale, 17 / scale, seed=2)
    out = RoIPooling2D(outh, outw, scale)(x, rois)
    x_ref = x.detach().clone().requires_grad_()
    expected = torchvision.ops.roi_pool(x_ref, rois, (outh, outw), scale)
    assert torch.equal(out, expected)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad_output)
    expected.backward(grad_output)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_gradcheck():
    x = distinct_features((2, 2, 9, 11), seed=4, dtype=torch.float64).requires_grad_()
    rois = random_rois(12, 2, 9 * 4, 11 * 4, seed=5).double()
    assert torch.autograd.gradcheck(
        lambda x: RoIPool2DFunction.apply(x, rois, 3, 2, 0.25, False), (x,))


def test_half_runs_in_float32():
    x = distinct_features((2, 3, 13, 17), seed=6).half().requires_grad_()
    rois = random_rois(20, 2, 13 * 16, 17 * 16, seed=7)
    out = RoIPooling2D(7, 7, 1 / 16)(x, rois)
    assert out.dtype == torch.float16
    assert torch.equal(out, torchvision.ops.roi_pool(x.float(), rois, (7, 7), 1 / 16).half())
    out.sum().backward()
    assert x.grad.dtype == torch.float16


def test_no_rois():
    x = distinct_features((1, 3, 5, 5)).requires_grad_()
    out = RoIPooling2D(7, 7, 1.0)(x, torch.zeros(0, 5))
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_errors():
    x = distinct_features((1, 3, 5, 5))
    with pytest.raises(AssertionError, match=r'rois must be \(R, 5\)'):
        RoIPooling2D(7, 7, 1.0)(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="backend='cupy' needs a CUDA tensor.*cpu tensor"):
        RoIPooling2D(7, 7, 1.0, backend='cupy')(x, torch.zeros(2, 5))


@pytest.mark.gpu
def test_torchvision_backend_on_cuda():
    x = distinct_features((2, 8, 13, 17), seed=12).cuda().requires_grad_()
    rois = random_rois(50, 2, 13 * 16, 17 * 16, seed=13).cuda()
    out = RoIPooling2D(7, 7, 1 / 16, backend='torchvision')(x, rois)
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
    out = RoIPooling2D(7, 7, scale, backend='cupy')(x, rois)
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
        lambda x: RoIPool2DFunction.apply(x, rois, 3, 2, 0.25, True), (x,))
