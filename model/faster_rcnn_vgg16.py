"""VGG16 Faster R-CNN (the paper's model) and a small variant that trains on a CPU.

Shape shorthand:
    N  images        R  RoIs        C  classes with background
    D  features per RoI after the classifier (4096 for VGG16's fc7)
"""
import torch
import torchvision
from torch import nn

from model.faster_rcnn import FasterRCNN
from model.region_proposal_network import RegionProposalNetwork, normal_init
from model.roi_module import RoIPooling2D

FEAT_STRIDE = 16  # both extractors downsample 16x, as conv5_3 of VGG16 does
N_FROZEN_VGG_LAYERS = 10  # conv1_1..conv2_2 with their ReLUs and pools: fixed, as in the paper


class RoIHead(nn.Module):
    """Pools each RoI to a fixed grid and classifies it into C classes, with per-class boxes.

    Args:
        n_class: classes including background (class 0).
        roi_size, spatial_scale: RoI pooling grid and feature pixels per input pixel.
        classifier: (R, C_feat * roi_size**2) -> (R, D), e.g. VGG16's fc6 and fc7.
        n_features: D.
    """

    def __init__(self, n_class, roi_size, spatial_scale, classifier, n_features, backend='auto'):
        super().__init__()
        self.n_class = n_class
        self.roi = RoIPooling2D(roi_size, roi_size, spatial_scale, backend=backend)
        self.classifier = classifier
        self.cls_loc = nn.Linear(n_features, n_class * 4)
        self.score = nn.Linear(n_features, n_class)
        normal_init(self.cls_loc, 0.001)
        normal_init(self.score, 0.01)

    def forward(self, x, rois, roi_indices):
        """x (N, C_feat, H, W); rois (R, 4) in input pixels; roi_indices (R,) image of each.

        Returns roi_cls_locs (R, C * 4) and roi_scores (R, C).
        """
        indices_and_rois = torch.cat([roi_indices[:, None].to(rois.dtype), rois], dim=1)  # (R, 5)
        # Pool in float32 even under mixed precision: bf16 coordinates near 1000 px are off by 4.
        pool = self.roi(x.float(), indices_and_rois.float())  # (R, C_feat, roi_size, roi_size)
        fc7 = self.classifier(pool.flatten(1))  # (R, D)
        return self.cls_loc(fc7), self.score(fc7)


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


def build_faster_rcnn(n_fg_class, extractor='vgg16', weights_path=None, roi_size=7,
                      anchor_scales=(8, 16, 32), anchor_ratios=(0.5, 1, 2),
                      proposal_creator=None, backend='auto', **preprocess):
    """The whole detector for ``n_fg_class`` foreground classes.

    ``extractor``: 'vgg16' or 'small'; ``preprocess``: min_size, max_size, normalization.
    """
    if extractor == 'vgg16':
        features, classifier, n_channels, n_features = vgg16_parts(weights_path)
    else:
        features, classifier, n_channels, n_features = small_parts(roi_size)
    rpn = RegionProposalNetwork(n_channels, n_channels, anchor_ratios, anchor_scales,
                                FEAT_STRIDE, proposal_creator)
    head = RoIHead(n_fg_class + 1, roi_size, 1 / FEAT_STRIDE, classifier, n_features, backend)
    return FasterRCNN(features, rpn, head, backend=backend, **preprocess)
