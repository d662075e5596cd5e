import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    (dict(dataset='lvis'), "--dataset='lvis' is not valid; choose one of voc07, voc0712"),
    (dict(dataset='coco'), '--dataset=coco needs --coco-json=<path>'),
    (dict(device='tpu'), '--device'),
    (dict(optimizer='rmsprop'), '--optimizer'),
    (dict(rpn_pos_ratio=1.5), r'--rpn-pos-ratio must be in \(0, 1\]'),
    (dict(anchor_scales=[0, 4]), 'must be positive numbers'),
    (dict(dataset='voc07'), '--dataset=voc07 needs --voc-data-dir'),
    (dict(dataset='custom', voc_data_dir='/no/such/folder'), "nothing at '/no/such/folder'"),
])
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config.from_kwargs(**kwargs)


def test_detect_does_not_need_the_data_folder():
    cfg = Config.from_kwargs(need_data=False, dataset='voc07', voc_data_dir='/gone')
    assert cfg.voc_data_dir == '/gone'


def test_json_round_trip():
    cfg = Config.from_kwargs(lr=0.005, anchor_scales=[4, 8])
    saved = json.loads(json.dumps(cfg.to_dict()))  # as config.json holds it: tuples are lists
    assert Config.from_kwargs(**saved) == cfg


def test_weights_select_their_backbone():
    """The reference port's `train --caffe-pretrain` trains VGG16 from the caffe weights, also
    on the toy dataset whose own default is the small extractor."""
    cfg = Config(caffe_pretrain=True)
    assert (cfg.extractor, cfg.normalization, cfg.lr) == ('vgg16', 'caffe', 1e-3)
    cfg = Config(pretrained_path='w.pth')
    assert (cfg.extractor, cfg.normalization) == ('vgg16', 'torchvision')
    assert Config().extractor == 'small' and Config().lr == 0.01
    for weights in (dict(caffe_pretrain=True), dict(pretrained_path='w.pth'),
                    dict(pretrained='imagenet')):
        with pytest.raises(ValueError, match='weights, but --extractor=small'):
            Config(extractor='small', **weights)
    with pytest.raises(ValueError, match='holds VGG16 weights, but --extractor=resnet50'):
        Config(extractor='resnet50', caffe_pretrain=True)
    cfg = Config(extractor='resnet50', pretrained_path='r.pth')
    assert (cfg.lr, cfg.weight_decay, cfg.double_bias) == (1e-3, 1e-4, False)
    assert Config(pretrained='imagenet').extractor == 'vgg16'
    with pytest.raises(ValueError, match='--pretrained-path and --pretrained both give'):
        Config(pretrained_path='w.pth', pretrained='imagenet')


@pytest.mark.parametrize('word, value', [
    ('false', False), ('False', False), ('NO', False), ('0', False), (0, False), ('off', False),
    ('true', True), ('Yes', True), ('1', True), (1, True), (True, True), ('ON', True)])
def test_booleans_from_the_command_line(word, value):
    cfg = Config.from_kwargs(skip_bad=word, visdom=word, amp=word, use_difficult=word)
    assert cfg.skip_bad is cfg.visdom is cfg.amp is cfg.use_difficult is value


def test_numbers_and_lists_from_the_command_line():
    cfg = Config.from_kwargs(epochs=3.0, lr='2e-3', n_train_pre_nms=1e3, class_names='cat,dog',
                             run_name=2007, lr_milestones='4,6')
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int) and cfg.lr == 0.002
    assert cfg.n_train_pre_nms == 1000 and isinstance(cfg.n_train_pre_nms, int)
    assert cfg.class_names == ('cat', 'dog') and cfg.run_name == '2007'
    assert cfg.lr_milestones == (4, 6)
    assert Config.from_kwargs(class_names=['cat']).class_names == ('cat',)
    assert Config.from_kwargs(run_name=None, n_val_images='None').n_val_images is None


@pytest.mark.parametrize('kwargs, message', [
    (dict(epochs=1.5), r"--epochs=1\.5 is not a whole number"),
    (dict(epochs='abc'), r"--epochs='abc' is not a whole number"),
    (dict(epochs=True), r'--epochs=True is not a whole number'),
    (dict(lr='fast'), r"--lr='fast' is not a number"),
    (dict(lr=float('nan')), r'--lr=nan is not a number'),
    (dict(amp='maybe'), r"--amp='maybe' is not a boolean; use true or false"),
    (dict(skip_bad=2), r'--skip-bad=2 is not a boolean'),
    (dict(lr_milestones=[4, 'x']), r"--lr-milestones='x' is not a whole number"),
    (dict(run_name=True), r'--run-name needs a value'),
    (dict(seed=[1, 2]), r'--seed=\[1, 2\]: expected one value, not a list'),
    (dict(class_names='a,b,a'), r"--class-names=\['a', 'b', 'a'\] names a class twice"),
    (dict(class_names=[]), r'--class-names needs at least one value'),
    (dict(test_n_images=0), r'--test-n-images must be positive'),
    (dict(visdom_port=70000), r'--visdom-port must be in 1\.\.65535'),
])
def test_bad_values_name_the_option_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config.from_kwargs(**kwargs)


@given(st.one_of(st.text(max_size=6), st.floats(allow_nan=True), st.integers(-3, 3),
                 st.booleans(), st.none()))
def test_any_value_is_typed_or_refused_by_name(value):
    """Whatever fire hands over, an int option ends up an int or the error names it."""
    try:
        cfg = Config.from_kwargs(epochs=value)
    except ValueError as e:
        assert str(e).startswith('--epochs')
    else:
        assert type(cfg.epochs) is int and cfg.epochs > 0


def test_validation_hold_out_scales_with_the_split():
    cfg = Config()
    assert [cfg.n_val(n) for n in (4, 20, 300, 5011, 16551)] == [0, 2, 30, 300, 300]
    assert Config(n_val_images=0).n_val(50) == 0 and Config(n_val_images=25).n_val(50) == 25
    with pytest.raises(ValueError, match=r'--n-val-images=300 would hold out more than half of '
                                         r'the 250 images .* use --n-val-images=25 \(10%\) or 0'):
        Config(n_val_images=300).n_val(250)


def test_model_options_are_the_config_fields_a_checkpoint_stores():
    import dataclasses

    from model.faster_rcnn import ModelOptions
    options = Config().model_options()
    assert type(options) is ModelOptions
    assert dataclasses.asdict(options) == {
        f.name: getattr(Config(), f.name) for f in dataclasses.fields(ModelOptions)}
    assert options.eval_nms_thresh == 0.3 and options.extractor == 'small'
    assert ModelOptions(**dataclasses.asdict(options)) == options  # what load_detector does


def test_an_unknown_extractor_is_named_on_any_dataset():
    """It has no defaults of its own to fill in; the error names the option and the choices."""
    for dataset in ('toy', 'voc07'):
        with pytest.raises(ValueError, match=r"--extractor='vgg17' is not valid; choose one of "):
            Config(dataset=dataset, extractor='vgg17')


def test_options_help_reads_a_dataclass_or_a_function():
    """--help's lines: the spelling and type of each documented option (those named, where
    names are given), then its text and default, wrapped and indented."""
    from utils.config import SolverOptions, options_help

    def verb(path: str, out: str = 'x.onnx', scales: tuple[float, ...] | None = None):
        """Does it.

        Args:
            path: where it is
            out: what it writes
            scales: the scales
        """
    assert list(options_help(SolverOptions, ('momentum', 'lr_milestones'))) == [
        '  --momentum=FLOAT', '      SGD momentum [default: 0.9]', '  --lr-milestones=INT,...',
        '      epochs after which lr is multiplied by lr_decay (paper: 9) [default: by dataset and',
        '      extractor]']
    assert list(options_help(verb)) == [
        '  --path=STR', '      where it is [required]', '  --out=STR',
        '      what it writes [default: x.onnx]', '  --scales=FLOAT,...', '      the scales']
