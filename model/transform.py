"""Preprocessing: what predict applies to an image before the network, and what the training
data goes through (data.dataset.TrainDataset uses the same functions).

Paper: Ren et al. 2015, sec. 3.3: images are rescaled so that the shorter side is 600 pixels
(the longer at most 1000), single scale, as in Fast R-CNN.

Images are float32 (3, H, W) RGB in 0..255 until normalised; a batch is (N, 3, H, W). Boxes
are (R, 4) float32 (x_min, y_min, x_max, y_max) in pixels. Sizes are (H, W).
"""
import torch
import torch.nn.functional as F

# The one normalisation table. mode: (to BGR?, divisor, mean, std), mean and std in the
# output channel order. 'caffe' matches VGG16 weights converted from Caffe (BGR, 0..255,
# pixel means subtracted); 'torchvision' matches torchvision's ImageNet weights.
NORMALIZATION = {
    'caffe': (True, 1.0, (102.9801, 115.9465, 122.7717), (1.0, 1.0, 1.0)),
    'torchvision': (False, 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def check_normalization(mode):
    """mode, or a ValueError naming the valid ones."""
    if mode not in NORMALIZATION:
        raise ValueError(f'unknown normalization {mode!r}; valid: {", ".join(NORMALIZATION)}')
    return mode


def _normalization(img, mode):
    to_bgr, divisor, mean, std = NORMALIZATION[check_normalization(mode)]
    return to_bgr, divisor, img.new_tensor(mean).view(3, 1, 1), img.new_tensor(std).view(3, 1, 1)


def normalize(img, mode):
    """RGB 0..255 image(s), (3, H, W) or (N, 3, H, W), to the model's input for mode."""
    to_bgr, divisor, mean, std = _normalization(img, mode)
    img = img.flip(-3) if to_bgr else img
    return (img / divisor - mean) / std


def denormalize(img, mode):
    """Inverse of normalize: back to RGB 0..255."""
    to_bgr, divisor, mean, std = _normalization(img, mode)
    img = (img * std + mean) * divisor
    return img.flip(-3) if to_bgr else img


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
    img = F.interpolate(img[None], size=size, mode='bilinear', align_corners=False, antialias=True)
    return img[0], scale  # (3, H', W')


def resize_bbox(bbox, in_size, out_size):
    """Scale (R, 4) boxes from an image of in_size (H, W) to one of out_size (H, W)."""
    y_scale, x_scale = out_size[0] / in_size[0], out_size[1] / in_size[1]
    return bbox * bbox.new_tensor([x_scale, y_scale, x_scale, y_scale])


def pad_images(images):
    """Stacks (3, H_i, W_i) images into (N, 3, H_max, W_max), zero-padded at bottom and right."""
    h_max = max(img.shape[1] for img in images)
    w_max = max(img.shape[2] for img in images)
    return torch.stack([F.pad(img, (0, w_max - img.shape[2], 0, h_max - img.shape[1]))
                        for img in images])


class ImageTransform:
    """Resize, normalise and pad original images into the network's input batch.

    Args:
        min_size, max_size: short side after resizing, and the cap on the long side.
        normalization: a key of NORMALIZATION, matching the backbone's pre-trained weights.
    """

    def __init__(self, min_size=600, max_size=1000, normalization='torchvision'):
        self.min_size, self.max_size = min_size, max_size
        self.normalization = check_normalization(normalization)

    def __call__(self, images):
        """A list of (3, H_i, W_i) RGB 0..255 images -> the (N, 3, H, W) normalised, padded
        batch, N (height, width) sizes after resizing, and N scale factors."""
        resized, scales = zip(*(resize_image(img, self.min_size, self.max_size) for img in images))
        sizes = [tuple(img.shape[1:]) for img in resized]
        # Normalise, then pad: padding is 0 after normalisation, as in training (the mean colour).
        batch = pad_images([normalize(img, self.normalization) for img in resized])
        return batch, sizes, list(scales)
