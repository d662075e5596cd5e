"""misc/convert_sfr_checkpoint.py: a checkpoint in the original port's layout, written here from
our model's weights by the documented mapping, converts back to the same tensors and
detections."""
import pytest
import torch

from misc.convert_sfr_checkpoint import main as convert
from model.faster_rcnn import ModelOptions, build_faster_rcnn
from utils.checkpoint import load_checkpoint, load_detector

pytestmark = pytest.mark.slow  # two VGG16 detectors (137M parameters each) written and read


def ours_to_sfr(state, use_drop):
    """Our VGG16 state dict in the port's layout: loc rows as (dy, dx, dh, dw) per anchor and
    class; with use_drop, fc7 at head.classifier.3 (a dropout layer before it)."""
    sfr = {}
    for key, value in state.items():
        if key.startswith(('rpn.loc.', 'head.cls_loc.')):
            value = value.unflatten(0, (-1, 4))[:, [1, 0, 3, 2]].flatten(0, 1)
        if use_drop and key.startswith('head.classifier.2.'):
            key = key.replace('.2.', '.3.')
        sfr[key] = value.clone()
    return sfr


@pytest.mark.parametrize('use_drop, caffe', [(False, False), (True, True)])
def test_the_ports_checkpoint_converts_to_the_same_tensors_and_detections(tmp_path, use_drop,
                                                                           caffe):
    torch.manual_seed(0)
    options = ModelOptions('vgg16', min_size=96, max_size=128,
                           normalization='caffe' if caffe else 'torchvision')
    model = build_faster_rcnn(20, options).eval()
    ours = model.state_dict()
    torch.save({'model': ours_to_sfr(ours, use_drop), 'config': {'caffe_pretrain': caffe},
                'other_info': {}}, tmp_path / 'sfr.pth')
    convert(str(tmp_path / 'sfr.pth'), out=str(tmp_path / 'ours.pt'))

    state = load_checkpoint(tmp_path / 'ours.pt')
    assert state['class_names'][0] == 'aeroplane' and len(state['class_names']) == 20
    assert state['model_options']['normalization'] == ('caffe' if caffe else 'torchvision')
    assert state['model'].keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(state['model'][key], value), key

    converted, _ = load_detector(state, min_size=96, max_size=128)
    image = torch.randint(0, 256, (3, 100, 140), generator=torch.Generator().manual_seed(1))
    # every box: random weights score each class about 1/21, under the usual 0.05
    found = converted.predict([image.float()], score_thresh=0.0)
    expected = model.predict([image.float()], score_thresh=0.0)
    assert len(expected[0][0]) > 0
    for a, b in zip(found, expected, strict=True):
        assert torch.equal(a[0], b[0])


def test_a_file_that_is_not_the_ports_checkpoint_is_named(tmp_path):
    torch.save({'weights': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=r"other.pth is not a simple-faster-rcnn-pytorch "
                                         r"checkpoint: it has no 'model'"):
        convert(str(tmp_path / 'other.pth'), out=str(tmp_path / 'out.pt'))
    torch.save({'model': {'head.score.weight': torch.zeros(21, 8)}}, tmp_path / 'small.pth')
    with pytest.raises(ValueError, match=r"small.pth is not the port's VGG16 model: "):
        convert(str(tmp_path / 'small.pth'), out=str(tmp_path / 'out.pt'))
    assert not (tmp_path / 'out.pt').exists()
