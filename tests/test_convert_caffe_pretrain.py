import sys
from pathlib import Path

import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'misc'))
from convert_caffe_pretrain import main as convert  # noqa: E402

from model.faster_rcnn import ModelOptions, build_faster_rcnn  # noqa: E402


@pytest.fixture(scope='module')
def caffe_like(tmp_path_factory):
    """A synthetic file with the names and shapes of the converted caffe VGG16 (fc8 included)."""
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp('caffe') / 'vgg16-caffe.pth'
    torch.save(state, path)
    return path, state


def test_converted_weights_load_into_extractor_and_head(caffe_like, tmp_path):
    source, state = caffe_like
    out = tmp_path / 'weights' / 'vgg16_caffe.pth'
    convert(str(source), str(out))
    converted = torch.load(out, weights_only=True)
    assert 'classifier.6.weight' not in converted  # fc8 (1000 ImageNet classes) dropped
    assert len(converted) == 26 + 4  # 13 convs and fc6, fc7, each a weight and a bias
    model = build_faster_rcnn(20, ModelOptions('vgg16'), str(out))
    assert torch.equal(model.extractor[0].weight, state['features.0.weight'])  # conv1_1
    assert torch.equal(model.extractor[28].bias, state['features.28.bias'])  # conv5_3
    assert torch.equal(model.head.classifier[0].weight, state['classifier.0.weight'])  # fc6
    assert torch.equal(model.head.classifier[2].weight, state['classifier.3.weight'])  # fc7


def test_wrong_names_and_shapes_are_named(caffe_like, tmp_path):
    _, state = caffe_like
    bad = dict(state)
    bad['features.10.weight'] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match=r'features.10.weight has shape \(3, 3\), VGG16 needs '
                                         r'\(256, 128, 3, 3\)'):
        convert(str(tmp_path / 'bad.pth'), str(tmp_path / 'out.pth'))
    del bad['features.10.weight']
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match='bad.pth has no features.10.weight'):
        convert(str(tmp_path / 'bad.pth'), str(tmp_path / 'out.pth'))
    with pytest.raises(ValueError, match='no --source file at'):
        convert(str(tmp_path / 'missing.pth'), str(tmp_path / 'out.pth'))
    assert not (tmp_path / 'out.pth').exists()
