import json

import pytest
import torch
from PIL import Image

from data.dataset import (
    TrainDataset,
    build_bbox_dataset,
    collate_test,
    collate_train,
    usable_indices,
)
from data.util import DataError
from model.transform import denormalize, resize_image


class FakeBboxDataset:
    """Image i is (3, 40, 60 + 10 i) black with a white box (10, 5, 30, 25) of label i % 2."""
    class_names = ('a', 'b')

    def __len__(self):
        return 8

    def __getitem__(self, i):
        image = torch.zeros(3, 40, 60 + 10 * i)
        image[:, 5:25, 10:30] = 255
        bbox = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
        return image, bbox, torch.tensor([i % 2]), torch.tensor([False])

    def get_annotation(self, i):
        return self[i][1:]


def test_train_dataset_resizes_and_normalises():
    dataset = TrainDataset(FakeBboxDataset(), 80, 1000, 'caffe', flip=False)
    assert len(dataset) == 8
    image, bbox, label, scale = dataset[0]
    assert image.shape == (3, 80, 120) and scale == 2.0
    assert bbox.tolist() == [[20, 10, 60, 50]] and label.tolist() == [0]
    raw = FakeBboxDataset()[0][0]
    assert torch.allclose(denormalize(image, 'caffe'), resize_image(raw, 80, 1000)[0],
                          atol=1e-3)
    image, bbox, _, scale = TrainDataset(FakeBboxDataset(), 20, 45, 'torchvision')[4]
    assert image.shape == (3, 18, 45) and scale == 0.45  # long side 100 capped at 45
    assert bbox[0, [1, 3]].tolist() == pytest.approx([2.25, 11.25])


def test_train_dataset_flip_moves_box_with_image():
    dataset = TrainDataset(FakeBboxDataset(), 40, 1000, 'torchvision')
    for i in range(len(dataset)):
        image, bbox, _, _ = dataset[i]
        x_min, y_min, x_max, y_max = bbox[0].round().int().tolist()
        white = denormalize(image, 'torchvision')[0] > 128
        ys, xs = torch.nonzero(white, as_tuple=True)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x_min, y_min, x_max, y_max)


def _flips(dataset, epoch):
    dataset.set_epoch(epoch)
    return [dataset[i][1][0, 0].item() != 10 for i in range(len(dataset))]


def test_flips_depend_on_seed_epoch_index_only():
    first = TrainDataset(FakeBboxDataset(), 40, 1000, 'caffe', seed=3)
    flips = [_flips(first, epoch) for epoch in range(4)]
    again = TrainDataset(FakeBboxDataset(), 40, 1000, 'caffe', seed=3)
    assert [_flips(again, epoch) for epoch in (3, 2, 1, 0)] == flips[::-1]
    every = sum(flips, [])
    assert 0 < sum(every) < len(every)  # both occur
    assert len({tuple(f) for f in flips}) > 1  # epochs differ
    other = TrainDataset(FakeBboxDataset(), 40, 1000, 'caffe', seed=4)
    assert [_flips(other, epoch) for epoch in range(4)] != flips
    never = TrainDataset(FakeBboxDataset(), 40, 1000, 'caffe', flip=False)
    assert not any(sum((_flips(never, epoch) for epoch in range(4)), []))


class DifficultBboxDataset(FakeBboxDataset):
    """FakeBboxDataset with a second, difficult object of label 1 in each image."""

    def __getitem__(self, i):
        image, bbox, _, _ = super().__getitem__(i)
        return (image, torch.cat([bbox, bbox + 2]), torch.tensor([0, 1]),
                torch.tensor([False, True]))


def test_train_dataset_drops_difficult_objects_unless_asked():
    _, bbox, label, _ = TrainDataset(DifficultBboxDataset(), 40, 1000, 'caffe', flip=False)[0]
    assert label.tolist() == [0] and bbox.tolist() == [[10, 5, 30, 25]]
    _, bbox, label, _ = TrainDataset(DifficultBboxDataset(), 40, 1000, 'caffe', flip=False,
                                     use_difficult=True)[0]
    assert label.tolist() == [0, 1] and bbox.tolist() == [[10, 5, 30, 25], [12, 7, 32, 27]]


class SizedBboxDataset:
    """Only sizes and paths: image i has size sizes[i] and path img<i>.jpg."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def image_size(self, i):
        return self.sizes[i]

    def image_path(self, i):
        return f'img{i}.jpg'


def test_usable_indices_refuses_or_skips_by_name():
    dataset = SizedBboxDataset([(375, 500), (1, 1), (480, 640), (100, 10000)])
    with pytest.raises(DataError, match=r'img1\.jpg: the image is 1x1, .*--skip-bad'):
        usable_indices(dataset, 600, 1000, 16, 16)
    with pytest.warns(UserWarning) as record:
        assert usable_indices(dataset, 600, 1000, 16, 16, skip_bad=True) == [0, 2]
    assert [str(w.message).split(':')[:2] for w in record] == [
        ['skipping', ' img1.jpg'], ['skipping', ' img3.jpg']]


def test_train_dataset_bad_normalization():
    with pytest.raises(ValueError, match='valid: caffe, torchvision'):
        TrainDataset(FakeBboxDataset(), 40, 1000, 'bgr')


def test_collate_train_pads():
    dataset = TrainDataset(FakeBboxDataset(), 40, 1000, 'caffe', flip=False)
    batch = collate_train([dataset[0], dataset[3]])  # (40, 60) and (40, 90)
    assert batch['images'].shape == (2, 3, 40, 90)
    assert batch['sizes'].dtype == torch.int64 and batch['sizes'].tolist() == [[40, 60], [40, 90]]
    assert torch.equal(batch['images'][0, :, :, :60], dataset[0][0])
    assert (batch['images'][0, :, :, 60:] == 0).all()
    assert torch.equal(batch['images'][1], dataset[3][0])
    assert [b.tolist() for b in batch['bboxes']] == [[[10, 5, 30, 25]]] * 2
    assert [label.tolist() for label in batch['labels']] == [[0], [1]]
    assert batch['scales'].dtype == torch.float32 and batch['scales'].tolist() == [1, 1]
    tall = TrainDataset(FakeBboxDataset(), 50, 1000, 'caffe', flip=False)
    batch = collate_train([tall[0], dataset[1]])  # (50, 75) and (40, 70)
    assert batch['images'].shape == (2, 3, 50, 75) and (batch['images'][1, :, 40:] == 0).all()


def test_collate_test_keeps_original_sizes():
    dataset = FakeBboxDataset()
    image, bbox, label, difficult = dataset[2]
    assert image.shape == (3, 40, 80) and image.max() == 255
    batch = collate_test([dataset[0], dataset[1]])
    assert [i.shape[2] for i in batch['images']] == [60, 70]
    assert len(batch['bboxes']) == len(batch['labels']) == len(batch['difficults']) == 2


def _voc_year(root, ids, name='dog'):
    (root / 'Annotations').mkdir(parents=True)
    (root / 'JPEGImages').mkdir()
    (root / 'ImageSets' / 'Main').mkdir(parents=True)
    for image_id in ids:
        (root / 'Annotations' / f'{image_id}.xml').write_text(
            f'<annotation><filename>{image_id}.jpg</filename><object><name>{name}</name>'
            '<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>'
            '</object></annotation>')
        Image.new('RGB', (12, 10)).save(root / 'JPEGImages' / f'{image_id}.jpg')
    for split, split_ids in (('trainval', ids[:-1]), ('test', ids[-1:])):
        (root / 'ImageSets' / 'Main' / f'{split}.txt').write_text('\n'.join(split_ids))


def test_build_voc(tmp_path):
    _voc_year(tmp_path / 'VOC2007', ['000001', '000002', '000003'])
    _voc_year(tmp_path / 'VOC2012', ['2008_000001', '2008_000002'], name='cat')
    for data_dir in (tmp_path, tmp_path / 'VOC2007'):
        voc07 = build_bbox_dataset('voc07', data_dir, 'trainval')
        assert voc07.ids == ['000001', '000002'] and len(voc07.class_names) == 20
    union = build_bbox_dataset('voc0712', tmp_path, 'trainval')
    assert len(union) == 3 and union.ids == ['000001', '000002', '2008_000001']
    assert union.class_names == voc07.class_names
    assert union[2][2].tolist() == [7] and union.get_annotation(2)[1].tolist() == [7]  # cat
    assert union.get_annotation(0)[1].tolist() == [11]  # dog
    assert union.image_path(2).name == '2008_000001.jpg'
    test = build_bbox_dataset('voc0712', tmp_path, 'test')
    assert test.ids == ['000003'] and test.get_annotation(0)[0].tolist() == [[0, 0, 8, 8]]


def test_build_custom_and_toy(tmp_path, toy_root, monkeypatch):
    _voc_year(tmp_path / 'mine', ['a', 'b'], name='widget')
    assert build_bbox_dataset('custom', tmp_path / 'mine', 'test').class_names == ('widget',)
    with pytest.raises(DataError, match=r"unknown class names \['widget'\]; valid: aeroplane"):
        build_bbox_dataset('voc07', tmp_path / 'mine', 'test')  # VOC classes, whatever the name
    toy = build_bbox_dataset('toy', toy_root, 'test')
    assert toy.class_names == ('circle', 'square', 'triangle') and len(toy) == 20
    monkeypatch.setattr('data.dataset.toy_dataset_dir', lambda: toy_root)
    assert build_bbox_dataset('toy', None, 'trainval').ids == [f'{k:06d}' for k in range(1, 61)]


def test_build_errors(tmp_path):
    with pytest.raises(ValueError, match='unknown dataset .lvis.; valid: voc07, voc0712, custom'):
        build_bbox_dataset('lvis', tmp_path, 'trainval')
    with pytest.raises(DataError, match='VOC2012: dataset folder not found'):
        _voc_year(tmp_path / 'VOC2007', ['1', '2'])
        build_bbox_dataset('voc0712', tmp_path, 'trainval')
    with pytest.raises(ValueError, match="'voc07' needs a data folder"):
        build_bbox_dataset('voc07', None, 'trainval')
    with pytest.raises(DataError, match='missing: dataset folder not found'):
        build_bbox_dataset('custom', tmp_path / 'missing', 'trainval')


def _coco_json(path, names, categories=((1, 'cat'), (3, 'dog')), image_folder='.'):
    """A COCO JSON at path with 12x10 images names (written to path's folder/image_folder),
    one box of the last category each."""
    (path.parent / image_folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new('RGB', (12, 10)).save(path.parent / image_folder / f'{name}.png')
    path.write_text(json.dumps({
        'images': [{'id': k, 'file_name': f'{name}.png', 'width': 12, 'height': 10}
                   for k, name in enumerate(names)],
        'annotations': [{'image_id': k, 'category_id': categories[-1][0], 'bbox': [1, 1, 4, 4]}
                        for k in range(len(names))],
        'categories': [{'id': i, 'name': name} for i, name in categories]}))
    return path


def test_build_coco_one_json_or_two(tmp_path):
    names = [f'img{k}' for k in range(12)]
    one = _coco_json(tmp_path / 'one' / 'all.json', names)
    splits = {split: build_bbox_dataset('coco', None, split, coco_json=one)
              for split in ('trainval', 'test')}
    assert sorted(splits['trainval'].ids + splits['test'].ids) == list(range(12))
    assert len(splits['test']) == 5 and splits['test'].image_path(0).parent == one.parent
    trainval = _coco_json(tmp_path / 'two' / 'trainval.json', names[:3], image_folder='images')
    test = _coco_json(tmp_path / 'two' / 'test.json', ['t'], ((3, 'dog'), (7, 'cat')), 'images')
    options = dict(coco_json=trainval, coco_test_json=test, image_dir=tmp_path / 'two' / 'images')
    train_set = build_bbox_dataset('coco', None, 'trainval', **options)
    assert train_set.ids == [0, 1, 2] and train_set.class_names == ('cat', 'dog')
    test_set = build_bbox_dataset('coco', None, 'test', train_set.class_names, **options)
    assert test_set.ids == [0] and test_set.class_names == ('cat', 'dog')  # trainval's order
    assert test_set.category_ids == (7, 3) and test_set.get_annotation(0)[1].tolist() == [0]
    with pytest.raises(ValueError, match="dataset 'coco' needs a COCO JSON file"):
        build_bbox_dataset('coco', tmp_path, 'trainval')


def test_build_coco2017(tmp_path):
    _coco_json(tmp_path / 'annotations' / 'instances_train2017.json', ['a', 'b'],
               image_folder='../train2017')
    _coco_json(tmp_path / 'annotations' / 'instances_val2017.json', ['c'],
               image_folder='../val2017')
    trainval = build_bbox_dataset('coco2017', tmp_path, 'trainval')
    assert trainval.ids == [0, 1] and trainval.image_path(1) == tmp_path / 'train2017' / 'b.png'
    test = build_bbox_dataset('coco2017', tmp_path, 'test', trainval.class_names)
    assert test.image_path(0) == tmp_path / 'val2017' / 'c.png'
    with pytest.raises(ValueError, match=r"'coco2017' has splits trainval \(train2017\) and test"):
        build_bbox_dataset('coco2017', tmp_path, 'val')
    with pytest.raises(DataError, match=r'instances_train2017\.json: unreadable or malformed'):
        build_bbox_dataset('coco2017', tmp_path / 'elsewhere', 'trainval')
