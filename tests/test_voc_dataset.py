import hashlib
import io
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from data.util import DataError
from data.voc_dataset import VOC_BBOX_LABEL_NAMES, VOCBboxDataset


def _xml(filename, objects, size=(40, 60)):
    """objects: (name, (xmin, ymin, xmax, ymax) 1-based VOC, difficult or None)."""
    text = f'<annotation><filename>{filename}</filename>'
    if size:
        text += f'<size><width>{size[1]}</width><height>{size[0]}</height></size>'
    for name, box, difficult in objects:
        text += f'<object><name>{name}</name>'
        if difficult is not None:
            text += f'<difficult>{int(difficult)}</difficult>'
        text += ('<bndbox>' + ''.join(f'<{k}>{v}</{k}>' for k, v in zip(
            ('xmin', 'ymin', 'xmax', 'ymax'), box, strict=False)) + '</bndbox></object>')
    return text + '</annotation>'


def _image(path, size=(40, 60), colour=(200, 100, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size[::-1], colour).save(path)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def voc_dir(tmp_path):
    """A VOCdevkit year folder: 3 trainval images, 1 test image."""
    root = tmp_path / 'VOCdevkit' / 'VOC2007'
    annotations = {
        '000001': [('dog', (1, 1, 10, 20), 0), ('person', (5, 6, 30, 40), 1)],
        '000002': [('cat', (11, 21, 31, 36), None)],
        '000003': [],
        '000004': [('car', (2, 3, 4, 5), 0)],
    }
    for image_id, objects in annotations.items():
        _write(root / 'Annotations' / f'{image_id}.xml', _xml(f'{image_id}.jpg', objects))
        _image(root / 'JPEGImages' / f'{image_id}.jpg')
    _write(root / 'ImageSets' / 'Main' / 'trainval.txt', '000002\n000001\n000003\n')
    _write(root / 'ImageSets' / 'Main' / 'test.txt', '000004\n')
    return root


def test_voc_year_folder(voc_dir):
    dataset = VOCBboxDataset(voc_dir, 'trainval')
    assert dataset.class_names == VOC_BBOX_LABEL_NAMES and len(VOC_BBOX_LABEL_NAMES) == 20
    assert dataset.ids == ['000002', '000001', '000003'] and len(dataset) == 3
    bbox, label, difficult = dataset.get_annotation(1)  # 000001, its difficult person kept
    assert bbox.dtype == torch.float32 and bbox.tolist() == [[0, 0, 9, 19], [4, 5, 29, 39]]
    assert label.dtype == torch.int64 and label.tolist() == [
        VOC_BBOX_LABEL_NAMES.index('dog'), VOC_BBOX_LABEL_NAMES.index('person')]
    assert difficult.dtype == torch.bool and difficult.tolist() == [False, True]
    image, bbox2, label2, difficult2 = dataset[0]
    assert image.shape == (3, 40, 60) and image[:, 5, 5].tolist() == pytest.approx(
        [200, 100, 50], abs=2)
    assert bbox2.tolist() == [[10, 20, 30, 35]] and label2.tolist() == [7]
    assert difficult2.tolist() == [False]  # <difficult> missing -> False
    assert dataset.image_path(0) == voc_dir / 'JPEGImages' / '000002.jpg'
    assert dataset.image_size(0) == (40, 60)


def test_voc_difficult_kept_and_empty_image(voc_dir):
    dataset = VOCBboxDataset(voc_dir, 'trainval')
    _, bbox, label, difficult = dataset[1]  # 000001: every object, with its difficult flag
    assert bbox.tolist() == [[0, 0, 9, 19], [4, 5, 29, 39]]
    assert label.tolist() == [11, 14] and difficult.tolist() == [False, True]
    image, bbox, label, difficult = dataset[2]  # 000003 has no objects
    assert image.shape == (3, 40, 60)
    assert bbox.shape == (0, 4) and bbox.dtype == torch.float32
    assert label.shape == (0,) and label.dtype == torch.int64
    assert difficult.shape == (0,) and difficult.dtype == torch.bool


def test_voc_test_split_and_given_class_names(voc_dir):
    assert VOCBboxDataset(voc_dir, 'test').ids == ['000004']
    dataset = VOCBboxDataset(voc_dir, 'test', class_names=['truck', 'car'])
    assert dataset.class_names == ('truck', 'car') and dataset.get_annotation(0)[1].tolist() == [1]
    with pytest.raises(DataError, match=r"000002\.xml: unknown class names \['cat'\]"):
        VOCBboxDataset(voc_dir, 'trainval', class_names=['car'])


def test_voc_missing_split_file(voc_dir):
    with pytest.raises(DataError, match=r"val\.txt.*\['test', 'trainval'\]"):
        VOCBboxDataset(voc_dir, 'val')
    _write(voc_dir / 'ImageSets' / 'Main' / 'val.txt', '000009\n')
    with pytest.raises(DataError, match=r'000009\.xml: annotation file not found'):
        VOCBboxDataset(voc_dir, 'val')


def _labelimg_dir(root, image_folder=None, n=20):
    """n images of classes 'apple' / 'banana' (and one 'cherry'), labelImg style."""
    for k in range(n):
        name = ['apple', 'banana'][k % 2] if k != 7 else ' cherry '
        image_dir = root / image_folder if image_folder else root
        xml_dir = root / 'Annotations' if image_folder else root
        _write(xml_dir / f'img{k}.xml', _xml(f'img{k}.png', [(name, (k + 1, 2, k + 11, 12), 0)]))
        _image(image_dir / f'img{k}.png')
    return root


def test_labelimg_discovery_and_hash_split(tmp_path):
    root = _labelimg_dir(tmp_path / 'fruit')
    train, test = VOCBboxDataset(root, 'trainval'), VOCBboxDataset(root, 'test')
    assert train.class_names == test.class_names == ('apple', 'banana', 'cherry')
    ids = [f'img{k}' for k in range(20)]
    assert sorted(train.ids + test.ids) == sorted(ids) and not set(train.ids) & set(test.ids)
    expected_test = {i for i in ids if int(hashlib.sha1(i.encode()).hexdigest(), 16) % 5 == 0}
    assert set(test.ids) == expected_test and train.ids == sorted(train.ids)
    assert VOCBboxDataset(root, 'train').ids == train.ids
    assert VOCBboxDataset(root, 'val').ids == test.ids
    for dataset in (train, test):
        for i, image_id in enumerate(dataset.ids):
            k = int(image_id[3:])
            _, bbox, label, _ = dataset[i]
            assert bbox.tolist() == [[k, 1, k + 10, 11]]
            assert label.tolist() == [2 if k == 7 else k % 2]
    with pytest.raises(DataError, match='unknown split .*valid: trainval, train, test, val'):
        VOCBboxDataset(root, 'minival')


def test_annotations_and_images_folders(tmp_path):
    root = _labelimg_dir(tmp_path / 'fruit', image_folder='images')
    dataset = VOCBboxDataset(root, 'trainval')
    assert dataset.image_path(0).parent == root / 'images'
    assert dataset[0][0].shape == (3, 40, 60)


@pytest.mark.parametrize('filename, image_name', [
    ('photo', 'photo.jpeg'),  # no extension
    (r'C:\Users\me\photo.jpg', 'photo.jpg'),  # labelImg on Windows wrote a full path
    ('renamed.jpg', 'a.png'),  # stale <filename>: the XML's stem is tried
])
def test_image_lookup(tmp_path, filename, image_name):
    _write(tmp_path / 'Annotations' / 'a.xml', _xml(filename, [('x', (1, 1, 5, 5), 0)]))
    _image(tmp_path / 'JPEGImages' / image_name)
    _write(tmp_path / 'ImageSets' / 'Main' / 'trainval.txt', 'a\n')
    assert VOCBboxDataset(tmp_path).image_path(0) == tmp_path / 'JPEGImages' / image_name


def _single(tmp_path, xml, image=True, **kwargs):
    _write(tmp_path / 'a.xml', xml)
    if image:
        _image(tmp_path / 'a.jpg')
    _write(tmp_path / 'ImageSets' / 'Main' / 'trainval.txt', 'a\n')
    return VOCBboxDataset(tmp_path, **kwargs)


def test_clip_and_drop_with_size(tmp_path):
    objects = [('x', (-5, 1, 70, 50), 0), ('x', (10, 10, 10, 20), 0), ('x', (70, 1, 80, 5), 0)]
    with pytest.warns(UserWarning) as record:
        dataset = _single(tmp_path, _xml('a.jpg', objects))
    messages = [str(w.message) for w in record]
    assert all('a.xml' in m for m in messages) and len(messages) == 4
    assert sum('outside the 60x40 image; clipped' in m for m in messages) == 2  # boxes 0, 2
    assert sum('dropped' in m for m in messages) == 2  # boxes 1 and 2
    assert dataset.get_annotation(0)[0].tolist() == [[0, 0, 60, 40]]


@pytest.mark.parametrize('size', [None, (400, 600), (60, 40)])  # absent, wrong, H W swapped
def test_image_size_and_clipping_from_the_real_image(tmp_path, size):
    with pytest.warns(UserWarning, match=r'a\.xml: box .* outside the 60x40 image; clipped'):
        dataset = _single(tmp_path, _xml('a.jpg', [('x', (1, 1, 100, 30), 0)], size=size))
    assert dataset.image_size(0) == (40, 60) and all(type(n) is int for n in dataset.image_size(0))
    assert dataset.get_annotation(0)[0].tolist() == [[0, 0, 60, 29]]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # clipped once, at construction
        _, bbox, label, _ = dataset[0]
    assert bbox.tolist() == [[0, 0, 60, 29]] and label.tolist() == [0]


GOOD_OBJECT = '<object><name>x</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>' \
              '<ymax>5</ymax></bndbox></object>'


@pytest.mark.parametrize('xml, image, match', [
    ('<annotation><filename>a.jpg</filename', True, r'a\.xml: malformed XML'),
    ('', True, r'a\.xml: malformed XML'),
    (_xml('a.jpg', [('x', (1, 2, 3), 0)]), True, r'a\.xml: .*bndbox'),
    (_xml('a.jpg', [('x', (1, 2, 'three', 4), 0)]), True, r'a\.xml: .*non-numeric'),
    (_xml('a.jpg', [('x', (1, 2, 'nan', 4), 0)]), True, r'a\.xml: .*non-numeric'),
    ('<annotation><object><name>x</name></object></annotation>', True, r'a\.xml: .*bndbox'),
    ('<annotation><object><name> </name></object></annotation>', True, r'a\.xml: .*no <name>'),
    (_xml('a.jpg', [('x', (1, 1, 5, 5), 0)]), False, r"a\.xml: image 'a\.jpg' not found"),
])
def test_bad_input_names_file(tmp_path, xml, image, match):
    with pytest.raises(DataError, match=match):
        _single(tmp_path, xml, image=image)


def test_corrupt_image_raises_at_load(tmp_path):
    dataset = _single(tmp_path, f'<annotation><filename>a.jpg</filename>{GOOD_OBJECT}'
                      '</annotation>')
    (tmp_path / 'a.jpg').write_bytes(b'garbage')
    with pytest.raises(DataError, match=r'a\.jpg: cannot read image'):
        dataset[0]


def test_missing_folder_or_no_xml(tmp_path):
    with pytest.raises(DataError, match=r'nowhere: dataset folder not found; expected'):
        VOCBboxDataset(tmp_path / 'nowhere')
    with pytest.raises(DataError, match='no annotation XML files found; expected'):
        VOCBboxDataset(tmp_path)


def _hash_test_split(image_id):
    return int(hashlib.sha1(image_id.encode()).hexdigest(), 16) % 5 == 0


def test_skip_bad_counts_each_file_once_in_its_split(tmp_path):
    root = _labelimg_dir(tmp_path, n=10)
    _write(root / 'bad0.xml', '<annotation>')
    _write(root / 'bad1.xml', '<annotation>')
    _write(root / 'bad2.xml', _xml('missing.png', [('apple', (1, 1, 5, 5), 0)]))
    _write(root / 'bad3.xml', _xml('bad3.png', [('apple', (1, 1, 'x', 5), 0)]))
    _write(root / 'bad4.xml', _xml('bad4.png', [('apple', (1, 1, 5, 5), 0)]))
    (root / 'bad4.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    _write(root / 'bad7.xml', _xml('missing.png', [('apple', (1, 1, 5, 5), 0)]))
    bad = {f'bad{k}' for k in (0, 1, 2, 3, 4, 7)}
    expected = {'test': {i for i in bad if _hash_test_split(i)}}
    expected['trainval'] = bad - expected['test']
    assert expected['test'] == {'bad0', 'bad7'}  # bad files in both splits
    ids, named = {}, []
    for split in expected:
        with pytest.raises(DataError, match=r'bad\d'):
            VOCBboxDataset(root, split)
        with pytest.warns(UserWarning) as record:
            dataset = VOCBboxDataset(root, split, skip_bad=True)
        messages = [str(w.message).replace(str(root), '') for w in record]
        skipping = [m for m in messages if m.startswith('skipping')]
        assert dataset.class_names == ('apple', 'banana', 'cherry')
        assert sorted(path.stem for path in dataset.skipped) == sorted(expected[split])
        assert messages[-1] == f': skipped {len(expected[split])} bad files of split {split!r}'
        assert len(messages) == len(skipping) + 1
        named += [name for m in skipping for name in set(re.findall(r'bad\d', m))]
        ids[split] = dataset.ids
    assert sorted(named) == sorted(bad)  # each bad file named once, by its own split
    assert sorted(ids['trainval'] + ids['test']) == [f'img{k}' for k in range(10)]


def test_bad_xml_of_the_other_split(tmp_path):
    root = _labelimg_dir(tmp_path, n=10)
    _write(root / 'bad0.xml', '<annotation>')  # a test id, read by trainval for its classes
    with pytest.raises(DataError, match=r'bad0\.xml: malformed XML'):
        VOCBboxDataset(root, 'trainval')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the test split reports it, not trainval
        assert VOCBboxDataset(root, 'trainval', skip_bad=True).skipped == []


def _truncated_jpeg_dir(root):
    """Samples a, b, c; b.jpg has its second half cut off, so only its header still reads."""
    for name in 'abc':
        _write(root / f'{name}.xml', _xml(f'{name}.jpg', [('x', (1, 1, 5, 5), 0)]))
        (root / f'{name}.jpg').write_bytes(_encoded('JPEG'))
    data = (root / 'b.jpg').read_bytes()
    (root / 'b.jpg').write_bytes(data[:len(data) // 2])
    _write(root / 'ImageSets' / 'Main' / 'trainval.txt', 'a\nb\nc\n')
    return root


def test_check_images_catches_truncated_jpeg(tmp_path):
    root = _truncated_jpeg_dir(tmp_path)
    with pytest.raises(DataError, match=r'b\.jpg: cannot read image \(OSError: image file is tr'):
        VOCBboxDataset(root, check_images=True)
    with pytest.warns(UserWarning) as record:
        dataset = VOCBboxDataset(root, skip_bad=True, check_images=True)
    assert dataset.ids == ['a', 'c'] and dataset.skipped == [root / 'b.xml']
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and messages[0].startswith(f'skipping: {root / "b.jpg"}: cannot read')
    assert messages[1] == f"{root}: skipped 1 bad files of split 'trainval'"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # or PIL would pad the image silently


def test_truncated_jpeg_without_check_images_fails_when_read(tmp_path):
    root = _truncated_jpeg_dir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # skip_bad alone does not decode images
        dataset = VOCBboxDataset(root, skip_bad=True)
    assert dataset.ids == ['a', 'b', 'c'] and dataset.image_size(1) == (40, 60)
    assert dataset[0][0].shape == (3, 40, 60)
    with pytest.raises(DataError, match=r'b\.jpg: cannot read image'):
        dataset[1]


@pytest.mark.parametrize('annotations, images, split_dir', [
    ('annotations', 'images', None),  # labelImg's own folder names
    ('ANNOTATIONS', 'jpegimages', 'imagesets/MAIN'),  # a VOC year folder in another case
    ('Annotations', 'Images', None),
])
def test_any_case_layout(tmp_path, annotations, images, split_dir):
    extensions = ['.JPG', '.Jpeg', '.PNG', '.jpg']
    for k, ext in enumerate(extensions):  # <filename> in another case than the file
        _write(tmp_path / annotations / f'DSC{k}.XML',
               _xml(f'dsc{k}{ext.lower()}', [('cat', (1, 1, 5, 5), 0)]))
        _image(tmp_path / images / f'DSC{k}{ext}')
    if split_dir:
        _write(tmp_path / split_dir / 'trainval.txt', 'DSC0\nDSC1\nDSC2\nDSC3\n')
        datasets = [VOCBboxDataset(tmp_path, 'trainval')]
    else:
        datasets = [VOCBboxDataset(tmp_path, 'trainval'), VOCBboxDataset(tmp_path, 'test')]
        assert datasets[1].ids == ['DSC0']  # by the hash split
    assert sorted(sum((d.ids for d in datasets), [])) == ['DSC0', 'DSC1', 'DSC2', 'DSC3']
    for dataset in datasets:
        for i, image_id in enumerate(dataset.ids):  # ids: the stems as written on disk
            k = int(image_id[3:])
            assert dataset.image_path(i) == tmp_path / images / f'DSC{k}{extensions[k]}'
            image, bbox, label, _ = dataset[i]
            assert image.shape == (3, 40, 60) and bbox.tolist() == [[0, 0, 4, 4]]


def test_exact_case_wins(tmp_path):
    _image(tmp_path / 'JPEGImages' / 'a.jpg', size=(40, 60))
    _image(tmp_path / 'JPEGImages' / 'A.JPG', size=(20, 30))
    if len(list((tmp_path / 'JPEGImages').iterdir())) < 2:
        pytest.skip('case-insensitive filesystem: a.jpg and A.JPG are one file')
    _write(tmp_path / 'Annotations' / 'a.xml', _xml('a.jpg', [('x', (1, 1, 5, 5), 0)]))
    _write(tmp_path / 'Annotations' / 'a.XML', _xml('a.jpg', [('other', (1, 1, 5, 5), 0)]))
    _write(tmp_path / 'Annotations' / 'b.xml', _xml('A.JPG', [('x', (1, 1, 5, 5), 0)]))
    _write(tmp_path / 'annotations' / 'c.xml', _xml('a.jpg', [('other', (1, 1, 5, 5), 0)]))
    _write(tmp_path / 'ImageSets' / 'Main' / 'trainval.txt', 'a\nb\n')
    dataset = VOCBboxDataset(tmp_path)
    assert dataset.class_names == ('x',)  # a.XML and annotations/ are not read
    assert dataset.image_path(0) == tmp_path / 'JPEGImages' / 'a.jpg'
    assert dataset.image_path(1) == tmp_path / 'JPEGImages' / 'A.JPG'
    assert dataset.image_size(0) == (40, 60) and dataset.image_size(1) == (20, 30)


# Fuzzing: whatever the bytes, a sample is clean or the error is a ValueError naming the file.

def _load_all(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dataset = VOCBboxDataset(root, class_names=('a', 'b'), **kwargs)
        for i in range(len(dataset)):
            image, bbox, label, difficult = dataset[i]
            assert image.dtype == torch.float32 and image.shape[0] == 3
            assert bbox.dtype == torch.float32 and bbox.shape == (len(label), 4)
            assert ((label >= 0) & (label < 2)).all() and difficult.shape == label.shape
            assert (bbox[:, 2:] > bbox[:, :2]).all() and (bbox >= 0).all()
            assert (bbox[:, 2:] <= torch.tensor(image.shape[:0:-1])).all()


def _check_fuzzed(xml_bytes=None, image_bytes=None, **kwargs):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / 'a.xml').write_bytes(xml_bytes if xml_bytes is not None else (
            f'<annotation><filename>a.jpg</filename>{GOOD_OBJECT}</annotation>'.encode()))
        if image_bytes is None:
            _image(root / 'a.jpg')
        else:
            (root / 'a.jpg').write_bytes(image_bytes)
        _write(root / 'ImageSets' / 'Main' / 'trainval.txt', 'a\n')
        try:
            _load_all(root, **kwargs)
        except ValueError as e:
            assert 'a.xml' in str(e) or 'a.jpg' in str(e) or (
                kwargs.get('skip_bad') and 'no samples' in str(e))


coordinate = st.one_of(st.integers(-20, 90).map(str), st.floats(allow_nan=True).map(str),
                       st.text(max_size=4), st.just(''))
fuzz_object = st.tuples(st.sampled_from(['a', ' b ', 'c', 'A', '']),
                        st.lists(coordinate, min_size=3, max_size=5),
                        st.sampled_from(['', '<difficult>1</difficult>',
                                         '<difficult>x</difficult>']))


@st.composite
def fuzz_xml(draw):
    size = draw(st.sampled_from(['', '<size><width>60</width><height>40</height></size>',
                                 '<size><width>0</width><height>0</height></size>',
                                 '<size><width>x</width></size>']))
    objects = ''
    for name, coords, difficult in draw(st.lists(fuzz_object, max_size=3)):
        box = ''.join(f'<{k}>{v}</{k}>' for k, v in zip(('xmin', 'ymin', 'xmax', 'ymax'),
                                                         coords, strict=False))
        objects += f'<object><name>{name}</name>{difficult}<bndbox>{box}</bndbox></object>'
    filename = draw(st.sampled_from(['a.jpg', 'a', '', 'b.jpg']))
    text = f'<annotation><filename>{filename}</filename>{size}{objects}</annotation>'
    cut = draw(st.integers(0, len(text)))  # also truncated or spliced with junk
    return (text[:cut] + draw(st.text(max_size=5)) + text[cut:]).encode() \
        if draw(st.booleans()) else text.encode()


@settings(max_examples=50, deadline=None)
@given(fuzz_xml())
def test_fuzz_xml(xml_bytes):
    _check_fuzzed(xml_bytes=xml_bytes)


@settings(max_examples=20, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_xml_raw_bytes(xml_bytes):
    _check_fuzzed(xml_bytes=xml_bytes)


def _encoded(fmt):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@st.composite
def fuzz_image(draw):
    data = bytearray(_encoded(draw(st.sampled_from(['JPEG', 'PNG']))))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@settings(max_examples=50, deadline=None)
@given(fuzz_image(), st.booleans(), st.booleans())
def test_fuzz_image_bytes(image_bytes, skip_bad, check_images):
    _check_fuzzed(image_bytes=image_bytes, skip_bad=skip_bad, check_images=check_images)
