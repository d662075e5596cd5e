import json

import pytest

from utils.config import Config


def test_paper_defaults_for_voc(tmp_path):
    cfg = Config.from_kwargs(dataset='voc07', voc_data_dir=str(tmp_path))
    assert (cfg.min_size, cfg.max_size, cfg.anchor_scales) == (600, 1000, (8, 16, 32))
    assert (cfg.lr, cfg.epochs, cfg.lr_milestones, cfg.extractor) == (1e-3, 14, (9,), 'vgg16')
    assert cfg.normalization == 'torchvision'
    assert (cfg.rpn_n_sample, cfg.roi_n_sample, cfg.n_test_post_nms) == (256, 128, 300)


def test_toy_defaults_and_explicit_options_win():
    cfg = Config.from_kwargs(dataset='toy', lr=0.02, **{'min-size': 200})
    assert cfg.extractor == 'small' and cfg.lr == 0.02 and cfg.min_size == 200
    assert cfg.max_size == 400


def test_caffe_pretrain_selects_caffe_normalisation():
    assert Config(caffe_pretrain=True).normalization == 'caffe'
    with pytest.raises(ValueError, match='--caffe-pretrain needs --normalization=caffe'):
        Config(caffe_pretrain=True, normalization='torchvision')


def test_fire_lists_become_tuples():
    cfg = Config.from_kwargs(anchor_scales=[2, 4], lr_milestones=5)
    assert cfg.anchor_scales == (2, 4) and cfg.lr_milestones == (5,)


@pytest.mark.parametrize('kwargs, message', [
    (dict(lrr=0.1), r'unknown option --lrr; did you mean --lr'),
    (dict(lr=-1), '--lr must be positive'),
    (dict(min_size=800, max_size=600), r'--min-size \(800\) must not exceed --max-size \(600\)'),
    (dict(dataset='coco'), "--dataset='coco' is not valid; choose one of voc07, voc0712"),
    (dict(device='tpu'), '--device'),
    (dict(optimizer='rmsprop'), '--optimizer'),
    (dict(rpn_pos_ratio=1.5), r'--rpn_pos_ratio must be in \(0, 1\]'),
    (dict(anchor_scales=[0, 4]), 'must be positive numbers'),
    (dict(dataset='voc07'), '--dataset=voc07 needs --voc-data-dir'),
    (dict(dataset='custom', voc_data_dir='/no/such/folder'), "no folder at '/no/such/folder'"),
])
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config.from_kwargs(**kwargs)


def test_detect_does_not_need_the_data_folder():
    cfg = Config.from_kwargs(need_data=False, dataset='voc07', voc_data_dir='/gone')
    assert cfg.voc_data_dir == '/gone'


def test_save_round_trip(tmp_path):
    cfg = Config.from_kwargs(lr=0.005, anchor_scales=[4, 8])
    cfg.save(tmp_path / 'config.json')
    assert Config.from_kwargs(**json.loads((tmp_path / 'config.json').read_text())) == cfg
