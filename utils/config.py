"""Every option of a run, its default and why: one dataclass, built once in train.py.

Config is four groups of options, each a dataclass whose docstring says what every option does
(`python train.py train --help` prints them): DataOptions, the model's own ModelOptions
(model/faster_rcnn.py, which a checkpoint stores) with the starting weights, SolverOptions and
RunOptions. Options left at None take a default that depends on others, an explicit one always
winning: the extractor's (model.faster_rcnn.EXTRACTOR_DEFAULTS, SOLVER_DEFAULTS), the
dataset's (DATASET_DEFAULTS: the toy dataset trains a small extractor on small images so that
it learns on a CPU in minutes), then the paper's (model.faster_rcnn.PAPER_DEFAULTS).

Values arrive from the command line through fire, which hands over strings, numbers, lists or
tuples as it guesses them (``--amp=false`` is the string 'false', ``--epochs=1.5`` a float).
``Config.parse_options`` turns each into its field's type or raises an error that names the
option and the value.
"""
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass

from data.dataset import DATASETS
from model.backbones import BACKBONES
from model.faster_rcnn import EXTRACTOR_DEFAULTS, PAPER_DEFAULTS, ModelOptions
from model.ops import BACKENDS
from model.ops.backend import cupy_problem
from model.transform import NORMALIZATION

# Per-dataset values for the options whose default is None. The toy's images give about 3,000
# anchors where the paper's give 20,000: proposals and RoIs scaled down (64 RoIs an image as in
# Fast R-CNN), which makes a training step 37% faster (test mAP 0.92-0.94 on two seeds, 0.95
# with the paper's counts; docs/performance.md).
DATASET_DEFAULTS = {
    'toy': dict(extractor='small', min_size=256, max_size=400, anchor_scales=(2, 4, 8),
                n_train_pre_nms=1000, n_train_post_nms=600, roi_n_sample=64,
                epochs=10, lr_milestones=(7,), num_workers=0, plot_every=50),
    'voc': dict(extractor='vgg16', epochs=14, lr_milestones=(9,), num_workers=2, plot_every=40),
}
# Solver settings per extractor. VGG16: the paper's Caffe solver. The small extractors have
# BatchNorm and learn from scratch: a 10x larger lr. ResNet and MobileNet: tf-faster-rcnn's
# (lr 1e-3 at batch 1, weight decay 1e-4 and 4e-5, biases at the weights' lr). FPN:
# torchvision's (Detectron's, mmdetection's 1x): lr 0.02 for 16 images, scaled by the batch.
CAFFE_SOLVER = dict(lr=1e-3, weight_decay=5e-4, double_bias=True, lr_scaling='none')
TF_SOLVER = dict(lr=1e-3, weight_decay=1e-4, double_bias=False, lr_scaling='none')
FPN_SOLVER = dict(lr=0.00125, weight_decay=1e-4, double_bias=False, lr_scaling='linear')
SOLVER_DEFAULTS = {
    'vgg16': CAFFE_SOLVER, 'small': {**CAFFE_SOLVER, 'lr': 0.01},
    'small_fpn': {**CAFFE_SOLVER, 'lr': 0.01}, 'resnet50': TF_SOLVER, 'resnet101': TF_SOLVER,
    'mobilenet_v3': {**TF_SOLVER, 'weight_decay': 4e-5},
    'resnet50_fpn': FPN_SOLVER, 'resnet101_fpn': FPN_SOLVER,
}

# The valid values of the options with a fixed set of them, from the modules that take them.
CHOICES = {
    'dataset': DATASETS, 'extractor': BACKBONES, 'normalization': tuple(NORMALIZATION),
    'backend': BACKENDS, 'metric': ('voc', 'coco'), 'pretrained': ('imagenet',),
    'optimizer': ('sgd', 'adam'), 'device': ('auto', 'cpu', 'cuda'),
    'lr_scaling': ('none', 'linear'),
}
# What a resumed run cannot change: the model's shape and the weights it came from, the
# optimizer's kind, what decides the held-out split (the best epoch must be chosen on the
# same images throughout, none of which were trained on), and where the run lives.
FIXED_ON_RESUME = ('dataset', 'class_names', 'extractor', 'anchor_scales', 'anchor_ratios',
                   'normalization', 'caffe_pretrain', 'caffe_pretrain_path', 'pretrained_path',
                   'pretrained', 'optimizer', 'seed', 'n_val_images', 'out_dir', 'run_name')
# Numeric options that must lie in a range (None, where allowed, is not checked): (the range in
# words, the options, its test).
RANGES = (
    ('positive', ('lr', 'min_size', 'max_size', 'epochs', 'batch_size', 'rpn_n_sample',
                  'roi_n_sample', 'plot_every', 'n_test_post_nms', 'n_train_post_nms',
                  'n_train_pre_nms', 'n_test_pre_nms', 'test_n_images'), lambda v: v > 0),
    ('>= 0', ('weight_decay', 'momentum', 'n_val_images', 'num_workers', 'rpn_min_size',
              'eval_score_thresh'), lambda v: v >= 0),
    ('in (0, 1]', ('rpn_pos_ratio', 'roi_pos_ratio', 'rpn_nms_thresh', 'eval_nms_thresh',
                   'lr_decay', 'rpn_pos_iou_thresh', 'roi_pos_iou_thresh'), lambda v: 0 < v <= 1),
    ('in 1..65535', ('visdom_port',), lambda v: 0 < v < 65536),
)
TRUE_WORDS, FALSE_WORDS = ('true', 'yes', '1', 'on'), ('false', 'no', '0', 'off')


def option_name(name):
    """The command-line spelling of a field: n_val_images -> --n-val-images."""
    return '--' + name.replace('_', '-')


def _scalar(name, kind, value):
    """value as kind (bool, int, float or str), or a ValueError naming the option."""
    flag = f'{option_name(name)}={value!r}'
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f'{flag}: expected one value, not a list')
    if kind is bool:
        word = str(value).strip().lower()  # fire's True and False too
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f'{flag} is not a boolean; use true or false (or yes/no, 1/0)')
        return word in TRUE_WORDS
    if kind is str:
        if isinstance(value, bool):  # fire's value for a flag given without '=value'
            raise ValueError(f'{option_name(name)} needs a value ({option_name(name)}=...)')
        return str(value)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise ValueError(f'{flag} is not a {"whole " if kind is int else ""}number')
    return int(number) if kind is int else number


def field_kind(annotation):
    """(the type of each value, whether there can be several) of a field or argument:
    tuple[float, ...] | None -> (float, True)."""
    if isinstance(annotation, types.UnionType):  # X | None
        annotation = next(k for k in typing.get_args(annotation) if k is not type(None))
    many = typing.get_origin(annotation) is tuple
    return (typing.get_args(annotation)[0] if many else annotation), many


def _coerce(name, annotation, value):
    """value as the field's type: X | None, bool, int, float, str or tuple[X, ...]."""
    if type(None) in typing.get_args(annotation) and str(value).lower() == 'none':
        return None  # None, or fire's string for it, where None is allowed
    kind, many = field_kind(annotation)
    if not many:
        return _scalar(name, kind, value)
    if isinstance(value, str):  # --class-names=cat,dog that fire left as one string
        value = [v.strip() for v in value.split(',')] if value.strip() else []
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f'{option_name(name)} needs at least one value')
    if '' in values:
        raise ValueError(f'{option_name(name)}={",".join(map(str, values))} has an empty '
                         'value; remove the extra comma')
    return tuple(_scalar(name, kind, v) for v in values)


# Options whose None default is filled in from the dataset, the extractor or the paper.
DERIVED = {*PAPER_DEFAULTS, *(k for d in (*DATASET_DEFAULTS.values(), *SOLVER_DEFAULTS.values())
                              for k in d), 'normalization', 'metric'}


def options_help(obj, names=None):
    """--help's lines for the options documented in a function's 'Args:' or a dataclass's
    'Attributes:' (entries '    name: text', continued on lines indented by 8), or those of
    them in names: each option's spelling with the type of its value, then its text and
    default, indented."""
    section = 'Attributes' if isinstance(obj, type) else 'Args'
    entries = inspect.getdoc(obj).partition(f'{section}:\n')[2].split('\n\n')[0]
    parameters = inspect.signature(obj).parameters  # a dataclass's: its fields
    for name, text in re.findall(r'^ {4}(\w+): (.*(?:\n {8}.*)*)', entries, re.M):
        if names is not None and name not in names:
            continue
        kind, many = field_kind(parameters[name].annotation)
        value = ('{' + ','.join(CHOICES[name]) + '}' if name in CHOICES
                 else kind.__name__.upper() + (',...' if many else ''))
        default = parameters[name].default
        if isinstance(default, tuple):
            default = ','.join(map(str, default))
        note = (' [required]' if default is inspect.Parameter.empty else
                ' [default: by dataset and extractor]' if default is None and name in DERIVED else
                '' if default is None else f' [default: {default}]')
        yield f'  {option_name(name)}={value}'
        yield from textwrap.wrap(' '.join(text.split()) + note, 96, initial_indent=' ' * 6,
                                 subsequent_indent=' ' * 6)


@dataclass
class DataOptions:
    """Where the images and boxes come from.

    Attributes:
        dataset: toy (generated), voc07, voc0712, custom (your VOC-format folder), coco (a
            COCO JSON) or coco2017
        voc_data_dir: the VOCdevkit (voc07, voc0712) or your VOC-format folder (custom)
        coco_json: --dataset=coco: one COCO JSON, split 80/20 unless --coco-test-json is given
        coco_test_json: --dataset=coco: the test split's COCO JSON
        image_dir: --dataset=coco: the JSON's images (default: the JSON's folder)
        coco_dir: --dataset=coco2017: the folder of annotations/, train2017/ and val2017/
        class_names: the classes, e.g. cat,dog (default: every object name in the annotations)
        skip_bad: skip unreadable images and malformed annotations with a warning each
        use_difficult: train on 'difficult' objects too (the paper does not)
        n_val_images: training images held out for the per-epoch mAP (default: 10%, <= 300)
        num_workers: DataLoader worker processes
    """
    dataset: str = 'toy'
    voc_data_dir: str | None = None
    coco_json: str | None = None
    coco_test_json: str | None = None
    image_dir: str | None = None
    coco_dir: str | None = None
    class_names: tuple[str, ...] | None = None
    skip_bad: bool = False
    use_difficult: bool = False
    n_val_images: int | None = None
    num_workers: int | None = None


@dataclass
class WeightOptions:
    """The weights training starts from (default: random).

    Attributes:
        caffe_pretrain: the caffe VGG16 the paper started from (implies vgg16 and caffe
            normalization; misc/convert_caffe_pretrain.py makes the file)
        caffe_pretrain_path: where --caffe-pretrain finds it
        pretrained_path: a torchvision state dict of the extractor's network (default vgg16)
        pretrained: imagenet: torchvision's published weights of it (downloaded)
    """
    caffe_pretrain: bool = False
    caffe_pretrain_path: str = 'weights/vgg16_caffe.pth'
    pretrained_path: str | None = None
    pretrained: str | None = None


@dataclass
class SolverOptions:
    """How the weights are trained.

    Attributes:
        optimizer: sgd or adam
        lr: learning rate of the weights (paper: 1e-3 at batch 1)
        lr_scaling: linear: lr x images per step over all processes (Goyal et al. 2017)
        momentum: SGD momentum
        weight_decay: L2 penalty of the weights, not the biases (paper: 5e-4)
        double_bias: biases at 2x lr, as in the Caffe solver (VGG16)
        lr_decay: lr factor at each milestone
        lr_milestones: epochs after which lr is multiplied by lr_decay (paper: 9)
        epochs: passes over the training images (paper: 14)
        batch_size: images per step and process (paper: 1)
        amp: mixed precision: bfloat16 on CPUs, float16 with a gradient scaler on CUDA
    """
    optimizer: str = 'sgd'
    lr: float | None = None
    lr_scaling: str | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    double_bias: bool | None = None
    lr_decay: float = 0.1
    lr_milestones: tuple[int, ...] | None = None
    epochs: int | None = None
    batch_size: int = 1
    amp: bool = False


@dataclass
class RunOptions:
    """Where and how a run goes.

    Attributes:
        device: auto (CUDA where there is one), cpu or cuda
        seed: fixes the initial weights, the held-out images, the order, flips and sampling
        out_dir: the folder of run folders
        run_name: this run's folder in it (default: <dataset>-<time>); never reused
        resume: a run folder or checkpoint to continue exactly
        metric: voc (VOC07 11-point mAP, the paper's) or coco (COCO AP; default on COCO data)
        test_n_images: evaluate on the first n test images only (quick checks)
        compile: torch.compile the extractor (see README for when it pays)
        plot_every: steps between loss records and plots
        visdom: plot losses and boxes in visdom (a missing server only warns)
        env: the visdom environment
        visdom_server: the visdom server's address
        visdom_port: the visdom server's port
    """
    device: str = 'auto'
    seed: int = 0
    out_dir: str = 'runs'
    run_name: str | None = None
    resume: str | None = None
    metric: str | None = None
    test_n_images: int | None = None
    compile: bool = False
    plot_every: int | None = None
    visdom: bool = True
    env: str = 'frcnn'
    visdom_server: str = 'http://127.0.0.1'
    visdom_port: int = 8097


# --help's groups, in order: (title, the dataclasses whose fields it lists)
GROUPS = (('data', (DataOptions,)), ('model', (ModelOptions, WeightOptions)),
          ('solver', (SolverOptions,)), ('run', (RunOptions,)))


@dataclass
class Config(RunOptions, SolverOptions, WeightOptions, ModelOptions, DataOptions):
    """Every option of a run (the groups above); see the module docstring for defaults."""

    def __post_init__(self):
        """Types every option, fills in the defaults that depend on others and checks the
        result."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, _coerce(field.name, field.type, getattr(self, field.name)))
        # the starting weights: at most one, and only for an extractor they fit
        given = [option_name(name) for name in ('caffe_pretrain', 'pretrained_path', 'pretrained')
                 if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f'{given[0]} and {given[1]} both give the starting weights; keep one')
        if self.caffe_pretrain and self.extractor not in (None, 'vgg16'):
            raise ValueError(f'--caffe-pretrain holds VGG16 weights, but --extractor='
                             f'{self.extractor}; drop one of the two')
        if given and self.extractor in ('small', 'small_fpn'):
            raise ValueError(f'{given[0]} gives pre-trained weights, but --extractor='
                             f'{self.extractor} has none; drop one of the two')
        # the defaults: the extractor's, the dataset's, then the paper's; weights name their
        # backbone: the paper's, unless --extractor says otherwise
        dataset = DATASET_DEFAULTS['toy' if self.dataset == 'toy' else 'voc']
        self.extractor = self.extractor or ('vgg16' if given else dataset['extractor'])
        defaults = {**dataset, **EXTRACTOR_DEFAULTS.get(self.extractor, {}),
                    **SOLVER_DEFAULTS.get(self.extractor, {}),  # a bad one: refused below
                    'normalization': 'caffe' if self.caffe_pretrain else None,  # None: the paper's
                    'metric': 'coco' if self.dataset.startswith('coco') else 'voc'}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        ModelOptions.__post_init__(self)  # the paper's values for the rest
        # every value valid, and consistent with the others
        for name, valid in CHOICES.items():
            if getattr(self, name) not in (*valid, None):  # None: not given, where optional
                raise ValueError(f'{option_name(name)}={getattr(self, name)!r} is not valid; '
                                 f'choose one of {", ".join(valid)}')
        for what, names, check in RANGES:
            for name in names:
                value = getattr(self, name)
                if value is not None and not check(value):
                    raise ValueError(f'{option_name(name)} must be {what}, got {value!r}')
        if self.min_size > self.max_size:
            raise ValueError(f'--min-size ({self.min_size}) must not exceed '
                             f'--max-size ({self.max_size})')
        if any(s <= 0 for s in self.anchor_scales + self.anchor_ratios):
            raise ValueError('--anchor-scales and --anchor-ratios must be positive numbers')
        if self.class_names is not None and len(set(self.class_names)) < len(self.class_names):
            raise ValueError(f'--class-names={list(self.class_names)} names a class twice')
        if self.caffe_pretrain and self.normalization != 'caffe':
            raise ValueError('--caffe-pretrain needs --normalization=caffe (the caffe VGG16 '
                             'expects BGR 0..255 minus the pixel means)')

    def check_data_dir(self):
        """The data the dataset needs must exist (the toy dataset makes its own)."""
        need = {'coco': 'coco_json', 'coco2017': 'coco_dir'}.get(self.dataset, 'voc_data_dir')
        if self.dataset != 'toy' and getattr(self, need) is None:
            raise ValueError(f'--dataset={self.dataset} needs {option_name(need)}=<path>')
        for name in ('voc_data_dir', 'coco_json', 'coco_test_json', 'image_dir', 'coco_dir'):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ValueError(f'{option_name(name)}: nothing at {path!r}')

    def n_val(self, n_images):
        """Images held out of a training split of n_images: --n-val-images, or by default
        10% of the split and at most 300, so that a small split still trains on 90% of it."""
        default = min(300, round(0.1 * n_images))
        if self.n_val_images is not None and 2 * self.n_val_images > n_images:
            raise ValueError(
                f'--n-val-images={self.n_val_images} would hold out more than half of the '
                f'{n_images} images of the training split for validation; use '
                f'--n-val-images={default} (10%) or 0 (no validation: best.pt is the last epoch)')
        return default if self.n_val_images is None else self.n_val_images

    def model_options(self):
        """The ModelOptions part: what build_faster_rcnn takes and a checkpoint stores."""
        return ModelOptions(*(getattr(self, f.name) for f in dataclasses.fields(ModelOptions)))

    @classmethod
    def parse_options(cls, kwargs):
        """fire's keyword arguments -> {field name: value of the field's type}.

        An unknown option or a value of the wrong type raises an error naming it.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        options = {}
        for key, value in kwargs.items():
            name = key.replace('-', '_')
            if name not in fields:
                close = difflib.get_close_matches(name, sorted(fields), n=3)
                hint = f'; did you mean {", ".join(map(option_name, close))}?' if close else ''
                raise ValueError(f'unknown option {option_name(name)}{hint}')
            options[name] = _coerce(name, fields[name].type, value)
        return options

    @classmethod
    def from_kwargs(cls, need_data=True, **kwargs):
        """Builds a Config from fire's keyword arguments (see parse_options).

        ``need_data=False`` skips the data-folder check (loading a model to detect with).
        --backend=cupy needs CuPy working on a GPU here (--backend=auto falls back).
        """
        cfg = cls(**cls.parse_options(kwargs))
        problem = cupy_problem() if cfg.backend == 'cupy' else None
        if problem:
            raise ValueError(f'--backend=cupy cannot run here ({problem}); use --backend=auto '
                             'or install CuPy (requirements-gpu.txt) on a machine with a GPU')
        if need_data:
            cfg.check_data_dir()
        return cfg

    def to_dict(self):
        return dataclasses.asdict(self)
