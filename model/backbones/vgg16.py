"""VGG16, the paper's backbone (Ren et al. 2015, sec. 4; Simonyan & Zisserman 2015): its 13 conv
layers (up to conv5_3, stride 16, 512 channels) are the shared features, fc6 and fc7 (4096) the
RoI head's classifier on 7 x 7 RoI max pooling."""
import torchvision
from torch import nn

from model.backbones.base import Backbone, load_pretrained

N_FROZEN_LAYERS = 10  # conv1_1..conv2_2 with their ReLUs and pools: fixed, as in the paper


def build(weights=None):
    """weights: torchvision's VGG16 state dict file, the one misc/convert_caffe_pretrain.py
    writes, or 'imagenet'; None leaves random weights."""
    vgg = torchvision.models.vgg16(weights=None)
    if weights is not None:
        load_pretrained(vgg, weights, 'vgg16', skip=('classifier.6.',))  # fc8: ImageNet's
    extractor = nn.Sequential(*list(vgg.features)[:30])  # the last max pool dropped
    # Dropout is off: the original port found it does not help at this batch size.
    classifier = nn.Sequential(vgg.classifier[0], nn.ReLU(inplace=True),
                               vgg.classifier[3], nn.ReLU(inplace=True))
    extractor[:N_FROZEN_LAYERS].requires_grad_(False)  # no gradient: training leaves them fixed
    return Backbone(extractor, classifier, 512, 4096)
