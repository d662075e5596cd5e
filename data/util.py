"""Image reading, resizing and normalisation, and the matching box transforms.

Images are torch float32 (3, H, W) RGB in 0..255 unless normalised. Boxes are (R, 4) float32
(x_min, y_min, x_max, y_max), 0-based continuous pixel coordinates. Sizes are (H, W).
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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


def resized_size(size, min_size, max_size):
    """The (H, W) an image of size (H, W) gets from resize_image, and the scale factor:
    the short side becomes min_size, unless the long side would then exceed max_size."""
    height, width = size
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return (round(height * scale), round(width * scale)), scale


def resize_image(img, min_size, max_size):
    """Resize so the short side is min_size, unless the long side would exceed max_size.

    img: (3, H, W) float32. Returns the resized (3, round(H * scale), round(W * scale)) image and
    scale = min(min_size / min(H, W), max_size / max(H, W)). Bilinear with antialiasing, so
    downscaling does not alias.
    """
    size, scale = resized_size(img.shape[1:], min_size, max_size)
    img = F.interpolate(img[None], size=size, mode='bilinear', align_corners=False,
                        antialias=True)[0]
    return img, scale


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


def resize_bbox(bbox, in_size, out_size):
    """Scale (R, 4) boxes from an image of in_size (H, W) to one of out_size (H, W)."""
    y_scale = out_size[0] / in_size[0]
    x_scale = out_size[1] / in_size[1]
    return bbox * bbox.new_tensor([x_scale, y_scale, x_scale, y_scale])


def flip_bbox(bbox, size):
    """Flip (R, 4) boxes horizontally inside an image of size (H, W)."""
    width = size[1]
    return torch.stack([width - bbox[:, 2], bbox[:, 1], width - bbox[:, 0], bbox[:, 3]], dim=1)


# The one normalisation table. mode: (to BGR?, divisor, mean, std), mean and std in the
# output channel order. 'caffe' matches VGG16 weights converted from Caffe (BGR, 0..255,
# pixel means subtracted); 'torchvision' matches torchvision's ImageNet weights.
NORMALIZATION = {
    'caffe': (True, 1.0, (102.9801, 115.9465, 122.7717), (1.0, 1.0, 1.0)),
    'torchvision': (False, 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _normalization(img, mode):
    if mode not in NORMALIZATION:
        raise ValueError(f'unknown normalization {mode!r}; valid: {", ".join(NORMALIZATION)}')
    to_bgr, divisor, mean, std = NORMALIZATION[mode]
    return to_bgr, divisor, img.new_tensor(mean).view(3, 1, 1), img.new_tensor(std).view(3, 1, 1)


def normalize(img, mode):
    """RGB 0..255 image(s), (3, H, W) or (N, 3, H, W), to the model's input for mode."""
    to_bgr, divisor, mean, std = _normalization(img, mode)
    if to_bgr:
        img = img.flip(-3)
    return (img / divisor - mean) / std


def denormalize(img, mode):
    """Inverse of normalize: back to RGB 0..255."""
    to_bgr, divisor, mean, std = _normalization(img, mode)
    img = (img * std + mean) * divisor
    return img.flip(-3) if to_bgr else img
