"""MobileNetV3-Large (Howard et al. 2019) for cheap inference, split like tf-faster-rcnn's
MobileNet: the blocks up to stride 16 (112 channels) are the shared features, the rest (to 960
channels) run on 14 x 14 RoIAlign crops and are average-pooled. BatchNorm frozen as in
resnet.py; the stem fixed; weight decay 4e-5 and no doubled bias lr (utils/config.py)."""
from functools import partial

import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.backbones.base import Backbone, load_pretrained


def build(weights=None):
    """weights: torchvision's mobilenet_v3_large state dict file or 'imagenet'."""
    net = torchvision.models.mobilenet_v3_large(
        weights=None, norm_layer=partial(FrozenBatchNorm2d, eps=0.001))  # torchvision's eps
    if weights is not None:
        load_pretrained(net, weights, 'mobilenet_v3_large', skip=('classifier.',))
    net.features[0].requires_grad_(False)  # the stem stays fixed
    classifier = nn.Sequential(nn.Unflatten(1, (112, 14, 14)), net.features[13:],
                               nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (R, 960)
    return Backbone(net.features[:13], classifier, 112, 960, roi_op='align', roi_size=14)
