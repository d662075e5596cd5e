import math

import pytest
import torch

from model.boxes import (
    LOC_CLAMP,
    bbox2loc,
    enumerate_shifted_anchors,
    generate_anchor_base,
    loc2bbox,
)


def random_boxes(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 500
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 190 + 10  # ratios stay below the clamp
    return torch.cat([xy, xy + wh], dim=1)


def test_anchor_base_hand_values():
    anchor = generate_anchor_base()
    assert anchor.shape == (9, 4) and anchor.dtype == torch.float32
    s = 128 * math.sqrt(0.5)  # half the long side of a 128 px anchor with ratio 0.5 or 2
    expected = {
        0: (8 - s, 8 - s / 2, 8 + s, 8 + s / 2),  # ratio 0.5 (wide), scale 8
        3: (-56, -56, 72, 72),  # ratio 1, scale 8: 8 -+ 64
        4: (-120, -120, 136, 136),  # ratio 1, scale 16
        5: (-248, -248, 264, 264),  # ratio 1, scale 32
        6: (8 - s / 2, 8 - s, 8 + s / 2, 8 + s),  # ratio 2 (tall), scale 8
    }
    for i, box in expected.items():
        torch.testing.assert_close(anchor[i], torch.tensor(box, dtype=torch.float32))


def test_anchor_base_order_and_shape_properties():
    anchor = generate_anchor_base(base_size=16, ratios=(0.5, 1, 2), anchor_scales=(8, 16, 32))
    w = anchor[:, 2] - anchor[:, 0]
    h = anchor[:, 3] - anchor[:, 1]
    ratio = torch.tensor([0.5, 1, 2]).repeat_interleave(3)  # ratio-major
    scale = torch.tensor([8.0, 16, 32]).repeat(3)
    torch.testing.assert_close(h / w, ratio)
    torch.testing.assert_close(w * h, (16 * scale) ** 2)
    torch.testing.assert_close((anchor[:, 0] + anchor[:, 2]) / 2, torch.full((9,), 8.0))
    torch.testing.assert_close((anchor[:, 1] + anchor[:, 3]) / 2, torch.full((9,), 8.0))


def test_anchor_base_single():
    anchor = generate_anchor_base(base_size=16, ratios=(1,), anchor_scales=(8,))
    torch.testing.assert_close(anchor, torch.tensor([[-56.0, -56, 72, 72]]))


def test_enumerate_shifted_anchors_order():
    base = generate_anchor_base()
    height, width, stride, n_anchor = 2, 3, 16, len(base)
    anchor = enumerate_shifted_anchors(base, stride, height, width)
    assert anchor.shape == (height * width * n_anchor, 4)
    for y in range(height):
        for x in range(width):
            for a in range(n_anchor):
                shift = torch.tensor([x, y, x, y], dtype=torch.float32) * stride
                torch.testing.assert_close(anchor[(y * width + x) * n_anchor + a], base[a] + shift)
    # Same order as a conv output (N, A*4, H, W) laid out per anchor and coordinate.
    conv = anchor.reshape(height, width, n_anchor * 4).permute(2, 0, 1)[None]  # (1, A*4, H, W)
    torch.testing.assert_close(conv.permute(0, 2, 3, 1).reshape(1, -1, 4)[0], anchor)


def test_enumerate_shifted_anchors_follows_device_and_dtype():
    base = generate_anchor_base().double()
    anchor = enumerate_shifted_anchors(base, 16, 2, 2)
    assert anchor.dtype == torch.float64 and anchor.device == base.device
    torch.testing.assert_close(anchor[-1], base[-1] + 16)


def test_bbox2loc_hand_case():
    src = torch.tensor([[0.0, 0, 10, 20]])  # centre (5, 10), 10 x 20
    dst = torch.tensor([[5.0, 5, 25, 45]])  # centre (15, 25), 20 x 40
    loc = bbox2loc(src, dst)
    torch.testing.assert_close(loc, torch.tensor([[1.0, 0.75, math.log(2), math.log(2)]]))
    torch.testing.assert_close(loc2bbox(src, loc), dst)


def test_bbox2loc_identity_is_zero():
    box = random_boxes(10)
    torch.testing.assert_close(bbox2loc(box, box), torch.zeros(10, 4))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_loc_round_trip(dtype):
    src, dst = random_boxes(200, seed=1, dtype=dtype), random_boxes(200, seed=2, dtype=dtype)
    loc = bbox2loc(src, dst)
    assert loc.dtype == dtype
    torch.testing.assert_close(loc2bbox(src, loc), dst, atol=1e-4, rtol=0)
    # Decoding random offsets and encoding them back also round-trips (below the clamp).
    loc = torch.randn(200, 4, generator=torch.Generator().manual_seed(3), dtype=dtype)
    torch.testing.assert_close(bbox2loc(src, loc2bbox(src, loc)), loc, atol=1e-4, rtol=0)


def test_bbox2loc_degenerate_boxes_are_finite():
    src = torch.tensor([[5.0, 5, 5, 5], [0, 0, 10, 10]])
    dst = torch.tensor([[0.0, 0, 10, 10], [3, 3, 3, 3]])
    assert torch.isfinite(bbox2loc(src, dst)).all()


def test_loc2bbox_clamps_size():
    src = torch.tensor([[0.0, 0, 16, 16]])
    out = loc2bbox(src, torch.tensor([[0.0, 0, 1e4, 50]]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(16 * math.exp(LOC_CLAMP)))
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(1000.0))
    torch.testing.assert_close(out[0, 3] - out[0, 1], torch.tensor(1000.0))


def test_empty_boxes():
    empty = torch.zeros(0, 4)
    assert bbox2loc(empty, empty).shape == (0, 4)
    assert loc2bbox(empty, empty).shape == (0, 4)
