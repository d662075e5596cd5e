import xml.etree.ElementTree as ET

import pytest
import torch

import data.toy as toy
from data.voc_dataset import VOCBboxDataset


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_deterministic_bytes(tmp_path):
    a = toy.make_toy_dataset(tmp_path / 'a', n_trainval=5, n_test=3, seed=1)
    b = toy.make_toy_dataset(tmp_path / 'b', n_trainval=5, n_test=3, seed=1)
    files = _files(a)
    assert len(files) == 2 * 8 + 2 + 1  # images, XMLs, two split files, stamp
    assert files == _files(b)
    c = toy.make_toy_dataset(tmp_path / 'c', n_trainval=5, n_test=3, seed=2)
    assert _files(c)[next(iter(files))] != files[next(iter(files))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a', 'b', 'c']  # no temp left


def test_reuse_regenerate_and_refuse(tmp_path, monkeypatch):
    root = toy.make_toy_dataset(tmp_path / 'toy', n_trainval=2, n_test=1)
    with monkeypatch.context() as patch:
        patch.setattr(toy, '_generate', None)  # a complete dataset is not generated again
        assert toy.make_toy_dataset(root, n_trainval=2, n_test=1) == root
    toy.make_toy_dataset(root, n_trainval=3, n_test=1)  # other arguments: replaced
    assert (root / 'ImageSets/Main/trainval.txt').read_text() == '000001\n000002\n000003\n'
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError, match='mine: not empty and not a toy dataset'):
        toy.make_toy_dataset(tmp_path / 'mine')


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_sample(rng):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sample(rng)

    sample = toy._sample
    monkeypatch.setattr(toy, '_sample', failing_sample)
    with pytest.raises(KeyboardInterrupt):
        toy.make_toy_dataset(tmp_path / 'toy', n_trainval=4, n_test=1)
    assert list(tmp_path.iterdir()) == []


def test_toy_dataset_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, 'make_toy_dataset', lambda root: root)
    assert toy.toy_dataset_dir(tmp_path) == tmp_path / toy.VERSION
    monkeypatch.setenv('FRCNN_CACHE', str(tmp_path / 'env'))
    assert toy.toy_dataset_dir() == tmp_path / 'env' / toy.VERSION


def test_loads_as_voc(toy_root):
    annotations, n_images = [], 0
    for split, size in (('trainval', 60), ('test', 20)):
        dataset = VOCBboxDataset(toy_root, split)
        assert dataset.class_names == toy.CLASS_NAMES and len(dataset) == size
        for i in range(len(dataset)):
            image, bbox, label, difficult = dataset[i]
            height, width = image.shape[1:]
            assert 224 <= height <= 320 and 224 <= width <= 320
            assert (bbox >= 0).all() and (bbox[:, [2, 3]] < torch.tensor([width, height])).all()
            sides = bbox[:, 2:] - bbox[:, :2] + 1  # VOC pixel extent
            assert (sides <= toy.MAX_OBJECT + 1).all()
            assert (sides[~difficult] >= toy.MIN_OBJECT - 1).all()
            annotations.append((label, difficult))
            n_images += 1
    labels = torch.cat([label for label, _ in annotations])
    difficult = torch.cat([d for _, d in annotations])
    assert torch.bincount(labels).min() > 0.2 * len(labels)  # balanced classes
    assert 0 < difficult.sum() < 0.15 * len(difficult)
    n_empty = sum(len(label) == 0 for label, _ in annotations)
    assert 0 < n_empty < 0.15 * n_images
    assert max(len(label) for label, _ in annotations) == 4


def test_xml_is_voc_format(toy_root):
    root = ET.parse(toy_root / 'Annotations' / '000001.xml').getroot()
    assert root.findtext('filename') == '000001.jpg'
    assert root.findtext('size/depth') == '3'
    for obj in root.iter('object'):
        assert obj.findtext('name') in toy.CLASS_NAMES
        assert obj.findtext('difficult') in ('0', '1')
        box = [int(obj.findtext(f'bndbox/{k}')) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
        assert box[0] >= 1 and box[1] >= 1  # 1-based
