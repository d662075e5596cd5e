import re

import numpy as np
import pytest
import torch
from PIL import Image

from data.util import DataError, flip_bbox, read_image, size_problem

RGB = np.array([[[10, 20, 30], [40, 50, 60]]], dtype=np.uint8)  # (H=1, W=2, 3)


def _save(tmp_path, name, img):
    path = tmp_path / name
    img.save(path)
    return path


def test_read_rgb_png_exact(tmp_path):
    image = read_image(_save(tmp_path, 'a.png', Image.fromarray(RGB)))
    assert image.dtype == torch.float32 and image.shape == (3, 1, 2)
    assert image[:, 0, 1].tolist() == [40, 50, 60]


@pytest.mark.parametrize('mode, expected', [
    ('L', [[77, 77, 77], [200, 200, 200]]),
    ('RGBA', [[10, 20, 30], [40, 50, 60]]),  # alpha dropped
    ('LA', [[77, 77, 77], [200, 200, 200]]),
    ('P', [[10, 20, 30], [40, 50, 60]]),
])
def test_read_modes_to_rgb(tmp_path, mode, expected):
    if mode in ('L', 'LA'):
        img = Image.fromarray(np.array([[77, 200]], dtype=np.uint8)).convert(mode)
    elif mode == 'RGBA':
        img = Image.fromarray(np.dstack([RGB, np.full((1, 2, 1), 128, np.uint8)]))
    else:
        img = Image.fromarray(RGB).quantize(colors=4)  # 2 colours: the palette is exact
    image = read_image(_save(tmp_path, f'{mode}.png', img))
    assert image.shape == (3, 1, 2)
    assert image[:, 0].T.tolist() == expected


def test_read_16_bit_scales_to_255(tmp_path):
    img = Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.uint16))
    assert img.mode.startswith('I;16')
    image = read_image(_save(tmp_path, 'g16.png', img))
    assert image.shape == (3, 1, 3)
    assert image[:, 0].T.tolist() == [[0] * 3, [255] * 3, [100] * 3]


def test_read_cmyk_jpeg(tmp_path):
    path = _save(tmp_path, 'c.jpg', Image.new('CMYK', (4, 3), (0, 255, 255, 0)))  # red
    image = read_image(path)
    assert image.shape == (3, 3, 4)
    assert (image[0] > 240).all() and (image[1:] < 15).all()


def test_read_does_not_apply_exif_rotation(tmp_path):
    img = Image.new('RGB', (5, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    img.save(tmp_path / 'r.jpg', exif=exif)
    assert read_image(tmp_path / 'r.jpg').shape == (3, 2, 5)


@pytest.mark.parametrize('content', [None, b'', b'not an image', b'\xff\xd8\xff\xe0' + b'0' * 50])
def test_read_bad_file_names_it(tmp_path, content):
    path = tmp_path / 'bad.jpg'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match='bad.jpg'):
        read_image(path)


def test_read_truncated_jpeg(tmp_path):
    path = _save(tmp_path, 't.jpg', Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match='t.jpg'):
        read_image(path)


@pytest.mark.parametrize('size, problem', [
    ((375, 500), None),
    ((16, 16), None),  # 16 px: a proposal of the whole image survives --rpn-min-size
    ((1, 1), r'is 1x1, smaller than 16 px on a side'),
    ((15, 400), r'is 400x15, smaller than 16 px'),
    ((100, 10000), r'is 10000x100, which --min-size/--max-size resize to 1000x10, thinner '
                   r'than one 16-px feature cell'),
    ((160, 10000), None),  # resized to 1000x16: one feature cell high
])
def test_size_problem(size, problem):
    found = size_problem(size, 600, 1000, min_side=16, stride=16)
    if problem is None:
        assert found is None
    else:
        assert re.match(problem, found)


def test_flip_bbox_by_hand_and_twice():
    bbox = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 5.0]])
    flipped = flip_bbox(bbox, (50, 100))
    assert flipped.tolist() == [[70.0, 20.0, 90.0, 40.0], [0.0, 0.0, 100.0, 5.0]]
    assert torch.equal(flip_bbox(flipped, (50, 100)), bbox)
    assert flip_bbox(torch.zeros(0, 4), (5, 5)).shape == (0, 4)


def test_flip_bbox_matches_flipped_image():
    img = torch.zeros(1, 10, 20)
    img[:, 2:5, 3:8] = 1  # box (3, 2, 8, 5) in continuous coordinates
    ys, xs = torch.nonzero(img.flip(-1)[0], as_tuple=True)
    expected = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert flip_bbox(torch.tensor([[3.0, 2.0, 8.0, 5.0]]), (10, 20)).tolist() == [expected]
