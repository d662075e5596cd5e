import json

import pytest
import torch

from misc.benchmark import STAGES, StageClock, main, synthetic_batch, torchvision_twin
from model.faster_rcnn import ModelOptions, build_faster_rcnn
from model.ops.speed import WinogradConv2d, speed_up
from model.transform import normalize


@pytest.mark.slow
def test_smoke_tiny_images(tmp_path, capsys):
    # 64x96: a 4x6 feature map, seconds per run; the no-proposal path is tested below.
    out = tmp_path / 'b.json'
    main(height=64, width=96, repeat=1, warmup=0, n_class=2, out=str(out), threads=2,
         loader_images=3)
    result = json.loads(out.read_text())
    assert result['device'] == 'cpu'
    for step in ('inference', 'train'):
        for key in ('ours_ms', 'torchvision_ms', 'torchvision_our_convs_ms',
                    'torchvision_our_settings_ms', 'ratio', 'ratio_same_tricks', 'layout_gain',
                    'allocator_gain'):
            assert isinstance(result[step][key], float) and result[step][key] > 0
        r = result[step]
        assert r['ratio'] == r['ours_ms'] / r['torchvision_ms']  # one run: its ratio
        assert result['images_per_s'][step]['ours'] == pytest.approx(1e3 / r['ours_ms'])
    assert result['train']['optimizer_gain'] > 0
    r = result['train']
    assert r['allocator_gain'] == r['torchvision_our_settings_ms'] / r[
        'torchvision_our_convs_fused_ms']
    assert set(result['loader_images_per_s']) == {'0', '1', '2'}  # JSON keys: workers
    assert all(v > 0 for v in result['loader_images_per_s'].values())
    inference, train = result['breakdown']['inference'], result['breakdown']['train']
    assert {'preprocess', 'backbone', 'rpn', 'rpn.proposals', 'head', 'head.roi_pool',
            'postprocess', 'total'} <= set(inference)
    assert {'anchor_targets', 'proposal_targets', 'backward', 'optimizer_step'} <= set(train)
    assert set(inference) | set(train) <= set(STAGES)
    # Stages run one after another inside the whole, and parts inside their stage.
    assert inference['backbone'] + inference['rpn'] + inference['head'] < inference['total']
    assert inference['rpn.proposals'] < inference['rpn']
    assert train['forward'] + train['backward'] + train['optimizer_step'] <= train['total']
    assert result['settings']['height'] == 64 and result['settings']['repeat'] == 1
    printed = capsys.readouterr().out
    assert '| inference |' in printed and '| train step |' in printed
    assert '| training samples/s (500x375 JPEG -> 600x800) |' in printed


def test_torchvision_twin_matches_our_weights_and_sizes():
    torch.manual_seed(0)
    ours = speed_up(build_faster_rcnn(3, ModelOptions('vgg16', min_size=64, max_size=96)))
    winograd = [name for name, m in ours.named_modules() if type(m) is WinogradConv2d]
    assert len(winograd) == 14  # 13 convs and the RPN's; torchvision's users run them direct:
    assert not any(type(m) is WinogradConv2d for m in torchvision_twin(ours, 64, 96).modules())
    torch.manual_seed(0)
    ours = build_faster_rcnn(3, ModelOptions('vgg16', min_size=64, max_size=96))
    theirs = torchvision_twin(ours, 64, 96).eval()
    images, bboxes, labels = synthetic_batch(1, 64, 96, 3, seed=0)
    image_list, _ = theirs.transform([images[0] / 255])
    assert image_list.tensors.shape == (1, 3, 64, 96)  # no resize, no padding
    torch.testing.assert_close(image_list.tensors, normalize(images, 'torchvision'))
    with torch.no_grad():
        features = ours.extractor(image_list.tensors)
        torch.testing.assert_close(theirs.backbone(image_list.tensors), features)
        # their one-logit objectness is our fg - bg logit, so sigmoid == our softmax
        hidden = torch.relu(ours.rpn.conv1(features))
        ours_fg = ours.rpn.score(hidden).unflatten(1, (-1, 2)).softmax(dim=2)[:, :, 1]
        theirs_fg = theirs.rpn.head([features])[0][0].sigmoid()
        torch.testing.assert_close(theirs_fg, ours_fg)
    frozen = [name for name, p in theirs.backbone.named_parameters() if not p.requires_grad]
    assert frozen == [name for name, p in ours.extractor.named_parameters()
                      if not p.requires_grad] and len(frozen) == 8  # conv1_1..conv2_2
    assert theirs.rpn.min_size == 16
    assert bboxes[0].shape == (3, 4) and labels[0].tolist() == [0, 1, 2]


def test_no_proposals_gives_no_boxes_on_both_sides():
    torch.manual_seed(0)
    ours = build_faster_rcnn(2, ModelOptions('vgg16', rpn_min_size=1000, min_size=64,
                                             max_size=96))  # every proposal is under 1000 px
    theirs = torchvision_twin(ours, 64, 96).eval()
    images, _, _ = synthetic_batch(1, 64, 96, 2, seed=0)
    assert ours.predict(list(images))[0][0].shape == (0, 4)
    with torch.no_grad():
        assert theirs([images[0] / 255])[0]['boxes'].shape == (0, 4)


def test_stage_clock_times_and_restores():
    class Adder:
        def __call__(self, x):
            return x + 1

    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.adder = Adder()

        def forward(self, x):
            return self.adder(x) * 2

    owner = Owner()
    adder = owner.adder
    clock = StageClock(lambda: None)
    clock.wrap('forward', owner, 'forward')
    clock.wrap('adder', owner, 'adder')
    assert owner(torch.tensor(1.0)) == 4 and owner(torch.tensor(2.0)) == 6
    assert set(clock.ms) == {'forward', 'adder'} and clock.ms['adder'] <= clock.ms['forward']
    clock.restore()
    assert owner.adder is adder and 'forward' not in vars(owner)
    before = dict(clock.ms)
    assert owner(torch.tensor(1.0)) == 4 and clock.ms == before


def test_twin_of_a_c4_backbone_pools_as_ours():
    # RoIAlign (aligned, adaptive sampling) on 14 x 14 crops, then our conv5 head on both sides
    torch.manual_seed(0)
    ours = build_faster_rcnn(3, ModelOptions('mobilenet_v3', min_size=64, max_size=96)).eval()
    theirs = torchvision_twin(ours, 64, 96).eval()
    pool = theirs.roi_heads.box_roi_pool
    assert pool.align and pool.output_size == (14, 14)
    features = torch.randn(1, 112, 4, 6)
    rois = torch.tensor([[0.0, 3, 5, 40, 50], [0, 20, 10, 90, 60]])
    with torch.no_grad():
        torch.testing.assert_close(pool({'0': features}, [rois[:, 1:]], None),
                                   ours.head.pool(features, rois))
        torch.testing.assert_close(
            theirs.roi_heads.box_head(ours.head.pool(features, rois)),
            ours.head.classifier(ours.head.pool(features, rois).flatten(1)))


@pytest.mark.slow
def test_smoke_fpn_against_torchvisions_own(tmp_path):
    out = tmp_path / 'b.json'
    main(height=64, width=96, repeat=1, warmup=0, n_class=2, out=str(out), threads=2,
         extractor='resnet50_fpn', loader_images=0)
    result = json.loads(out.read_text())
    assert result['settings']['extractor'] == 'resnet50_fpn'
    assert all(result[step]['ratio'] > 0 for step in ('inference', 'train'))
    assert 'head.roi_pool' in result['breakdown']['inference']
