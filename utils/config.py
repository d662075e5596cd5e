"""Every option of a run, its default and why: one dataclass, built once in train.py.

Defaults are the paper's and the original Caffe port's (see DESIGN.md). Fields left at ``None``
take their dataset's default from ``DATASET_DEFAULTS``: the toy dataset trains a small extractor
on small images so that it learns on a CPU in minutes; an explicit option always wins.
"""
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass

from data.dataset import DATASETS
from model.utils.backend import BACKENDS

# Per-dataset values for the fields whose default is None.
DATASET_DEFAULTS = {
    'toy': dict(extractor='small', min_size=256, max_size=400, anchor_scales=(2, 4, 8),
                epochs=10, lr=0.01, lr_milestones=(7,), n_val_images=30, num_workers=0,
                plot_every=50),
    'voc': dict(extractor='vgg16', min_size=600, max_size=1000, anchor_scales=(8, 16, 32),
                epochs=14, lr=1e-3, lr_milestones=(9,), n_val_images=300, num_workers=2,
                plot_every=40),
}

CHOICES = {
    'dataset': DATASETS,
    'extractor': ('vgg16', 'small'),
    'normalization': ('caffe', 'torchvision'),
    'optimizer': ('sgd', 'adam'),
    'device': ('auto', 'cpu', 'cuda'),
    'backend': BACKENDS,
    'lr_scaling': ('none', 'linear'),
}


@dataclass
class Config:
    # --- data ---
    dataset: str = 'toy'               # voc07 | voc0712 | custom | toy
    voc_data_dir: str | None = None    # VOCdevkit (voc07, voc0712) or your VOC-format folder
    class_names: tuple | None = None   # custom: fixes the class list; default: found in the XMLs
    skip_bad: bool = False             # skip unreadable images / malformed XML with a warning
    use_difficult: bool = False        # train on 'difficult' objects too (the paper does not)
    min_size: int | None = None        # short side after resize (paper: 600)
    max_size: int | None = None        # long side at most (paper: 1000)
    n_val_images: int | None = None    # held out of the training split for per-epoch mAP
    num_workers: int | None = None     # DataLoader worker processes

    # --- model ---
    extractor: str | None = None       # vgg16 (the paper) | small (a few convs, for the toy set)
    caffe_pretrain: bool = False       # start from the caffe VGG16 (misc/convert_caffe_pretrain.py)
    caffe_pretrain_path: str = 'weights/vgg16_caffe.pth'
    pretrained_path: str | None = None  # a local torchvision VGG16 weights file
    normalization: str | None = None   # caffe (BGR, 0..255) with caffe weights, else torchvision
    anchor_scales: tuple | None = None  # anchor sides = 16 * scale * sqrt(ratio)
    anchor_ratios: tuple = (0.5, 1, 2)
    backend: str = 'auto'              # NMS / RoI pooling: auto | cupy | torchvision

    # --- targets and proposals ---
    rpn_n_sample: int = 256
    rpn_pos_iou_thresh: float = 0.7
    rpn_neg_iou_thresh: float = 0.3
    rpn_pos_ratio: float = 0.5
    rpn_nms_thresh: float = 0.7
    n_train_pre_nms: int = 12000
    n_train_post_nms: int = 2000
    n_test_pre_nms: int = 6000
    n_test_post_nms: int = 300
    rpn_min_size: int = 16             # proposals under 16 px (at input scale) are dropped
    roi_n_sample: int = 128
    roi_pos_ratio: float = 0.25
    roi_pos_iou_thresh: float = 0.5
    roi_neg_iou_thresh_hi: float = 0.5
    roi_neg_iou_thresh_lo: float = 0.0
    rpn_sigma: float = 3.0             # smooth L1 sigma: the RPN's targets are finer
    roi_sigma: float = 1.0

    # --- optimisation ---
    optimizer: str = 'sgd'
    lr: float | None = None            # paper: 1e-3 for batch 1
    lr_scaling: str = 'none'           # linear: lr x total batch size (Goyal et al. 2017)
    momentum: float = 0.9
    weight_decay: float = 5e-4         # not on biases, which get 2x lr as in the Caffe solver
    lr_decay: float = 0.1
    lr_milestones: tuple | None = None  # epochs after which lr is multiplied by lr_decay
    epochs: int | None = None
    batch_size: int = 1                # images per step and process; the paper uses 1
    amp: bool = False                  # mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA

    # --- evaluation ---
    eval_score_thresh: float = 0.05
    eval_nms_thresh: float = 0.3
    use_07_metric: bool = True         # VOC07 11-point AP, the paper's number

    # --- run ---
    device: str = 'auto'
    seed: int = 0
    out_dir: str = 'runs'
    run_name: str | None = None        # default: <dataset>-<timestamp>
    resume: str | None = None          # a run folder or checkpoint to continue exactly
    plot_every: int | None = None      # steps between visdom / log updates
    env: str = 'frcnn'                 # visdom environment
    visdom: bool = True
    visdom_server: str = 'http://127.0.0.1'
    visdom_port: int = 8097
    test_n_images: int | None = None   # evaluate on the first n test images only (quick checks)

    def __post_init__(self):
        self._fill_dataset_defaults()
        self.validate()

    def _fill_dataset_defaults(self):
        defaults = DATASET_DEFAULTS['toy' if self.dataset == 'toy' else 'voc']
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.normalization is None:
            self.normalization = 'caffe' if self.caffe_pretrain else 'torchvision'
        for name in ('anchor_scales', 'anchor_ratios', 'lr_milestones', 'class_names'):
            value = getattr(self, name)
            if isinstance(value, (list, int, float, str)):
                value = (value,) if isinstance(value, (int, float, str)) else value
                setattr(self, name, tuple(value))

    def validate(self):
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f'--{name}={getattr(self, name)!r} is not valid; '
                                 f'choose one of {", ".join(valid)}')
        positive = ('lr', 'min_size', 'max_size', 'epochs', 'batch_size',
                    'rpn_n_sample', 'roi_n_sample', 'plot_every', 'n_test_post_nms',
                    'n_train_post_nms')
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f'--{name} must be positive, got {getattr(self, name)!r}')
        for name in ('weight_decay', 'momentum', 'n_val_images', 'num_workers', 'rpn_min_size'):
            if getattr(self, name) < 0:
                raise ValueError(f'--{name} must be >= 0, got {getattr(self, name)!r}')
        for name in ('rpn_pos_ratio', 'roi_pos_ratio', 'rpn_nms_thresh', 'eval_nms_thresh',
                     'lr_decay'):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f'--{name} must be in (0, 1], got {getattr(self, name)!r}')
        if self.min_size > self.max_size:
            raise ValueError(f'--min-size ({self.min_size}) must not exceed '
                             f'--max-size ({self.max_size})')
        if any(s <= 0 for s in self.anchor_scales + self.anchor_ratios):
            raise ValueError('--anchor-scales and --anchor-ratios must be positive numbers')
        if self.caffe_pretrain and self.normalization != 'caffe':
            raise ValueError('--caffe-pretrain needs --normalization=caffe (the caffe VGG16 '
                             'expects BGR 0..255 minus the pixel means)')

    def check_data_dir(self):
        """The data folder must exist for the real datasets (the toy one makes its own)."""
        if self.dataset == 'toy' and self.voc_data_dir is None:
            return
        if self.voc_data_dir is None:
            raise ValueError(f'--dataset={self.dataset} needs --voc-data-dir=<folder>')
        if not os.path.isdir(self.voc_data_dir):
            raise ValueError(f'--voc-data-dir: no folder at {self.voc_data_dir!r}')

    @classmethod
    def from_kwargs(cls, need_data=True, **kwargs):
        """Builds a Config from fire's keyword arguments; an unknown one is an error.

        ``need_data=False`` skips the data-folder check (loading a model to detect with).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in kwargs.items():
            name = key.replace('-', '_')
            if name not in names:
                close = difflib.get_close_matches(name, sorted(names), n=3)
                hint = f'; did you mean {", ".join("--" + c for c in close)}?' if close else ''
                raise ValueError(f'unknown option --{key}{hint}')
            clean[name] = value
        cfg = cls(**clean)
        if need_data:
            cfg.check_data_dir()
        return cfg

    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        with open(path, 'w') as f:
            json.dump(self.to_dict(), f, indent=2)
