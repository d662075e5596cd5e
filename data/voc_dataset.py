"""PASCAL VOC and VOC-format folders: image, boxes, labels and difficult flags per sample.

Two layouts are read:
1. a VOCdevkit year folder: Annotations/<id>.xml, JPEGImages/, ImageSets/Main/<split>.txt;
2. a VOC-format folder as labelImg writes it: XML files in data_dir/Annotations/ or directly in
   data_dir, each naming its image in <filename>; the image is looked up next to the XML, then
   in data_dir/JPEGImages/ and data_dir/images/. Without ImageSets/Main/<split>.txt the split
   is a deterministic 80/20 hash of the ids.
Every folder and file name is matched in any case, as public VOC-format datasets come in any
(annotations/, Images/, a.XML, IMG_1.JPG for <filename>IMG_1.jpg</filename>); a name in its
exact case wins when both exist. Image files are .jpg, .jpeg or .png in any case. Ids are the
XML file stems as written on disk.
"""
import contextlib
import copy
import hashlib
import os
import re
import warnings
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.util import DataError, read_image

VOC_BBOX_LABEL_NAMES = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
IMAGE_FOLDERS = ('JPEGImages', 'images')
# Without an ImageSets file: split name -> which half of the hash split it reads.
HASH_SPLITS = {'trainval': 'train', 'train': 'train', 'test': 'test', 'val': 'test'}
LAYOUT = ('expected a VOC year folder (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt) '
          'or a folder of VOC-format XML files (in it or in its Annotations/) with their images; '
          'folder and file names in any case')


class _Folders(dict):
    """Case-insensitive lookup of names in folders: folder -> {lowercase name: [names in that
    folder, sorted]}. Each folder is listed once, on first use (one listdir, not an is_file()
    call per candidate name), so a 16k-image folder indexes in seconds."""

    def __missing__(self, folder):
        names = self[folder] = {}
        for name in sorted(os.listdir(folder)) if folder.is_dir() else ():
            names.setdefault(name.lower(), []).append(name)
        return names

    def find(self, folder, name):
        """folder/name as on disk: in name's exact case when it exists, else in any case (the
        first in sorted order, so the choice is stable); None when there is none."""
        names = self[folder].get(name.lower())  # None or a non-empty list
        return names and folder / (name if name in names else names[0])

    def subfolder(self, folder, name):
        """folder/name in any case when it is a folder, else None."""
        path = self.find(folder, name)
        return path if path is not None and path.is_dir() else None

    def files(self, folder, extension):
        """{stem: path} of folder's files with extension ('.xml') in any case; of a.xml and
        a.XML, the exact case wins."""
        by_stem = {}
        for names in self[folder].values():
            for name in names:
                stem, suffix = os.path.splitext(name)
                if suffix == extension or (suffix.lower() == extension and stem not in by_stem):
                    by_stem[stem] = folder / name
        return by_stem


def _hash_split(ids, split):
    """Every 5th id in hash order (sha1 of the id, so stable across runs) is a test id."""
    is_test = {i: int(hashlib.sha1(i.encode()).hexdigest(), 16) % 5 == 0 for i in ids}
    return [i for i in sorted(ids) if is_test[i] == (HASH_SPLITS[split] == 'test')]


def _split_ids(data_dir, split, all_ids, folders):
    """The ids of split: the first word of each line of ImageSets/Main/<split>.txt where the
    folder has ImageSets/Main/ (in any case), else the hash split of all_ids."""
    split_dir = folders.subfolder(data_dir, 'ImageSets')
    split_dir = split_dir and folders.subfolder(split_dir, 'Main')
    if split_dir is not None:
        split_file = folders.find(split_dir, f'{split}.txt')
        if split_file is None:
            raise DataError(f'{split_dir / f"{split}.txt"}: split file not found; splits '
                            f'there: {sorted(folders.files(split_dir, ".txt"))}')
        return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if split not in HASH_SPLITS:
        raise DataError(f'{data_dir}: unknown split {split!r} for a folder without '
                        f'ImageSets/Main/; valid: {", ".join(HASH_SPLITS)}')
    return _hash_split(all_ids, split)


def _parse_xml(path):
    """-> (<filename> or None, objects), objects a list of
    (name, [x_min, y_min, x_max, y_max] made 0-based, difficult)."""
    if not path.is_file():
        raise DataError(f'{path}: annotation file not found')
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError, LookupError) as e:
        raise DataError(f'{path}: malformed XML ({e})') from e
    objects = []
    for obj in root.findall('object'):
        name = (obj.findtext('name') or '').strip()
        if not name:
            raise DataError(f'{path}: an <object> has no <name>')
        box = None  # stays None when <bndbox> or a number in it is missing or not a number
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            box = [float(obj.find('bndbox').findtext(k)) - 1  # VOC pixels are 1-based
                   for k in ('xmin', 'ymin', 'xmax', 'ymax')]
        if box is None or not np.isfinite(box).all():
            raise DataError(f'{path}: object {name!r} has a missing or non-numeric <bndbox> '
                            '(needs numbers xmin, ymin, xmax, ymax)')
        objects.append((name, box, (obj.findtext('difficult') or '0').strip() == '1'))
    return root.findtext('filename'), objects


def _find_image(xml_path, filename, data_dir, image_dirs, folders):
    """The image of an XML file: <filename> (or the XML's stem) with any image extension,
    in any case, in image_dirs in order."""
    name = PureWindowsPath(filename or '').name  # also drops "C:\...\" or "a/b/" prefixes
    names = [name] if Path(name).suffix else [name + ext for ext in IMAGE_EXTENSIONS]
    names += [xml_path.stem + ext for ext in IMAGE_EXTENSIONS]  # renamed or no <filename>
    for folder in image_dirs:
        for candidate in dict.fromkeys(names):  # each name once, in order
            path = folders.find(folder, candidate)
            if path is not None:
                return path
    raise DataError(f'{xml_path}: image {filename!r} not found next to it or in '
                    f'{data_dir}/{{{",".join(IMAGE_FOLDERS)}}} (names in any case)')


def _image_size(path, where=''):
    """(H, W) of an image file, read from its header alone (no pixels are decoded). A bad file
    raises DataError naming it, after `where` (COCO's 'file.json: images[k]: ')."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Exception as e:  # PIL raises many types for bad files; all mean "bad file"
        raise DataError(f'{where}{path}: cannot read image ({type(e).__name__}: {e})') from e


def _decodes(path):
    """True when every pixel of an image file decodes, else DataError naming it. The decoded
    image is dropped at once, so that a thread holds one image at a time."""
    read_image(path)
    return True


def _clip(size, path, labelled):
    """A list of R (box [x_min, y_min, x_max, y_max], label, difficult) -> tensors bbox (R', 4)
    float32 clipped to an image of size (H, W), label (R',) int64 and difficult (R',) bool,
    less the boxes that clipping leaves empty. NumPy until then rather than torch: its overhead
    on such tiny arrays is a tenth, which is seconds at construction for 16k images."""
    height, width = size
    # (R,) structured: rows['bbox'] is (R, 4) float32, rows['label'] (R,) int64, ...
    rows = np.array(labelled, [('bbox', np.float32, 4), ('label', np.int64), ('difficult', bool)])
    bbox = rows['bbox']
    clipped = np.clip(bbox, 0, np.array([width, height, width, height], np.float32))
    for box in bbox[(clipped != bbox).any(1)].tolist():
        warnings.warn(f'{path}: box {box} reaches outside the {width}x{height} image; clipped',
                      stacklevel=4)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    for box in clipped[~keep].tolist():
        warnings.warn(f'{path}: box {box} is empty (x_max <= x_min or y_max <= y_min); dropped',
                      stacklevel=4)
    return tuple(torch.from_numpy(a[keep]) for a in (clipped, rows['label'], rows['difficult']))


class VOCBboxDataset:
    """Boxes and labels of a VOC or VOC-format folder (see the module docstring for layouts).

    All annotations of the split are parsed, and every image's size read from its header, at
    construction. Sample i is image (3, H, W) float32 RGB 0..255, bbox (R, 4) float32 x_min
    y_min x_max y_max 0-based, clipped to the image, label (R,) int64 index into class_names,
    difficult (R,) bool. Every object is returned, difficult ones with their flag set: whoever
    trains drops them, evaluation ignores them.

    class_names: None discovers them (sorted unique object names of all XML files of the folder,
    whatever the split) except for a VOC20xx folder, which gets VOC_BBOX_LABEL_NAMES.
    skip_bad: skip this split's samples with bad data (XML, missing or unreadable image), with a
    warning each, instead of raising DataError; self.skipped lists their XML paths.
    check_images: decode every image fully at construction, so that a corrupt or truncated
    image fails now (raised, or skipped with skip_bad) rather than hours into training.
    """

    def __init__(self, data_dir, split='trainval', class_names=None, skip_bad=False,
                 check_images=False):
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f'{data_dir}: dataset folder not found; {LAYOUT}')
        folders = _Folders()
        ann_dir = folders.subfolder(data_dir, 'Annotations') or data_dir
        xml_paths = folders.files(ann_dir, '.xml')  # id -> path
        if not xml_paths:
            raise DataError(f'{data_dir}: no annotation XML files found; {LAYOUT}')
        ids = _split_ids(data_dir, split, sorted(xml_paths), folders)
        xml_paths = {i: xml_paths.get(i, ann_dir / f'{i}.xml') for i in set(xml_paths) | set(ids)}
        self.skipped, self._skip_bad = [], skip_bad
        records = {i: self._guarded(xml_paths[i], _parse_xml, xml_paths[i]) for i in ids}
        records = {i: record for i, record in records.items() if record is not None}
        if class_names is None and not re.fullmatch(r'VOC20\d\d', data_dir.resolve().name):
            # Discovery reads every split. A bad file of another split is its own split's to
            # report: it raises without skip_bad and is passed over silently with it.
            for i in sorted(set(xml_paths) - set(ids)):
                with contextlib.suppress(DataError if skip_bad else ()):
                    records[i] = _parse_xml(xml_paths[i])
            class_names = sorted({obj[0] for _, objects in records.values() for obj in objects})
            if not class_names:
                raise DataError(f'{data_dir}: no objects in any XML file; pass class_names')
        self.class_names = tuple(VOC_BBOX_LABEL_NAMES if class_names is None else class_names)

        image_dirs = [folders.subfolder(data_dir, name) for name in IMAGE_FOLDERS]
        image_dirs = [ann_dir] + [folder for folder in image_dirs if folder is not None]
        samples = {i: self._guarded(xml_paths[i], self._sample, xml_paths[i], *records[i], data_dir,
                                    image_dirs, folders) for i in ids if i in records}
        self._set_samples(samples, xml_paths, check_images, data_dir, split, 'files')

    def _guarded(self, where, function, *args):
        """function(*args); on DataError raise, or with skip_bad warn, note where (the bad
        file or record) in self.skipped and return None."""
        try:
            return function(*args)
        except DataError as e:
            if not self._skip_bad:
                raise
            warnings.warn(f'skipping: {e}', stacklevel=3)
            self.skipped.append(where)
            return None

    def _sample(self, xml_path, filename, objects, data_dir, image_dirs, folders):
        """-> (image path, (H, W), bbox, label, difficult) of one annotation file (its
        _parse_xml record: filename, objects), the boxes clipped to the image's real size."""
        unknown = sorted({name for name, _, _ in objects} - set(self.class_names))
        if unknown:
            raise DataError(f'{xml_path}: unknown class names {unknown}; '
                            f'valid: {", ".join(self.class_names)}')
        image_path = _find_image(xml_path, filename, data_dir, image_dirs, folders)
        size = _image_size(image_path)
        labelled = [(box, self.class_names.index(name), flag) for name, box, flag in objects]
        return (image_path, size) + _clip(size, xml_path, labelled)

    def _set_samples(self, samples, wheres, check_images, source, split, unit):
        """self.ids and self._samples from samples {id: sample, or None when skipped}: those not
        skipped, and with check_images only those whose image decodes (every pixel: truncated
        files fail too), a failure raised or with skip_bad skipped as wheres[id]. Threads
        decode, as PIL releases the GIL while decoding: one per core, at most 8. Then a warning
        '<source>: skipped n bad <unit> of split ...' counts self.skipped (unit: 'files' or
        'records'), and DataError is raised when no sample is left."""
        samples = {i: sample for i, sample in samples.items() if sample is not None}
        if check_images:
            pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
            try:
                futures = {i: pool.submit(_decodes, sample[0]) for i, sample in samples.items()}
                bar = tqdm(futures.items(), desc='checking images', disable=None, leave=False)
                samples = {i: samples[i] for i, future in bar
                           if self._guarded(wheres[i], future.result) is not None}
            finally:
                pool.shutdown(cancel_futures=True)  # on an error, do not decode the rest first
        self.ids, self._samples = list(samples), list(samples.values())
        if self.skipped:  # stacklevel 3: the code that constructed the dataset
            warnings.warn(f'{source}: skipped {len(self.skipped)} bad {unit} of split {split!r}',
                          stacklevel=3)
        if not self.ids:
            raise DataError(f'{source}: split {split!r} has no samples')

    def __add__(self, other):
        """A dataset of the samples of both (VOC07+12 trainval); the classes must agree."""
        assert self.class_names == other.class_names
        union = copy.copy(self)
        union.ids, union._samples = self.ids + other.ids, self._samples + other._samples
        union.skipped = self.skipped + other.skipped
        return union

    def __len__(self):
        return len(self.ids)

    def image_path(self, i):
        """Path of sample i's image file."""
        return self._samples[i][0]

    def image_size(self, i):
        """(H, W) ints: the real size of sample i's image, read from its file at construction."""
        return self._samples[i][1]

    def get_annotation(self, i):
        """(bbox, label, difficult) of sample i without reading its image."""
        return self._samples[i][2:]

    def __getitem__(self, i):
        return (read_image(self.image_path(i)), *self.get_annotation(i))
