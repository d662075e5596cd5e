"""ResNet-50 / 101 in the C4 form (He et al. 2016, sec. 4 and appendix A): conv1..conv4
(layer3: stride 16, 1024 channels) are the shared features; conv5 (layer4) runs on each RoI,
then average pooling gives its 2048 features. The settings are tf-faster-rcnn's and
mmdetection's R-50-C4: stem and conv2 (layer1) fixed, every BatchNorm frozen as an affine map
(one image per step gives no useful batch statistics), 14 x 14 RoIAlign with adaptive sampling,
so that layer4's stride 2 leaves 7 x 7; no doubled bias lr, weight decay 1e-4 (utils/config.py).
"""
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.backbones.base import Backbone, load_pretrained


def load_resnet(depth, weights=None):
    """torchvision's ResNet-`depth` (50 or 101) with frozen BatchNorm, its stem and conv2
    (layer1) fixed; weights: torchvision's ResNet state dict file or 'imagenet'. The C4 and the
    FPN (fpn.py) backbones both start from it."""
    name = f'resnet{depth}'
    # Frozen BatchNorm normalises nothing: from random weights, residual branches that start
    # at zero (Goyal et al. 2017) keep the activations finite; pre-trained weights replace them.
    net = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d,
                                            zero_init_residual=True)
    if weights is not None:
        load_pretrained(net, weights, name, skip=('fc.',))
    net.conv1.requires_grad_(False)  # the stem and conv2 stay fixed
    net.layer1.requires_grad_(False)
    return net


def build(depth, weights=None):
    """depth: 50 or 101; weights: torchvision's ResNet state dict file or 'imagenet'."""
    net = load_resnet(depth, weights)
    extractor = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                              net.layer3)
    classifier = nn.Sequential(nn.Unflatten(1, (1024, 14, 14)), net.layer4,
                               nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (R, 2048)
    return Backbone(extractor, classifier, 1024, 2048, roi_op='align', roi_size=14)
