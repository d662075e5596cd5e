"""A few conv layers (stride 16, 256 channels) and a two-layer classifier: learns the toy
dataset on a CPU in minutes, from random weights."""
from torch import nn

from model.backbones.base import Backbone


def build(weights=None):
    if weights is not None:
        raise ValueError('the small backbone has no pre-trained weights')
    layers, in_ch = [], 3
    for out_ch, n_conv in ((32, 1), (64, 2), (128, 2), (256, 3)):
        for j in range(n_conv):
            layers += [nn.Conv2d(in_ch, out_ch, 3, 2 if j == 0 else 1, 1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
    # fc6 dominates a CPU training step of this model; 256 wide is plenty for a few classes.
    classifier = nn.Sequential(nn.Linear(256 * 7 * 7, 256), nn.ReLU(inplace=True),
                               nn.Linear(256, 256), nn.ReLU(inplace=True))
    return Backbone(nn.Sequential(*layers), classifier, 256, 256)
