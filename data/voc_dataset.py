"""PASCAL VOC and VOC-format folders: image, boxes, labels and difficult flags per sample.

Two layouts are read:
1. a VOCdevkit year folder: Annotations/<id>.xml, JPEGImages/, ImageSets/Main/<split>.txt;
2. a VOC-format folder as labelImg writes it: XML files in data_dir/Annotations/ or directly in
   data_dir, each naming its image in <filename>; the image is looked up next to the XML, then
   in data_dir/JPEGImages/, data_dir/images/ and data_dir/Images/. Without
   ImageSets/Main/<split>.txt the split is a deterministic 80/20 hash of the ids.
"""
import hashlib
import math
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path, PureWindowsPath

import torch
from PIL import Image

from data.util import DataError, read_image

VOC_BBOX_LABEL_NAMES = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
IMAGE_FOLDERS = ('JPEGImages', 'images', 'Images')
# Without an ImageSets file: split name -> which half of the hash split it reads.
HASH_SPLITS = {'trainval': 'train', 'train': 'train', 'test': 'test', 'val': 'test'}
LAYOUT = ('expected a VOC year folder (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt) '
          'or a folder of VOC-format XML files (in it or in its Annotations/) with their images')


def _hash_split(ids, split):
    """Every 5th id in hash order (sha1 of the id, so stable across runs) is a test id."""
    is_test = {i: int(hashlib.sha1(i.encode()).hexdigest(), 16) % 5 == 0 for i in ids}
    return [i for i in sorted(ids) if is_test[i] == (HASH_SPLITS[split] == 'test')]


def _parse_xml(path):
    """-> (<filename> or None, (H, W) from <size> or None, objects), objects a list of
    (name, [x_min, y_min, x_max, y_max] made 0-based, difficult)."""
    if not path.is_file():
        raise DataError(f'{path}: annotation file not found')
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError, LookupError) as e:
        raise DataError(f'{path}: malformed XML ({e})') from e
    try:
        size = (int(root.findtext('size/height')), int(root.findtext('size/width')))
        size = size if min(size) > 0 else None  # labelImg writes 0 x 0 when it did not know
    except (TypeError, ValueError):
        size = None  # no usable <size>: boxes are checked against the image when it is read
    objects = []
    for obj in root.findall('object'):
        name = (obj.findtext('name') or '').strip()
        if not name:
            raise DataError(f'{path}: an <object> has no <name>')
        try:
            box = [float(obj.find('bndbox').findtext(k)) - 1  # VOC pixels are 1-based
                   for k in ('xmin', 'ymin', 'xmax', 'ymax')]
        except (AttributeError, TypeError, ValueError):
            box = None
        if box is None or not all(map(math.isfinite, box)):
            raise DataError(f'{path}: object {name!r} has a missing or non-numeric <bndbox> '
                            '(needs numbers xmin, ymin, xmax, ymax)')
        objects.append((name, box, (obj.findtext('difficult') or '0').strip() == '1'))
    return root.findtext('filename'), size, objects


def _clip(bbox, label, difficult, size, path):
    """Clip (R, 4) boxes to an image of size (H, W) (None: no clipping); drop empty boxes."""
    if size is not None:
        clipped = torch.stack([bbox[:, 0].clamp(0, size[1]), bbox[:, 1].clamp(0, size[0]),
                               bbox[:, 2].clamp(0, size[1]), bbox[:, 3].clamp(0, size[0])], 1)
        for box in bbox[(clipped != bbox).any(1)].tolist():
            warnings.warn(f'{path}: box {box} reaches outside the {size[0]}x{size[1]} image; '
                          'clipped', stacklevel=3)
        bbox = clipped
    keep = (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])
    for box in bbox[~keep].tolist():
        warnings.warn(f'{path}: box {box} is empty (x_max <= x_min or y_max <= y_min); dropped',
                      stacklevel=3)
    return bbox[keep], label[keep], difficult[keep]


class VOCBboxDataset:
    """Boxes and labels of a VOC or VOC-format folder (see the module docstring for layouts).

    All annotations of the split are parsed at construction. Sample i is
    image (3, H, W) float32 RGB 0..255, bbox (R, 4) float32 x_min y_min x_max y_max 0-based,
    label (R,) int64 index into class_names, difficult (R,) bool.

    class_names: None discovers them (sorted unique object names of all XML files of the folder,
    whatever the split) except for a VOC20xx folder, which gets VOC_BBOX_LABEL_NAMES.
    use_difficult: keep difficult objects (evaluation) or drop them (training).
    skip_bad: skip files with bad data (also verifying image content) with a warning each,
    instead of raising DataError.
    """

    def __init__(self, data_dir, split='trainval', class_names=None, use_difficult=False,
                 skip_bad=False):
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f'{data_dir}: dataset folder not found; {LAYOUT}')
        ann_dir = data_dir / 'Annotations' if (data_dir / 'Annotations').is_dir() else data_dir
        all_ids = sorted(p.stem for p in ann_dir.glob('*.xml'))
        if not all_ids:
            raise DataError(f'{data_dir}: no annotation XML files found; {LAYOUT}')
        ids = self._split_ids(data_dir, split, all_ids)
        is_voc = re.fullmatch(r'VOC20\d\d', data_dir.resolve().name) is not None
        discover = class_names is None and not is_voc

        self.skipped = []

        def guarded(function, *args):  # raise, or warn and note the file when skip_bad
            try:
                return function(*args)
            except DataError as e:
                if not skip_bad:
                    raise
                warnings.warn(f'skipping: {e}', stacklevel=3)
                self.skipped.append(args[0])

        parsed = {}
        for i in all_ids if discover else ids:
            record = guarded(_parse_xml, ann_dir / f'{i}.xml')
            if record is not None:
                parsed[i] = record
        if discover:
            class_names = sorted({obj[0] for _, _, objects in parsed.values() for obj in objects})
            if not class_names:
                raise DataError(f'{data_dir}: no objects in any XML file; pass class_names')
        self.class_names = tuple(VOC_BBOX_LABEL_NAMES if class_names is None else class_names)

        self.ids, self._samples = [], []
        for i in ids:
            if i in parsed:
                sample = guarded(self._sample, ann_dir / f'{i}.xml', parsed[i], data_dir,
                                 use_difficult, skip_bad)
                if sample is not None:
                    self.ids.append(i)
                    self._samples.append(sample)
        if self.skipped:
            warnings.warn(f'{data_dir}: skipped {len(self.skipped)} bad files', stacklevel=2)
        if not self.ids:
            raise DataError(f'{data_dir}: split {split!r} has no samples')

    @staticmethod
    def _split_ids(data_dir, split, all_ids):
        split_dir = data_dir / 'ImageSets' / 'Main'
        if split_dir.is_dir():
            split_file = split_dir / f'{split}.txt'
            if not split_file.is_file():
                valid = sorted(p.stem for p in split_dir.glob('*.txt'))
                raise DataError(f'{split_file}: split file not found; splits there: {valid}')
            return [line.split()[0] for line in split_file.read_text().splitlines()
                    if line.strip()]
        if split not in HASH_SPLITS:
            raise DataError(f'{data_dir}: unknown split {split!r} for a folder without '
                            f'ImageSets/Main/; valid: {", ".join(HASH_SPLITS)}')
        return _hash_split(all_ids, split)

    def _sample(self, xml_path, record, data_dir, use_difficult, verify_image):
        """-> (image path, (H, W) or None, bbox, label, difficult) of one annotation file."""
        filename, size, objects = record
        image_path = self._find_image(xml_path, filename, data_dir)
        if verify_image:
            try:
                with Image.open(image_path) as img:
                    img.verify()
            except Exception as e:  # PIL raises many types for corrupt data
                raise DataError(f'{image_path}: corrupt image ({e})') from e
        unknown = sorted({name for name, _, _ in objects} - set(self.class_names))
        if unknown:
            raise DataError(f'{xml_path}: unknown class names {unknown}; '
                            f'valid: {", ".join(self.class_names)}')
        objects = [obj for obj in objects if use_difficult or not obj[2]]
        bbox = torch.tensor([box for _, box, _ in objects], dtype=torch.float32).reshape(-1, 4)
        label = torch.tensor([self.class_names.index(name) for name, _, _ in objects],
                             dtype=torch.int64)
        difficult = torch.tensor([d for _, _, d in objects], dtype=torch.bool)
        return (image_path, size) + _clip(bbox, label, difficult, size, xml_path)

    @staticmethod
    def _find_image(xml_path, filename, data_dir):
        name = PureWindowsPath(filename or '').name  # also drops "C:\...\" or "a/b/" prefixes
        names = [name] if Path(name).suffix else [name + ext for ext in IMAGE_EXTENSIONS]
        names += [xml_path.stem + ext for ext in IMAGE_EXTENSIONS]  # renamed or no <filename>
        folders = [xml_path.parent] + [data_dir / f for f in IMAGE_FOLDERS]
        for candidate in (folder / n for folder in folders for n in names if n):
            if candidate.is_file():
                return candidate
        raise DataError(f'{xml_path}: image {filename!r} not found next to it or in '
                        f'{data_dir}/{{{",".join(IMAGE_FOLDERS)}}}')

    def __len__(self):
        return len(self.ids)

    def image_path(self, i):
        return self._samples[i][0]

    def get_annotation(self, i):
        """(bbox, label, difficult) of sample i without reading its image."""
        return self._samples[i][2:]

    def __getitem__(self, i):
        image_path, size, bbox, label, difficult = self._samples[i]
        image = read_image(image_path)
        if size != tuple(image.shape[1:]):  # <size> missing or wrong: clip to the real image
            bbox, label, difficult = _clip(bbox, label, difficult, image.shape[1:], image_path)
        return image, bbox, label, difficult
