"""Feature Pyramid Network (Lin et al. 2017, sec. 3): the backbone's last four stages C2..C5
(strides 4, 8, 16, 32) become maps P2..P5 that all have 256 channels and the deepest stage's
semantics: a 1x1 lateral conv brings each C_k to 256 channels, the map above is upsampled 2x
(nearest) and added, top-down, and a 3x3 conv smooths each sum. P6, a stride-2 subsample of P5,
gives the RPN's largest anchors. The RoI head is two fc layers of 1024 on 7 x 7 RoIAlign crops
(sec. 4.2) instead of the backbone's own last stage.

The builders give torchvision's fasterrcnn_resnet50_fpn layout (whose weights
misc/convert_torchvision_fpn.py maps onto ours): ResNet stem and conv2 fixed, BatchNorm frozen
as in resnet.py, Kaiming-uniform (a=1) lateral and output convs with zero bias.
"""
from torch import nn
from torch.nn import functional as F

from model.backbones.base import Backbone
from model.backbones.resnet import load_resnet
from model.backbones.small import conv_stage, two_fc

STRIDES = (4, 8, 16, 32, 64)  # P2..P6


class FeaturePyramid(nn.Module):
    """Bottom-up stages, then the top-down pathway with lateral connections.

    Args:
        stages: the four bottom-up stages, each halving the resolution of the one before
            (the first from the image to stride 4).
        in_channels: the channels of C2..C5.
        channels: of every P_k (256 in the paper).
    """

    def __init__(self, stages, in_channels, channels=256):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1)
                                    for _ in in_channels)
        for conv in (*self.lateral, *self.output):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        """(N, 3, H, W) -> [P2, ..., P6], P_k (N, channels, ceil(H / 2**k), ceil(W / 2**k))."""
        # Zero-pad to a multiple of 32 (zero: the mean colour, after normalisation), so that
        # every level is exactly half the one below and the top-down sums line up.
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % 32, 0, -height % 32))
        merged = []  # C2..C5, each brought to `channels` by its 1x1 conv
        for stage, conv in zip(self.stages, self.lateral):
            x = stage(x)
            merged.append(conv(x))
        # The top-down pathway: from C4 down, each level plus the merged one above, upsampled.
        for level in range(len(merged) - 2, -1, -1):  # C4, C3, C2
            merged[level] = merged[level] + F.interpolate(
                merged[level + 1], size=merged[level].shape[-2:], mode='nearest')
        pyramid = []  # P2..P5, each sum smoothed by its 3x3 conv
        for level, conv in enumerate(self.output):  # a loop: TorchScript zips no ModuleList
            pyramid.append(conv(merged[level]))
        pyramid.append(F.max_pool2d(pyramid[-1], kernel_size=1, stride=2))  # P6
        return pyramid


def build_resnet(depth, weights=None):
    """ResNet-50 / 101 FPN; weights: torchvision's ResNet state dict file or 'imagenet'."""
    net = load_resnet(depth, weights)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    extractor = FeaturePyramid([stem, net.layer2, net.layer3, net.layer4], (256, 512, 1024, 2048))
    return Backbone(extractor, two_fc(256 * 7 * 7, 1024), 256, 1024, roi_op='align',
                    strides=STRIDES)


def build_small(weights=None):
    """A pyramid on the small backbone's convs (64 channels), for the toy data on a CPU."""
    if weights is not None:
        raise ValueError('the small_fpn backbone has no pre-trained weights')
    stages = [nn.Sequential(conv_stage(3, 32, 1), conv_stage(32, 64, 2)),
              conv_stage(64, 128, 2), conv_stage(128, 256, 3), conv_stage(256, 256, 2)]
    extractor = FeaturePyramid(stages, (64, 128, 256, 256), channels=64)
    return Backbone(extractor, two_fc(64 * 7 * 7, 256), 64, 256, roi_op='align', strides=STRIDES)
