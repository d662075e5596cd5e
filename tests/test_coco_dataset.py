import json
import warnings

import pytest
import torch
from PIL import Image

from data.coco_dataset import COCOBboxDataset
from data.dataset import build_bbox_dataset
from data.toy import make_toy_dataset
from data.util import DataError
from data.voc_dataset import VOCBboxDataset, _hash_split
from misc.voc_to_coco import write_coco_json

CATEGORIES = [{'id': 90, 'name': 'zebra'}, {'id': 1, 'name': 'person'}, {'id': 5, 'name': 'car'}]


def _image(path, size=(40, 60), colour=(200, 100, 50)):
    """A (H, W) = size PNG of one colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size[::-1], colour).save(path)


def _coco(tmp_path, images=None, annotations=None, categories=CATEGORIES, name='coco.json'):
    """tmp_path/name, a COCO JSON of these records (defaults: a.png with one car, b.png with
    none), and a 40x60 PNG in tmp_path for each image record with a file_name."""
    images = [{'id': 1, 'file_name': 'a.png', 'width': 60, 'height': 40},
              {'id': 2, 'file_name': 'b.png', 'width': 60, 'height': 40}] \
        if images is None else images
    for image in images:
        if isinstance(image, dict) and isinstance(image.get('file_name'), str):
            _image(tmp_path / image['file_name'])
    annotations = [{'id': 1, 'image_id': 1, 'category_id': 5, 'bbox': [2, 3, 10, 20.5],
                    'iscrowd': 0}] if annotations is None else annotations
    path = tmp_path / name
    path.write_text(json.dumps({'images': images, 'annotations': annotations,
                                'categories': categories}))
    return path


def test_boxes_labels_and_accessors(tmp_path):
    annotations = [{'image_id': 2, 'category_id': 90, 'bbox': [0, 0, 60, 40], 'iscrowd': 0},
                   {'image_id': 2, 'category_id': 1, 'bbox': [1.5, 2, 3, 4]},  # no iscrowd
                   {'image_id': 2, 'category_id': 5, 'bbox': [10, 10, 5, 5], 'iscrowd': 1},
                   {'image_id': 1, 'category_id': 5, 'bbox': [2, 3, 10, 20.5], 'iscrowd': 0}]
    dataset = COCOBboxDataset(_coco(tmp_path, annotations=annotations), tmp_path, 'all')
    assert dataset.class_names == ('person', 'car', 'zebra')  # in order of category id
    assert dataset.category_ids == (1, 5, 90) and dataset.ids == [1, 2] and len(dataset) == 2
    bbox, label, difficult = dataset.get_annotation(1)
    assert bbox.dtype == torch.float32 and bbox.tolist() == [
        [0, 0, 60, 40], [1.5, 2, 4.5, 6], [10, 10, 15, 15]]  # x_max = x + width
    assert label.dtype == torch.int64 and label.tolist() == [2, 0, 1]
    assert difficult.dtype == torch.bool and difficult.tolist() == [False, False, True]
    image, bbox, label, difficult = dataset[0]
    assert image.shape == (3, 40, 60) and image[:, 5, 5].tolist() == [200, 100, 50]
    assert bbox.tolist() == [[2, 3, 12, 23.5]] and label.tolist() == [1]
    assert dataset.image_path(0) == tmp_path / 'a.png' and dataset.image_size(0) == (40, 60)
    assert [dataset.category_ids[k] for k in label.tolist()] == [5]  # back to COCO ids


def test_image_without_annotations_is_kept(tmp_path):
    dataset = COCOBboxDataset(_coco(tmp_path), tmp_path, 'all')
    bbox, label, difficult = dataset.get_annotation(1)
    assert dataset.ids == [1, 2] and bbox.shape == (0, 4) and bbox.dtype == torch.float32
    assert label.shape == (0,) and label.dtype == torch.int64 and difficult.dtype == torch.bool


def test_given_class_names_select_and_order_categories(tmp_path):
    path = _coco(tmp_path)
    dataset = COCOBboxDataset(path, tmp_path, 'all', class_names=['car', 'zebra'])
    assert dataset.class_names == ('car', 'zebra') and dataset.category_ids == (5, 90)
    assert dataset.get_annotation(0)[1].tolist() == [0]
    with pytest.raises(DataError, match=r"annotations\[0\]: unknown class name 'car'; "
                                        'valid: person, zebra'):
        COCOBboxDataset(path, tmp_path, 'all', class_names=['person', 'zebra'])
    with pytest.warns(UserWarning) as record:
        dataset = COCOBboxDataset(path, tmp_path, 'all', class_names=['zebra'], skip_bad=True)
    assert dataset.ids == [2] and dataset.skipped == [f'{path}: images[0]']
    assert [str(w.message) for w in record] == [
        f"skipping: {path}: annotations[0]: unknown class name 'car'; valid: zebra",
        f"{path}: skipped 1 bad records of split 'all'"]
    with pytest.raises(DataError, match=r"coco\.json: class names \['dog'\] are not among its"):
        COCOBboxDataset(path, tmp_path, 'all', class_names=['car', 'dog'])


def test_hash_split_is_the_voc_format_rule(tmp_path):
    """A VOC-format folder (no ImageSets) and its COCO JSON split the same images."""
    names = [f'img{k}' for k in range(12)]
    images = [{'id': k, 'file_name': f'{name}.png', 'width': 60, 'height': 40}
              for k, name in enumerate(names)]
    path = _coco(tmp_path, images, [])
    for name in names:
        (tmp_path / f'{name}.xml').write_text(f'<annotation><filename>{name}.png</filename>'
                                              '</annotation>')
    splits = {}
    for split in ('trainval', 'test'):
        dataset = COCOBboxDataset(path, tmp_path, split)
        splits[split] = [dataset.image_path(i).stem for i in range(len(dataset))]
        assert splits[split] == _hash_split(names, split)
        assert splits[split] == VOCBboxDataset(tmp_path, split, class_names=['x']).ids
    assert len(splits['test']) == 5 and sorted(sum(splits.values(), [])) == sorted(names)
    assert len(COCOBboxDataset(path, tmp_path, 'all')) == 12
    with pytest.raises(DataError, match=r"coco\.json: unknown split 'val2017'; valid: all, "):
        COCOBboxDataset(path, tmp_path, 'val2017')


def _bad_json(tmp_path):
    path = tmp_path / 'coco.json'
    path.write_text('{"images": [')
    return path


def _with(key, value, record=0, kind='images'):
    """A _coco writer whose kind[record] (kind None: the top level) has key set to value,
    deleted when value is None."""
    def write(tmp_path):
        path = _coco(tmp_path)
        data = json.loads(path.read_text())
        target = data if kind is None else data[kind][record]
        if value is None:
            del target[key]
        else:
            target[key] = value
        path.write_text(json.dumps(data))
        return path
    return write


def _missing_image(tmp_path):
    path = _coco(tmp_path)
    (tmp_path / 'a.png').unlink()
    return path


def _unreadable_image(tmp_path):
    path = _coco(tmp_path)
    (tmp_path / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    return path


@pytest.mark.parametrize('write, match', [
    (_bad_json, r'unreadable or malformed JSON \(Expecting value: line 1 column 13'),
    (lambda tmp_path: tmp_path / 'coco.json', r'unreadable .* \(\[Errno 2\] No such file'),
    (lambda tmp_path: _coco(tmp_path, categories=None), 'categories None is not a list'),
    (_with('categories', None, kind=None), "missing key 'categories'"),
    (_with('name', None, kind='categories'), r"categories\[0\]: missing key 'name'"),
    (_with('id', 'seven', kind='categories'), r"categories\[0\]: id 'seven' is not a unique int"),
    (_with('id', 1, 2, 'categories'), r'categories\[2\]: id 1 is not a unique integer'),
    (_with('file_name', None), r"images\[0\]: missing key 'file_name'"),
    (_with('file_name', ''), r"images\[0\]: file_name '' is not a non-empty string"),
    (_with('id', 1, record=1), r'images\[1\]: id 1 is not a unique integer or string'),
    (_with('id', [1]), r'images\[0\]: id \[1\] is not a unique integer or string'),
    (_with('width', None), r"images\[0\]: missing key 'width'"),
    (_with('height', 0), r'images\[0\]: height 0 is not a positive number'),
    (_with('width', 'wide'), r"images\[0\]: width 'wide' is not a positive number"),
    (_with('width', 61), r'images\[0\]: .*a\.png is 60x40, not 61x40; every box would be mis'),
    (_missing_image, r'images\[0\]: .*a\.png: cannot read image \(FileNotFoundError'),
    (_unreadable_image, r'images\[0\]: .*a\.png: cannot read image'),
    (_with('image_id', 7, kind='annotations'), r'annotations\[0\]: image_id 7 is not one of its '
                                               'image ids'),
    (_with('image_id', None, kind='annotations'), r"annotations\[0\]: missing key 'image_id'"),
    (_with('category_id', 2, kind='annotations'), r'annotations\[0\]: category_id 2 is not one '
                                                   'of its category ids'),
    (_with('bbox', None, kind='annotations'), r"annotations\[0\]: missing key 'bbox'"),
    (_with('bbox', [1, 2, 'x', 4], kind='annotations'), r"annotations\[0\]: bbox \[1, 2, 'x', 4\] "
                                                        r'is not \[x, y, width, height\] of fin'),
    (_with('bbox', [1, 2, 3], kind='annotations'), r'annotations\[0\]: bbox \[1, 2, 3\] is not'),
    (_with('bbox', [1, 2, -3, 4], kind='annotations'), r'annotations\[0\]: bbox .* is not'),
    (_with('bbox', {'x': 1}, kind='annotations'), r'annotations\[0\]: bbox .* is not'),
])
def test_bad_records_name_the_file(tmp_path, write, match):
    with pytest.raises(DataError, match=r'coco\.json: ' + match):
        COCOBboxDataset(write(tmp_path), tmp_path, 'all')


def test_skip_bad_skips_and_counts(tmp_path):
    images = [{'id': k, 'file_name': f'{k}.png', 'width': 60, 'height': 40} for k in range(4)]
    images.append({'id': 9})  # no file_name
    annotations = [{'image_id': 0, 'category_id': 1, 'bbox': [1, 1, 5, 5]},
                   {'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 'x', 5]},
                   {'image_id': 8, 'category_id': 1, 'bbox': [1, 1, 5, 5]}]  # no such image
    path = _coco(tmp_path, images, annotations)
    images[2]['width'] = 0
    (tmp_path / '3.png').unlink()
    path.write_text(json.dumps({'images': images, 'annotations': annotations,
                                'categories': CATEGORIES}))
    with pytest.warns(UserWarning) as record:
        dataset = COCOBboxDataset(path, tmp_path, 'all', skip_bad=True)
    assert dataset.ids == [0] and dataset.get_annotation(0)[0].tolist() == [[1, 1, 6, 6]]
    expected = ['images[4]', 'annotations[2]', 'images[1]', 'images[2]', 'images[3]']
    assert dataset.skipped == [f'{path}: {where}' for where in expected]
    messages = [str(w.message) for w in record]
    named = ['images[4]', 'annotations[2]', 'annotations[1]', 'images[2]', 'images[3]']
    assert [m.split(': ')[:3] for m in messages[:-1]] == [  # the bad record, not its image
        ['skipping', str(path), where] for where in named]
    assert messages[-1] == f"{path}: skipped 5 bad records of split 'all'"


def test_empty_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"coco\.json: split 'all' has no samples"):
        COCOBboxDataset(_coco(tmp_path, images=[], annotations=[]), tmp_path, 'all')
    path = _coco(tmp_path, images=[{'id': 1}], annotations=[])  # its only image is bad
    with pytest.warns(UserWarning) as record, \
            pytest.raises(DataError, match=r"coco\.json: split 'all' has no samples"):
        COCOBboxDataset(path, tmp_path, 'all', skip_bad=True)
    assert [str(w.message) for w in record] == [
        f"skipping: {path}: images[0]: missing key 'file_name'",
        f"{path}: skipped 1 bad records of split 'all'"]


def test_check_images_catches_truncated_image(tmp_path):
    path = _coco(tmp_path)
    data = (tmp_path / 'b.png').read_bytes()
    (tmp_path / 'b.png').write_bytes(data[:len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the header reads: only decoding finds it
        assert len(COCOBboxDataset(path, tmp_path, 'all')) == 2
    with pytest.raises(DataError, match=r'b\.png: cannot read image'):
        COCOBboxDataset(path, tmp_path, 'all', check_images=True)
    with pytest.warns(UserWarning) as record:
        dataset = COCOBboxDataset(path, tmp_path, 'all', skip_bad=True, check_images=True)
    assert dataset.ids == [1] and dataset.skipped == [f'{path}: images[1]']
    assert [str(w.message) for w in record] == [
        f'skipping: {tmp_path / "b.png"}: cannot read image (OSError: image file is truncated)',
        f"{path}: skipped 1 bad records of split 'all'"]


def test_boxes_outside_are_clipped_empty_ones_dropped(tmp_path):
    annotations = [{'image_id': 1, 'category_id': 1, 'bbox': bbox}
                   for bbox in ([-5, 1, 70, 50], [10, 10, 0, 5], [70, 1, 10, 5])]
    with pytest.warns(UserWarning) as record:
        dataset = COCOBboxDataset(_coco(tmp_path, annotations=annotations), tmp_path, 'all')
    messages = [str(w.message) for w in record]
    assert all(m.startswith(f'{tmp_path / "coco.json"}: images[0]: box') for m in messages)
    assert sum('outside the 60x40 image; clipped' in m for m in messages) == 2  # boxes 0, 2
    assert sum('dropped' in m for m in messages) == 2  # boxes 1, 2
    assert dataset.get_annotation(0)[0].tolist() == [[0, 1, 60, 40]]


def test_toy_as_coco_equals_toy_as_voc(tmp_path):
    root = make_toy_dataset(tmp_path / 'toy', n_trainval=12, n_test=4, seed=0)
    paths = write_coco_json(root)
    n_difficult = 0
    for split in ('trainval', 'test'):
        voc = VOCBboxDataset(root, split)
        coco = build_bbox_dataset('coco', None, split, coco_json=paths['trainval'],
                                  coco_test_json=paths['test'])
        assert coco.class_names == voc.class_names and coco.category_ids == (1, 2, 3)
        assert coco.ids == [int(i) for i in voc.ids]
        for i in range(len(voc)):
            assert coco.image_path(i) == voc.image_path(i)
            assert coco.image_size(i) == voc.image_size(i)
            for coco_array, voc_array in zip(coco.get_annotation(i), voc.get_annotation(i),
                                             strict=True):
                assert coco_array.dtype == voc_array.dtype
                assert torch.equal(coco_array, voc_array)  # exactly
            n_difficult += int(voc.get_annotation(i)[2].sum())
    assert n_difficult > 0  # the iscrowd round trip is exercised
    out = write_coco_json(root, tmp_path / 'elsewhere')  # file_names relative to out
    coco = COCOBboxDataset(out['test'], out['test'].parent, 'all')
    assert coco.image_path(0).resolve() == (root / 'JPEGImages' / '000013.jpg').resolve()
