"""Image reading, the usable-size check and the flip augmentation.

Images are torch float32 (3, H, W) RGB in 0..255. Boxes are (R, 4) float32 (x_min, y_min,
x_max, y_max), 0-based continuous pixel coordinates. Sizes are (H, W). Resizing and
normalisation are the model's (model.transform): the data goes through what predict applies.
"""
import numpy as np
import torch
from PIL import Image

from model.transform import resized_size


class DataError(ValueError):
    """A user's data is wrong: a missing, unreadable or malformed file. The message names it."""


def read_image(path):
    """Read an image file as it is stored (no EXIF rotation: VOC boxes refer to stored pixels).

    Returns (3, H, W) float32 RGB in 0..255. Grayscale, 16-bit, palette, CMYK, LA and RGBA
    images become RGB; alpha is dropped, 16-bit values are scaled by 255 / 65535.
    Raises DataError naming the file when it is missing, unreadable or corrupt.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith('I'):  # 16/32-bit integer grayscale
                gray = np.asarray(img, dtype=np.float64) * (255 / 65535)
                img = Image.fromarray(gray.clip(0, 255).round().astype(np.uint8))
            elif img.mode in ('P', 'PA'):  # via RGBA so palette transparency converts cleanly
                img = img.convert('RGBA')
            array = np.array(img.convert('RGB'))  # (H, W, 3) uint8
    except Exception as e:  # PIL raises many types for corrupt data; all mean "bad file"
        raise DataError(f'{path}: cannot read image ({type(e).__name__}: {e})') from e
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float()  # (3, H, W)


def size_problem(size, min_size, max_size, min_side, stride):
    """Why the detector cannot use an image of size (H, W), or None if it can.

    min_side: proposals under this many original pixels are dropped (--rpn-min-size), so a
    smaller image can never have one. stride: input pixels per feature cell; a resized side
    under it leaves no feature cell (an image far longer than wide, squeezed by max_size).
    """
    height, width = size
    if min(height, width) < min_side:
        return (f'is {width}x{height}, smaller than {min_side} px on a side, where every '
                'proposal would be dropped (--rpn-min-size)')
    (new_height, new_width), _ = resized_size(size, min_size, max_size)
    if min(new_height, new_width) < stride:
        return (f'is {width}x{height}, which --min-size/--max-size resize to '
                f'{new_width}x{new_height}, thinner than one {stride}-px feature cell; '
                'crop it into squarer pieces or raise --max-size')
    return None


def flip_bbox(bbox, size):
    """Flip (R, 4) boxes horizontally inside an image of size (H, W)."""
    width = size[1]
    return torch.stack([width - bbox[:, 2], bbox[:, 1], width - bbox[:, 0], bbox[:, 3]], dim=1)
