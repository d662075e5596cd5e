"""COCO-format detection data: a COCO JSON file and the folder of its images, as a bbox dataset.

The JSON holds images (id, file_name relative to the image folder, width, height), annotations
(image_id, category_id, bbox [x, y, width, height] in 0-based continuous pixels, so x_max = x +
width; iscrowd, 0 when absent) and categories (id, name). Crowd boxes (iscrowd=1) come back as
difficult: training drops them and evaluation ignores them, as COCO's own evaluation does.
Images without annotations are kept: they are the negatives.
"""
import json
import math
from pathlib import Path, PurePosixPath

from data.util import DataError
from data.voc_dataset import HASH_SPLITS, VOCBboxDataset, _clip, _hash_split, _image_size


def _is_number(value):
    return isinstance(value, int | float) and math.isfinite(value)


# What a field must be: (predicate, what it says when the value fails it).
LIST = (lambda value: isinstance(value, list), 'a list')
NAME = (lambda value: isinstance(value, str) and value != '', 'a non-empty string')
POSITIVE = (lambda value: _is_number(value) and value > 0, 'a positive number')
BBOX = (lambda box: isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))
        and min(box[2:]) >= 0, '[x, y, width, height] of finite numbers, width, height >= 0')


def _fields(record, where, checks):
    """record's values of the keys of checks, {key: (predicate, what the value must be)};
    DataError naming where when record is no JSON object, lacks a key or fails a check."""
    if not isinstance(record, dict):
        raise DataError(f'{where}: not a JSON object')
    for key, (ok, must_be) in checks.items():
        if key not in record or not ok(record[key]):
            raise DataError(f'{where}: ' + (f'{key} {record[key]!r} is not {must_be}'
                                            if key in record else f'missing key {key!r}'))
    return [record[key] for key in checks]


def _load(json_path):
    """The images, annotations and categories lists of a COCO JSON file, each record paired
    with where it is, as errors name it: 'file.json: images[k]'."""
    try:
        data = json.loads(json_path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: malformed, with the line and column
        raise DataError(f'{json_path}: unreadable or malformed JSON ({e})') from e
    lists = _fields(data, json_path, dict(images=LIST, annotations=LIST, categories=LIST))
    return [[(f'{json_path}: {key}[{k}]', record) for k, record in enumerate(records)]
            for key, records in zip(('images', 'annotations', 'categories'), lists)]


def _categories(json_path, records, class_names):
    """-> class_names, their category ids, {category id: name} of every category."""
    names = {}
    new_id = (lambda value: type(value) is int and value not in names, 'a unique integer')
    for where, record in records:
        category_id, name = _fields(record, where, dict(id=new_id, name=NAME))
        names[category_id] = name
    by_name = {name: category_id for category_id, name in sorted(names.items())}
    class_names = tuple(by_name if class_names is None else class_names)
    unknown = [name for name in class_names if name not in by_name]
    if unknown or not class_names:
        raise DataError(f'{json_path}: class names {unknown} are not among its categories; '
                        f'valid: {", ".join(by_name)}')
    return class_names, tuple(by_name[name] for name in class_names), names


class COCOBboxDataset(VOCBboxDataset):
    """Boxes and labels of the images of a COCO JSON file (see the module docstring).

    Samples, skip_bad, check_images and every accessor are VOCBboxDataset's. Each image's size
    is read from its header at construction and must be the JSON's width and height: a resized
    or rotated copy would misplace every box. ids are COCO image ids and category_ids[k] the
    COCO id of label k, so a detection (i, box, label) is the COCO result {image_id: ids[i],
    category_id: category_ids[label], bbox: x_min, y_min, x_max - x_min, y_max - y_min}.

    image_dir: the folder the file_names are relative to.
    split: 'all' is every image (a JSON that is one split, as COCO's own); 'trainval' or 'test'
    is the 80/20 hash split of data.voc_dataset's folders without ImageSets, of the file names'
    stems: a VOC-format folder converted to COCO keeps its split.
    class_names: None takes every category, in order of id; given, it selects and orders them
    by name, and an annotation of another category is an error, as an unknown class name is in
    VOCBboxDataset (with skip_bad its image is skipped).
    skipped names the skipped records, as 'file.json: images[k]'. Records of no known image
    (an image without a valid id or file_name, an annotation of an unknown image_id) are bad in
    every split; the rest of a bad image only in its own.
    """

    def __init__(self, json_path, image_dir, split='trainval', class_names=None, skip_bad=False,
                 check_images=False):
        json_path, image_dir = Path(json_path), Path(image_dir)
        if split != 'all' and split not in HASH_SPLITS:
            raise DataError(f'{json_path}: unknown split {split!r}; valid: all, '
                            f'{", ".join(HASH_SPLITS)}')
        images, annotations, categories = _load(json_path)
        self.class_names, self.category_ids, names = _categories(json_path, categories, class_names)
        # records: image id -> (where, record, [(where, ann)]), ann an annotation record
        self.skipped, self._skip_bad, records = [], skip_bad, {}
        new_id = (lambda value: isinstance(value, int | str) and value not in records,
                  'a unique integer or string')
        image_id = (lambda value: isinstance(value, int | str) and value in records,
                    'one of its image ids')
        for where, record in images:
            if self._guarded(where, _fields, record, where, dict(id=new_id, file_name=NAME)):
                records[record['id']] = (where, record, [])
        for where, record in annotations:
            if self._guarded(where, _fields, record, where, dict(image_id=image_id)):
                records[record['image_id']][2].append((where, record))
        ids = sorted(records, key=lambda i: records[i][1]['file_name'])
        if split != 'all':
            stems = {i: PurePosixPath(records[i][1]['file_name']).stem for i in ids}
            chosen = set(_hash_split(set(stems.values()), split))
            ids = [i for i in ids if stems[i] in chosen]
        samples = {i: self._guarded(records[i][0], self._image_sample, image_dir, *records[i],
                                    names) for i in ids}
        wheres = {i: records[i][0] for i in ids}
        self._set_samples(samples, wheres, check_images, json_path, split, 'records')

    def _image_sample(self, image_dir, where, record, anns, names):
        """-> (image path, (H, W), bbox, label, difficult) of an image record and its
        annotations anns [(where, ann)], the boxes clipped to the image."""
        width, height = _fields(record, where, dict(width=POSITIVE, height=POSITIVE))
        image_path = image_dir / record['file_name']
        size = _image_size(image_path, f'{where}: ')
        if size != (height, width):
            raise DataError(f'{where}: {image_path} is {size[1]}x{size[0]}, not {width}x{height}; '
                            'every box would be misplaced')
        known = (lambda value: type(value) is int and value in names, 'one of its category ids')
        labelled = []
        for where_ann, ann in anns:
            category_id, (x, y, w, h) = _fields(ann, where_ann, dict(category_id=known, bbox=BBOX))
            if category_id not in self.category_ids:
                raise DataError(f'{where_ann}: unknown class name {names[category_id]!r}; '
                                f'valid: {", ".join(self.class_names)}')
            labelled.append(([x, y, x + w, y + h], self.category_ids.index(category_id),
                             bool(ann.get('iscrowd', 0))))
        return (image_path, size) + _clip(size, where, labelled)
