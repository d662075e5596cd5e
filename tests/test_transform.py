import pytest
import torch

from model.transform import (
    ImageTransform,
    denormalize,
    normalize,
    pad_images,
    resize_bbox,
    resize_image,
    resized_size,
)


@pytest.mark.parametrize('height, width, size, scale', [
    (300, 400, (600, 800), 2.0),  # short side reaches min_size
    (500, 500, (600, 600), 1.2),
    (200, 1000, (200, 1000), 1.0),  # long side capped by max_size
    (1000, 300, (1000, 300), 1.0),
    (375, 500, (600, 800), 1.6),
    (333, 500, (600, 901), 600 / 333),
])
def test_resize_image_sizes(height, width, size, scale):
    img, got_scale = resize_image(torch.zeros(3, height, width), 600, 1000)
    assert img.shape == (3, *size)
    assert got_scale == pytest.approx(scale)


def test_resized_size_is_what_resize_image_makes():
    for height, width in ((300, 400), (1, 1), (100, 10000), (333, 500)):
        size, scale = resized_size((height, width), 600, 1000)
        img, got_scale = resize_image(torch.zeros(3, height, width), 600, 1000)
        assert tuple(img.shape[1:]) == size and got_scale == scale


def test_resize_image_keeps_constant_and_range():
    img = torch.full((3, 40, 60), 77.0)
    assert torch.allclose(resize_image(img, 20, 100)[0], img[:, :20, :30])
    noise = torch.rand(3, 50, 70) * 255
    for min_size in (10, 120):  # down (antialiased) and up
        out = resize_image(noise, min_size, 1000)[0]
        assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3


def test_resize_bbox_by_hand():
    bbox = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out = resize_bbox(bbox, (100, 200), (50, 400))  # y x0.5, x x2
    assert out.tolist() == [[20.0, 10.0, 60.0, 20.0]]
    assert resize_bbox(torch.zeros(0, 4), (1, 1), (2, 2)).shape == (0, 4)


def test_caffe_normalize_by_hand():
    img = torch.zeros(3, 2, 2)
    img[:, 1, 0] = torch.tensor([10.0, 20.0, 30.0])  # R, G, B
    out = normalize(img, 'caffe')
    assert out[:, 1, 0].tolist() == pytest.approx([30 - 102.9801, 20 - 115.9465, 10 - 122.7717])


def test_torchvision_normalize_by_hand():
    img = torch.full((3, 1, 1), 255.0)
    out = normalize(img, 'torchvision')[:, 0, 0]
    assert out.tolist() == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                          (1 - 0.406) / 0.225], rel=1e-6)


@pytest.mark.parametrize('mode', ['caffe', 'torchvision'])
@pytest.mark.parametrize('shape', [(3, 4, 5), (2, 3, 4, 5)])
def test_normalize_round_trip(mode, shape):
    img = torch.rand(shape) * 255
    assert torch.allclose(denormalize(normalize(img, mode), mode), img, atol=1e-3)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="'Caffe'.*valid: caffe, torchvision"):
        normalize(torch.zeros(3, 1, 1), 'Caffe')
    with pytest.raises(ValueError, match='valid'):
        denormalize(torch.zeros(3, 1, 1), 'imagenet')


def test_pad_images_zero_pads_bottom_and_right():
    images = [torch.ones(3, 2, 3), 2 * torch.ones(3, 4, 1)]
    batch = pad_images(images)
    assert batch.shape == (2, 3, 4, 3)
    assert batch[0, :, :2, :3].eq(1).all() and batch[0, :, 2:].eq(0).all()
    assert batch[1, :, :, :1].eq(2).all() and batch[1, :, :, 1:].eq(0).all()


def test_image_transform_is_resize_normalize_pad():
    transform = ImageTransform(min_size=20, max_size=40, normalization='caffe')
    images = [torch.rand(3, 10, 15) * 255, torch.rand(3, 30, 10) * 255]
    batch, sizes, scales = transform(images)
    assert sizes == [(20, 30), (40, 13)] and scales == pytest.approx([2.0, 4 / 3])
    assert batch.shape == (2, 3, 40, 30)
    expected = normalize(resize_image(images[1], 20, 40)[0], 'caffe')
    torch.testing.assert_close(batch[1, :, :40, :13], expected)
    with pytest.raises(ValueError, match="unknown normalization 'bgr'"):
        ImageTransform(normalization='bgr')
