"""Backbones: the feature extractor under the RPN and the classifier inside the RoI head.

One file per backbone, each with a build(weights=None) that returns a base.Backbone; adding
one is a new file and a line in BUILDERS.
"""
from functools import partial

from model.backbones import fpn, mobilenet, resnet, small, vgg16
from model.backbones.base import FEAT_STRIDE, Backbone

BUILDERS = {'vgg16': vgg16.build, 'small': small.build, 'resnet50': partial(resnet.build, 50),
            'resnet101': partial(resnet.build, 101), 'mobilenet_v3': mobilenet.build,
            'resnet50_fpn': partial(fpn.build_resnet, 50),
            'resnet101_fpn': partial(fpn.build_resnet, 101), 'small_fpn': fpn.build_small}
BACKBONES = tuple(BUILDERS)

__all__ = ['BACKBONES', 'FEAT_STRIDE', 'Backbone', 'build_backbone']


def build_backbone(name, weights=None):
    """The Backbone `name` (one of BACKBONES); weights: a file or 'imagenet', None: random."""
    if name not in BUILDERS:
        raise ValueError(f'unknown backbone {name!r}; valid: {", ".join(BACKBONES)}')
    return BUILDERS[name](weights)
