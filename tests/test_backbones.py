import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from model.backbones import BACKBONES, FEAT_STRIDE, build_backbone
from model.faster_rcnn import build_faster_rcnn
from trainer import FasterRCNNTrainer
from utils.config import Config

NEW = ['resnet50', 'resnet101', 'mobilenet_v3']
TORCHVISION_NAME = {'resnet50': 'resnet50', 'resnet101': 'resnet101',
                    'mobilenet_v3': 'mobilenet_v3_large', 'resnet50_fpn': 'resnet50'}


@pytest.mark.parametrize('name', BACKBONES)
def test_shapes_stride_and_classifier(name):
    backbone = build_backbone(name)
    features = backbone.extractor(torch.randn(1, 3, 64, 96))
    if name.endswith('_fpn'):  # P2..P6, padded to 64 x 96 (a multiple of 32) first
        assert backbone.strides == (4, 8, 16, 32, 64)
        assert [f.shape for f in features] == [(1, backbone.channels, -(-64 // s), -(-96 // s))
                                               for s in backbone.strides]
    else:
        assert backbone.strides == (FEAT_STRIDE,)
        assert features.shape == (1, backbone.channels, 64 // FEAT_STRIDE, 96 // FEAT_STRIDE)
    pooled = torch.randn(3, backbone.channels * backbone.roi_size ** 2)
    assert backbone.classifier(pooled).shape == (3, backbone.features)


@pytest.mark.parametrize('name', NEW)
def test_c4_heads_freeze_batchnorm_and_the_stem(name):
    backbone = build_backbone(name)
    assert backbone.roi_op == 'align' and backbone.roi_size == 14
    modules = list(backbone.extractor.modules()) + list(backbone.classifier.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    first = next(backbone.extractor.parameters())  # the stem's first conv
    assert not first.requires_grad
    assert any(p.requires_grad for p in backbone.extractor.parameters())


@pytest.mark.parametrize('name', [*NEW, 'resnet50_fpn'])
def test_torchvision_weights_load_name_by_name(name, tmp_path):
    reference = getattr(torchvision.models, TORCHVISION_NAME[name])(weights=None)
    state = reference.state_dict()
    torch.save(state, tmp_path / 'w.pth')
    backbone = build_backbone(name, tmp_path / 'w.pth')
    conv = next(m for m in backbone.extractor.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv_key = next(k for k in state if k.endswith('weight') and state[k].dim() == 4)
    assert torch.equal(conv.weight, state[first_conv_key])
    bn_key = next(k for k in state if k.endswith('running_var'))
    del state[bn_key]
    torch.save(state, tmp_path / 'broken.pth')
    with pytest.raises(ValueError, match=rf'broken.pth is not a {TORCHVISION_NAME[name]} state '
                                         rf'dict: missing {bn_key}'):
        build_backbone(name, tmp_path / 'broken.pth')
    with pytest.raises(ValueError, match=f'no {TORCHVISION_NAME[name]} weights file at'):
        build_backbone(name, tmp_path / 'missing.pth')


@pytest.mark.filterwarnings('ignore:Detected call of')
@pytest.mark.parametrize('name', [*NEW, 'resnet50_fpn', 'small_fpn'])
def test_a_few_training_steps(name):
    torch.manual_seed(0)
    cfg = Config(extractor=name, min_size=64, max_size=96, anchor_scales=(2, 4),
                 roi_n_sample=16, lr=0.01)
    model = build_faster_rcnn(2, cfg.model_options())
    trainer = FasterRCNNTrainer(model, cfg)
    assert len(trainer.optimizer.param_groups[1]['params']) > 0
    bias_lr = 2 if cfg.double_bias else 1  # small_fpn: the Caffe solver, as small
    groups = trainer.optimizer.param_groups
    assert groups[1]['lr'] == bias_lr * groups[0]['lr']
    batch = dict(images=torch.randn(1, 3, 64, 96), sizes=torch.tensor([[64, 96]]),
                 bboxes=[torch.tensor([[10.0, 8, 50, 40]])], labels=[torch.tensor([1])],
                 scales=torch.tensor([1.0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        losses = trainer.train_step(batch)
        assert all(torch.isfinite(v) for v in losses.values())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith('head.classifier') for k in changed)  # conv5 / last blocks train
    bboxes, labels, scores = model.predict([torch.rand(3, 64, 96) * 255], score_thresh=0.0)
    assert len(bboxes[0]) == len(labels[0]) == len(scores[0]) > 0
