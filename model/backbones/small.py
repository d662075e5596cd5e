"""A few conv layers (stride 16, 256 channels) and a two-layer classifier: learns the toy
dataset on a CPU in minutes, from random weights."""
from torch import nn

from model.backbones.base import Backbone


def conv_stage(in_ch, out_ch, n_conv):
    """n_conv 3x3 conv-BatchNorm-ReLU layers, the first with stride 2."""
    layers = []
    for j in range(n_conv):
        layers += [nn.Conv2d(in_ch if j == 0 else out_ch, out_ch, 3, 2 if j == 0 else 1, 1,
                             bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def two_fc(in_features, features):
    """The classifier of a head learnt from scratch: two fc layers with ReLU."""
    return nn.Sequential(nn.Linear(in_features, features), nn.ReLU(inplace=True),
                         nn.Linear(features, features), nn.ReLU(inplace=True))


def build(weights=None):
    if weights is not None:
        raise ValueError('the small backbone has no pre-trained weights')
    extractor = nn.Sequential(*conv_stage(3, 32, 1), *conv_stage(32, 64, 2),
                              *conv_stage(64, 128, 2), *conv_stage(128, 256, 3))
    # 256 wide is plenty for a few classes (fc6 would dominate the model's cost).
    return Backbone(extractor, two_fc(256 * 7 * 7, 256), 256, 256)
