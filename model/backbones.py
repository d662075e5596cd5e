"""Backbones: the feature extractor under the RPN and the classifier inside the RoI head.

Paper: Ren et al. 2015, sec. 4 uses VGG16 (Simonyan & Zisserman 2015): its 13 conv layers
(conv5_3, stride 16) are the shared features, its fc6 and fc7 the RoI head's classifier.
'small' is a few conv layers that learn the toy dataset on a CPU in minutes.

Each backbone gives (extractor, classifier, C_feat, D):
    extractor   (N, 3, H, W) -> (N, C_feat, H / 16, W / 16)
    classifier  (R, C_feat * 7 * 7) pooled RoIs -> (R, D)
"""
import torch
import torchvision
from torch import nn

FEAT_STRIDE = 16  # both extractors downsample 16x, as conv5_3 of VGG16 does
N_FROZEN_VGG_LAYERS = 10  # conv1_1..conv2_2 with their ReLUs and pools: fixed, as in the paper


def vgg16_parts(weights_path=None):
    """VGG16 up to conv5_3 (ReLU included, last pool dropped) and fc6 + fc7 without dropout.

    ``weights_path``: a local file, either torchvision's VGG16 state dict or the one
    misc/convert_caffe_pretrain.py writes. None leaves random weights.
    """
    vgg = torchvision.models.vgg16(weights=None)
    extractor = nn.Sequential(*list(vgg.features)[:30])
    # Dropout is off by default: the original port found it does not help at this batch size.
    classifier = nn.Sequential(vgg.classifier[0], nn.ReLU(inplace=True),
                               vgg.classifier[3], nn.ReLU(inplace=True))
    if weights_path is not None:
        load_vgg16_weights(extractor, classifier, weights_path)
    for layer in list(extractor)[:N_FROZEN_VGG_LAYERS]:
        for p in layer.parameters():
            p.requires_grad_(False)
    return extractor, classifier, 512, 4096


def load_vgg16_weights(extractor, classifier, path):
    """Loads VGG16 weights in torchvision's key layout (features.*, classifier.0/3.*)."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f'cannot read VGG16 weights from {path}: {e}') from e
    parts = {'features.': extractor, 'classifier.': classifier}
    renames = {'classifier.3.': 'classifier.2.'}  # fc7 sits at index 2 once dropout is gone
    for prefix, module in parts.items():
        own = {}
        for key, value in state.items():
            for old, new in renames.items():
                key = key.replace(old, new)
            if key.startswith(prefix) and key[len(prefix):] in module.state_dict():
                own[key[len(prefix):]] = value
        missing = set(module.state_dict()) - set(own)
        if missing:
            raise ValueError(f'{path} is not a VGG16 state dict: missing {prefix}'
                             f'{sorted(missing)[0]} (and {len(missing) - 1} more)')
        try:
            module.load_state_dict(own)
        except RuntimeError as e:
            raise ValueError(f'{path}: VGG16 weights of the wrong shape: {e}') from e


def small_parts(roi_size=7):
    """A few conv layers (stride 16, 256 channels) and a two-layer 256-wide classifier."""
    layers, in_ch = [], 3
    for out_ch, n_conv in ((32, 1), (64, 2), (128, 2), (256, 3)):
        for j in range(n_conv):
            layers += [nn.Conv2d(in_ch, out_ch, 3, 2 if j == 0 else 1, 1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
    # fc6 dominates a CPU training step of this model; 256 wide is plenty for a few classes.
    classifier = nn.Sequential(nn.Linear(256 * roi_size**2, 256), nn.ReLU(inplace=True),
                               nn.Linear(256, 256), nn.ReLU(inplace=True))
    return nn.Sequential(*layers), classifier, 256, 256


BACKBONES = ('vgg16', 'small')


def build_backbone(name, weights_path=None, roi_size=7):
    """(extractor, classifier, C_feat, D) of backbone `name`, one of BACKBONES.

    weights_path: pre-trained VGG16 weights (vgg16 only); None leaves random weights.
    """
    if name not in BACKBONES:
        raise ValueError(f'unknown backbone {name!r}; valid: {", ".join(BACKBONES)}')
    if name == 'small':
        if weights_path is not None:
            raise ValueError('pre-trained weights are for VGG16, not the small backbone')
        return small_parts(roi_size)
    return vgg16_parts(weights_path)
