"""Every option of a run, its default and why: one dataclass, built once in train.py.

Defaults are the paper's and the original Caffe port's; the model/ file that uses each says
where it comes from. Fields left at ``None`` take a default that depends on other options:
``DATASET_DEFAULTS`` (the toy dataset trains a small extractor on small images so that it
learns on a CPU in minutes), ``EXTRACTOR_DEFAULTS``, and weights files that name their backbone
(--caffe-pretrain and --pretrained-path hold VGG16). An explicit option always wins.

Values arrive from the command line through fire, which hands over strings, numbers, lists or
tuples as it guesses them (``--amp=false`` is the string 'false', ``--epochs=1.5`` a float).
``Config.parse_options`` turns each into its field's type or raises an error that names the
option and the value.
"""
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass

# Per-dataset values for the fields whose default is None.
DATASET_DEFAULTS = {
    'toy': dict(extractor='small', min_size=256, max_size=400, anchor_scales=(2, 4, 8),
                epochs=10, lr_milestones=(7,), num_workers=0, plot_every=50),
    'voc': dict(extractor='vgg16', min_size=600, max_size=1000, anchor_scales=(8, 16, 32),
                epochs=14, lr_milestones=(9,), num_workers=2, plot_every=40),
}
# The paper's proposal counts, RoI minibatch and detection NMS, for the models without a
# pyramid; EXTRACTOR_DEFAULTS may replace them.
PAPER_DEFAULTS = dict(n_train_pre_nms=12000, n_train_post_nms=2000, n_test_pre_nms=6000,
                      n_test_post_nms=300, rpn_min_size=16, roi_n_sample=128,
                      eval_nms_thresh=0.3, lr_scaling='none')
# Solver settings per extractor. VGG16: the paper's Caffe solver. The small extractor has
# BatchNorm and learns from scratch: a 10x larger lr. ResNet and MobileNet: tf-faster-rcnn's
# (lr 1e-3 at batch 1, weight decay 1e-4 and 4e-5, biases at the weights' lr).
CAFFE_SOLVER = dict(lr=1e-3, weight_decay=5e-4, double_bias=True)
# FPN: torchvision's fasterrcnn_resnet50_fpn (Detectron's and mmdetection's 1x schedule alike):
# the n_*_pre_nms best proposals of each level, n_*_post_nms per image after NMS, 512 RoIs per
# image, detections NMS at 0.5, no min proposal size; one anchor size per level, 32 px on P2 to
# 512 on P6; COCO's 800 / 1333 images; lr 0.02 for 16 images, 0.00125 per image, scaled by the
# total batch (--lr-scaling=linear).
FPN_DEFAULTS = dict(n_train_pre_nms=2000, n_train_post_nms=2000, n_test_pre_nms=1000,
                    n_test_post_nms=1000, rpn_min_size=0, roi_n_sample=512, eval_nms_thresh=0.5,
                    anchor_scales=(8,), lr=0.00125, lr_scaling='linear', weight_decay=1e-4,
                    double_bias=False)
EXTRACTOR_DEFAULTS = {
    'vgg16': CAFFE_SOLVER, 'small': {**CAFFE_SOLVER, 'lr': 0.01},
    'resnet50': dict(lr=1e-3, weight_decay=1e-4, double_bias=False),
    'resnet101': dict(lr=1e-3, weight_decay=1e-4, double_bias=False),
    'mobilenet_v3': dict(lr=1e-3, weight_decay=4e-5, double_bias=False),
    'resnet50_fpn': {**FPN_DEFAULTS, 'min_size': 800, 'max_size': 1333},
    'resnet101_fpn': {**FPN_DEFAULTS, 'min_size': 800, 'max_size': 1333},
    # the toy images' sizes; anchors of 16 px on P2 to 256 on P6; the small model's solver
    # and the paper's RoI counts (a few objects per image, a CPU's speed)
    'small_fpn': {**FPN_DEFAULTS, 'anchor_scales': (4,), **CAFFE_SOLVER, 'lr': 0.01,
                  'lr_scaling': 'none', 'roi_n_sample': 128, 'n_test_post_nms': 300},
}
# Held out of the training split for the per-epoch mAP: this fraction of it, at most the cap.
VAL_FRACTION, VAL_CAP = 0.1, 300

# The valid values of the options with a fixed set of them. The modules that take these
# values (data.dataset.DATASETS, model.backbones.BACKBONES, model.transform.NORMALIZATION,
# model.ops.BACKENDS) do not import the Config; tests/test_config.py checks they agree.
CHOICES = {
    'dataset': ('voc07', 'voc0712', 'custom', 'toy', 'coco', 'coco2017'),
    'metric': ('voc', 'coco'),
    'extractor': ('vgg16', 'small', 'resnet50', 'resnet101', 'mobilenet_v3',
                  'resnet50_fpn', 'resnet101_fpn', 'small_fpn'),
    'pretrained': ('imagenet',),
    'normalization': ('caffe', 'torchvision'),
    'optimizer': ('sgd', 'adam'),
    'device': ('auto', 'cpu', 'cuda'),
    'backend': ('auto', 'cupy', 'torchvision'),
    'lr_scaling': ('none', 'linear'),
}
# What a resumed run cannot change: the model's shape and the weights it came from, the
# optimizer's kind, what decides the held-out split (the best epoch must be chosen on the
# same images throughout, none of which were trained on), and where the run lives.
FIXED_ON_RESUME = ('dataset', 'class_names', 'extractor', 'anchor_scales', 'anchor_ratios',
                   'normalization', 'caffe_pretrain', 'caffe_pretrain_path', 'pretrained_path',
                   'pretrained',
                   'optimizer', 'seed', 'n_val_images', 'out_dir', 'run_name')
# Numeric options that must lie in a range (None, where allowed, is not checked).
RANGES = {
    'positive': ('lr', 'min_size', 'max_size', 'epochs', 'batch_size', 'rpn_n_sample',
                 'roi_n_sample', 'plot_every', 'n_test_post_nms', 'n_train_post_nms',
                 'n_train_pre_nms', 'n_test_pre_nms', 'test_n_images'),
    '>= 0': ('weight_decay', 'momentum', 'n_val_images', 'num_workers', 'rpn_min_size',
             'eval_score_thresh'),
    'in (0, 1]': ('rpn_pos_ratio', 'roi_pos_ratio', 'rpn_nms_thresh', 'eval_nms_thresh',
                  'lr_decay', 'rpn_pos_iou_thresh', 'roi_pos_iou_thresh'),
}
RANGE_CHECKS = {'positive': lambda v: v > 0, '>= 0': lambda v: v >= 0,
                'in (0, 1]': lambda v: 0 < v <= 1}
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
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f'{flag} is not a boolean; use true or false (or yes/no, 1/0)')
    if kind is str:
        if isinstance(value, bool):  # fire's value for a flag given without '=value'
            raise ValueError(f'{option_name(name)} needs a value ({option_name(name)}=...)')
        return str(value)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f'{flag} is not a {"whole " if kind is int else ""}number')
    if kind is int:
        if not number.is_integer():
            raise ValueError(f'{flag} is not a whole number')
        return int(number)
    return number


def _coerce(name, annotation, value):
    """value as the field's type: X | None, bool, int, float, str or tuple[X, ...]."""
    kind = annotation
    if isinstance(annotation, types.UnionType):  # X | None
        kind = next(k for k in typing.get_args(annotation) if k is not type(None))
        if value is None or (isinstance(value, str) and value.lower() == 'none'):
            return None
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if isinstance(value, str):  # --class-names=cat,dog that fire left as one string
            value = [v for v in value.split(',') if v.strip()]
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError(f'{option_name(name)} needs at least one value')
        return tuple(_scalar(name, item, v) for v in values)
    return _scalar(name, kind, value)


@dataclass
class Config:
    # --- data ---
    dataset: str = 'toy'               # voc07 | voc0712 | custom | toy
    voc_data_dir: str | None = None    # VOCdevkit (voc07, voc0712) or your VOC-format folder
    coco_json: str | None = None       # --dataset=coco: one COCO JSON (split 80/20 unless ...)
    coco_test_json: str | None = None  # ... this JSON is the test split
    image_dir: str | None = None       # the COCO JSON's images (default: the JSON's folder)
    coco_dir: str | None = None        # --dataset=coco2017: annotations/, train2017/, val2017/
    class_names: tuple[str, ...] | None = None  # fixes the class list; default: found in the XMLs
    skip_bad: bool = False             # skip unreadable images / malformed XML with a warning
    use_difficult: bool = False        # train on 'difficult' objects too (the paper does not)
    min_size: int | None = None        # short side after resize (paper: 600)
    max_size: int | None = None        # long side at most (paper: 1000)
    n_val_images: int | None = None    # held out for per-epoch mAP; default 10%, at most 300
    num_workers: int | None = None     # DataLoader worker processes

    # --- model ---
    extractor: str | None = None       # vgg16 (the paper) | small (a few convs, for the toy set)
                                       # | resnet50 | resnet101 | mobilenet_v3 (C4) | resnet50_fpn
                                       # | resnet101_fpn | small_fpn (feature pyramid)
    caffe_pretrain: bool = False       # start from the caffe VGG16 (implies vgg16; see misc/)
    caffe_pretrain_path: str = 'weights/vgg16_caffe.pth'
    pretrained_path: str | None = None  # torchvision's weights file of --extractor (or vgg16)
    pretrained: str | None = None      # imagenet: torchvision's published weights (downloaded)
    normalization: str | None = None   # caffe (BGR, 0..255) with caffe weights, else torchvision
    anchor_scales: tuple[float, ...] | None = None  # sides: stride * scale * sqrt(ratio)
    anchor_ratios: tuple[float, ...] = (0.5, 1, 2)
    backend: str = 'auto'              # NMS / RoI pooling: auto | cupy | torchvision

    # --- targets and proposals ---
    rpn_n_sample: int = 256
    rpn_pos_iou_thresh: float = 0.7
    rpn_neg_iou_thresh: float = 0.3
    rpn_pos_ratio: float = 0.5
    rpn_nms_thresh: float = 0.7
    # None: the paper's values (PAPER_DEFAULTS) or the extractor's (FPN_DEFAULTS)
    n_train_pre_nms: int | None = None  # with a pyramid: per level
    n_train_post_nms: int | None = None
    n_test_pre_nms: int | None = None
    n_test_post_nms: int | None = None
    rpn_min_size: int | None = None    # proposals under this many px at input scale are dropped
    roi_n_sample: int | None = None
    roi_pos_ratio: float = 0.25
    roi_pos_iou_thresh: float = 0.5
    roi_neg_iou_thresh_hi: float = 0.5
    roi_neg_iou_thresh_lo: float = 0.0
    rpn_sigma: float = 3.0             # smooth L1 sigma: the RPN's targets are finer
    roi_sigma: float = 1.0

    # --- optimisation ---
    optimizer: str = 'sgd'
    lr: float | None = None            # paper: 1e-3 for batch 1 (VGG16)
    lr_scaling: str | None = None      # linear: lr x total batch size (Goyal et al. 2017)
    momentum: float = 0.9
    weight_decay: float | None = None  # not on biases; per extractor (EXTRACTOR_DEFAULTS)
    double_bias: bool | None = None    # biases at 2x lr, as in the Caffe solver (VGG16)
    lr_decay: float = 0.1
    lr_milestones: tuple[int, ...] | None = None  # epochs after which lr is x lr_decay
    epochs: int | None = None
    batch_size: int = 1                # images per step and process; the paper uses 1
    amp: bool = False                  # mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA
    compile: bool = False              # torch.compile the extractor (see README for when it pays)

    # --- evaluation (predict's 'evaluate' preset) ---
    metric: str | None = None          # voc: VOC07 11-point mAP (the paper's); coco: COCO AP
                                       # (pycocotools); default coco on COCO data, else voc
    eval_score_thresh: float = 0.05    # keep detections scoring above this
    eval_nms_thresh: float | None = None  # class-wise NMS of the detections (paper: 0.3)

    # --- run ---
    device: str = 'auto'
    seed: int = 0
    out_dir: str = 'runs'
    run_name: str | None = None        # default: <dataset>-<timestamp>; never reused
    resume: str | None = None          # a run folder or checkpoint to continue exactly
    plot_every: int | None = None      # steps between visdom / log updates
    env: str = 'frcnn'                 # visdom environment
    visdom: bool = True
    visdom_server: str = 'http://127.0.0.1'
    visdom_port: int = 8097
    test_n_images: int | None = None   # evaluate on the first n test images only (quick checks)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            setattr(self, field.name, _coerce(field.name, field.type, getattr(self, field.name)))
        self._fill_defaults()
        self.validate()

    def _fill_defaults(self):
        given = [option for option, value in (('--caffe-pretrain', self.caffe_pretrain or None),
                 ('--pretrained-path', self.pretrained_path), ('--pretrained', self.pretrained))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f'{given[0]} and {given[1]} both give the starting weights; keep one')
        if self.caffe_pretrain and self.extractor not in (None, 'vgg16'):
            raise ValueError(f'--caffe-pretrain holds VGG16 weights, but --extractor='
                             f'{self.extractor}; drop one of the two')
        if given and self.extractor in ('small', 'small_fpn'):
            raise ValueError(f'{given[0]} gives pre-trained weights, but --extractor='
                             f'{self.extractor} has none; drop one of the two')
        if given and self.extractor is None:
            self.extractor = 'vgg16'  # the paper's backbone
        defaults = DATASET_DEFAULTS['toy' if self.dataset == 'toy' else 'voc']
        defaults = {**PAPER_DEFAULTS, **defaults,
                    **EXTRACTOR_DEFAULTS.get(self.extractor or defaults['extractor'], {})}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.normalization is None:
            self.normalization = 'caffe' if self.caffe_pretrain else 'torchvision'
        if self.metric is None:
            self.metric = 'coco' if self.dataset.startswith('coco') else 'voc'

    def validate(self):
        for name, valid in CHOICES.items():
            if getattr(self, name) not in (*valid, None):  # None: not given, where optional
                raise ValueError(f'{option_name(name)}={getattr(self, name)!r} is not valid; '
                                 f'choose one of {", ".join(valid)}')
        for what, names in RANGES.items():
            for name in names:
                value = getattr(self, name)
                if value is not None and not RANGE_CHECKS[what](value):
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
        if not 0 < self.visdom_port < 65536:
            raise ValueError(f'--visdom-port must be in 1..65535, got {self.visdom_port}')

    def check_data_dir(self):
        """The data the dataset needs must exist (the toy dataset makes its own)."""
        needs = {'coco': ('coco_json',), 'coco2017': ('coco_dir',), 'toy': ()}
        for name in needs.get(self.dataset, ('voc_data_dir',)):
            if getattr(self, name) is None:
                raise ValueError(f'--dataset={self.dataset} needs {option_name(name)}=<path>')
        for name in ('voc_data_dir', 'coco_json', 'coco_test_json', 'image_dir', 'coco_dir'):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ValueError(f'{option_name(name)}: nothing at {path!r}')

    def n_val(self, n_images):
        """Images held out of a training split of n_images: --n-val-images, or by default
        10% of the split and at most 300, so that a small split still trains on 90% of it."""
        if self.n_val_images is None:
            return min(VAL_CAP, round(VAL_FRACTION * n_images))
        if 2 * self.n_val_images > n_images:
            raise ValueError(
                f'--n-val-images={self.n_val_images} would hold out more than half of the '
                f'{n_images} images of the training split for validation; use '
                f'--n-val-images={min(VAL_CAP, round(VAL_FRACTION * n_images))} (10%) or 0 '
                '(no validation: best.pt is the last epoch)')
        return self.n_val_images

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
        """
        cfg = cls(**cls.parse_options(kwargs))
        if need_data:
            cfg.check_data_dir()
        return cfg

    def to_dict(self):
        return dataclasses.asdict(self)

