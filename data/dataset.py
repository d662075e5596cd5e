"""Train and test datasets on top of a bbox dataset, their collate functions, and the builder.

A bbox dataset (VOCBboxDataset or the VOC07+12 union) gives per sample image (3, H, W) float32
RGB 0..255, bbox (R, 4) float32 x_min y_min x_max y_max 0-based, label (R,) int64 0..n_fg-1,
difficult (R,) bool (every object, difficult ones flagged), and has class_names,
get_annotation(i), image_path(i) and image_size(i).
"""
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.coco_dataset import COCOBboxDataset
from data.toy import toy_dataset_dir
from data.util import DataError, flip_bbox, read_image, size_problem
from data.voc_dataset import VOC_BBOX_LABEL_NAMES, VOCBboxDataset
from model.transform import check_normalization, normalize, pad_images, resize_bbox, resize_image


class TrainDataset(Dataset):
    """Resized, randomly flipped, normalised training samples.

    Sample i: image (3, H', W') float32 normalised, bbox (R, 4) float32 in resized pixels,
    label (R,) int64 0..n_fg-1, scale float (resized / original size).
    Difficult objects are dropped unless use_difficult (the paper trains without them).
    The flip of sample i is drawn from (seed, epoch, i) alone, so DataLoader workers and a
    resumed run see the same flips; call set_epoch at the start of each epoch.
    """

    def __init__(self, bbox_dataset, min_size, max_size, normalization, flip=True, seed=0,
                 use_difficult=False):
        self.bbox_dataset, self.normalization = bbox_dataset, check_normalization(normalization)
        self.min_size, self.max_size, self.use_difficult = min_size, max_size, use_difficult
        self.flip, self.seed, self.epoch = flip, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.bbox_dataset)

    def __getitem__(self, i):
        image, bbox, label, difficult = self.bbox_dataset[i]
        if not self.use_difficult:
            bbox, label = bbox[~difficult], label[~difficult]
        resized, scale = resize_image(image, self.min_size, self.max_size)
        bbox = resize_bbox(bbox, image.shape[1:], resized.shape[1:])
        # Tuples of ints hash the same in every process (no PYTHONHASHSEED salt).
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)))
        if self.flip and torch.rand((), generator=generator) < 0.5:
            resized, bbox = resized.flip(-1), flip_bbox(bbox, resized.shape[1:])
        return normalize(resized, self.normalization), bbox, label, scale


def collate_train(batch):
    """TrainDataset samples -> dict: images (N, 3, Hmax, Wmax) zero-padded at bottom/right,
    sizes (N, 2) int64 true (H, W), bboxes and labels lists of (R_i, 4) / (R_i,), scales (N,)."""
    images, bboxes, labels, scales = (list(column) for column in zip(*batch, strict=True))
    sizes = torch.tensor([image.shape[1:] for image in images], dtype=torch.int64)
    return dict(images=pad_images(images), sizes=sizes, bboxes=bboxes, labels=labels,
                scales=torch.tensor(scales, dtype=torch.float32))


class ImageFiles(Dataset):
    """Image files as detect reads them: sample i is (path, image or None, error message or
    None), the image (3, H, W) float32 RGB 0..255 when it can be read and the detector can use
    its size (limits: data.util.size_problem's min_size, max_size, min_side, stride)."""

    def __init__(self, paths, limits):
        self.paths, self.limits = paths, limits

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            image = read_image(path)
        except DataError as e:
            return path, None, str(e)
        problem = size_problem(image.shape[1:], *self.limits)
        return (path, None, f'{path}: the image {problem}') if problem else (path, image, None)


def collate_test(batch):
    """Bbox dataset samples (image at its original size, bbox, label, difficult) -> dict of
    lists: images, bboxes, labels, difficults. The model's predict resizes and normalises."""
    images, bboxes, labels, difficults = (list(column) for column in zip(*batch, strict=True))
    return dict(images=images, bboxes=bboxes, labels=labels, difficults=difficults)


DATASETS = ('voc07', 'voc0712', 'custom', 'toy', 'coco', 'coco2017')


def build_bbox_dataset(name, data_dir, split, class_names=None, skip_bad=False,
                       check_images=False, coco_json=None, coco_test_json=None, image_dir=None):
    """The bbox dataset `name` (one of DATASETS) for split.

    voc07: data_dir is a VOCdevkit folder holding VOC2007/, or VOC2007/ itself.
    voc0712: data_dir is a VOCdevkit folder; split 'test' is VOC2007 test, any other split the
    union of VOC2007 and VOC2012 (the paper's 07+12 is split 'trainval').
    custom: a VOC-format folder (see data.voc_dataset), classes discovered unless given.
    toy: the synthetic dataset at data_dir (None: the cached default, generated once).
    coco: the COCO JSON file coco_json, its images in image_dir (default: the JSON's folder),
    split 80/20 by file name (see data.coco_dataset); with coco_test_json, that file is split
    'test' and coco_json all of the others. data_dir is not used.
    coco2017: data_dir is the COCO root: annotations/instances_train2017.json with train2017/
    is split 'trainval', annotations/instances_val2017.json with val2017/ split 'test'.
    voc07 and voc0712 have the 20 VOC classes unless class_names is given; coco and coco2017
    every category of the JSON, in order of id.
    skip_bad, check_images: see VOCBboxDataset.
    """
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(DATASETS)}')
    if name in ('voc07', 'voc0712'):
        class_names = class_names or VOC_BBOX_LABEL_NAMES
    options = dict(class_names=class_names, skip_bad=skip_bad, check_images=check_images)
    if name == 'coco':
        if coco_json is None:
            raise ValueError("dataset 'coco' needs a COCO JSON file (coco_json)")
        json_path = Path(coco_test_json if coco_test_json and split == 'test' else coco_json)
        return COCOBboxDataset(json_path, image_dir or json_path.parent,
                               'all' if coco_test_json else split, **options)
    data_dir = toy_dataset_dir() if name == 'toy' and data_dir is None else data_dir
    if data_dir is None:
        raise ValueError(f'dataset {name!r} needs a data folder (VOCdevkit, VOC-format or COCO)')
    data_dir = Path(data_dir)
    if name == 'coco2017':
        part = {'trainval': 'train2017', 'test': 'val2017'}.get(split)
        if part is None:
            raise ValueError(f"dataset 'coco2017' has splits trainval (train2017) and test "
                             f'(val2017), not {split!r}')
        return COCOBboxDataset(data_dir / 'annotations' / f'instances_{part}.json',
                               data_dir / part, 'all', **options)
    if name == 'voc0712' and split != 'test':
        return (VOCBboxDataset(data_dir / 'VOC2007', split, **options)
                + VOCBboxDataset(data_dir / 'VOC2012', split, **options))
    # 07+12 models are tested on VOC2007 test, as in the paper; voc07's data_dir may be VOC2007/
    if name == 'voc0712' or (name == 'voc07' and (data_dir / 'VOC2007').is_dir()):
        data_dir = data_dir / 'VOC2007'
    return VOCBboxDataset(data_dir, split, **options)


def usable_indices(bbox_dataset, min_size, max_size, min_side, stride, skip_bad=False):
    """Indices of the samples whose image the detector can use (see data.util.size_problem).

    An unusable image raises DataError naming it, or with skip_bad is left out with a warning.
    """
    keep = []
    for i in range(len(bbox_dataset)):
        problem = size_problem(bbox_dataset.image_size(i), min_size, max_size, min_side, stride)
        if problem is None:
            keep.append(i)
            continue
        message = f'{bbox_dataset.image_path(i)}: the image {problem}'
        if not skip_bad:
            raise DataError(f'{message} (or pass --skip-bad to leave it out)')
        warnings.warn(f'skipping: {message}', stacklevel=2)
    return keep
