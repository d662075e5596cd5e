"""A synthetic VOC-format dataset: coloured circles, squares and triangles on cluttered
backgrounds. Small enough to train on a CPU in minutes, and read back through VOCBboxDataset
like real data, so the same code path is tested and demonstrated.

Layout: root/Annotations/<id>.xml, root/JPEGImages/<id>.jpg, root/ImageSets/Main/{trainval,
test}.txt. The same arguments give byte-identical files. misc/voc_to_coco.py writes the same
annotations as COCO JSON, so that both formats are tested on the same images.
"""
import colorsys
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import draw

CLASS_NAMES = ('circle', 'square', 'triangle')
VERSION = 'toy-v2'
MIN_OBJECT, MAX_OBJECT = 40, 110  # object height and width in pixels; 40 px = 2.5 feature cells
MIN_VISIBLE = 0.5  # fraction of an object that later objects may leave visible, at least
# Objects less visible than this, or left narrower than MIN_OBJECT by occlusion, are marked
# difficult: about 4% of them.
DIFFICULT_VISIBLE = 0.7


def _colour(rng, saturation, value):
    """A random RGB colour (3,) uint8 with saturation and value drawn from the given ranges."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return (np.array(rgb) * 255).round().astype(np.uint8)


def _background(rng, height, width):
    """Smooth, muted colour noise with thin lines and small blobs that are not objects."""
    grid = rng.uniform(70, 190, (rng.integers(3, 9), rng.integers(3, 9), 1))
    grid = (grid + rng.uniform(-30, 30, grid.shape[:2] + (3,))).clip(0, 255).astype(np.uint8)
    image = np.array(Image.fromarray(grid).resize((width, height), Image.BILINEAR))
    for _ in range(rng.integers(4, 13)):  # lines 1-2 px thick
        r0, r1 = rng.integers(0, height - 1, 2)
        c0, c1 = rng.integers(0, width, 2)
        colour = _colour(rng, (0.2, 1), (0.3, 1))
        for offset in range(rng.integers(1, 3)):
            image[draw.line(r0 + offset, c0, r1 + offset, c1)] = colour
    for _ in range(rng.integers(3, 11)):  # blobs far smaller than the smallest object
        centre = rng.integers(0, height), rng.integers(0, width)
        image[draw.disk(centre, rng.uniform(2, 6), shape=(height, width))] = \
            _colour(rng, (0.2, 1), (0.3, 1))
    return image


def _shape(rng, label, height, width):
    """Pixel coordinates (rows, cols) of a random shape of class label inside the image."""
    side = rng.uniform(MIN_OBJECT, MAX_OBJECT)
    ratio = np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6)))  # height / width
    h, w = np.clip([side * np.sqrt(ratio), side / np.sqrt(ratio)], MIN_OBJECT, MAX_OBJECT)
    top, left = rng.uniform(0, height - h), rng.uniform(0, width - w)
    if CLASS_NAMES[label] == 'circle':
        return draw.ellipse(top + h / 2, left + w / 2, h / 2, w / 2, shape=(height, width))
    if CLASS_NAMES[label] == 'square':
        return draw.polygon([top, top, top + h, top + h], [left, left + w, left + w, left],
                            shape=(height, width))
    apex = left + w * rng.uniform(0.2, 0.8)
    rows = [top, top + h, top + h] if rng.uniform() < 0.5 else [top + h, top, top]  # up, down
    return draw.polygon(rows, [apex, left, left + w], shape=(height, width))


def _sample(rng):
    """-> image (H, W, 3) uint8, objects [(label, [xmin, ymin, xmax, ymax] 1-based, difficult)]."""
    height, width = (int(n) for n in rng.integers(224, 321, 2))
    image = _background(rng, height, width)
    owner = np.full((height, width), -1)  # which object a pixel shows; later ones occlude
    areas, labels = [], []
    n_object = 0 if rng.uniform() < 0.05 else int(rng.integers(1, 5))
    for _ in range(n_object):
        label = int(rng.integers(len(CLASS_NAMES)))
        for _ in range(10):  # a few tries to keep every earlier object MIN_VISIBLE visible
            rows, cols = _shape(rng, label, height, width)
            covered = np.bincount(owner[rows, cols] + 1, minlength=len(labels) + 1)[1:]
            visible = np.bincount(owner.ravel() + 1, minlength=len(labels) + 1)[1:] - covered
            if np.all(visible >= MIN_VISIBLE * np.array(areas, dtype=float)):
                break
        else:
            continue  # no room for it: one object fewer
        image[rows, cols] = _colour(rng, (0.7, 1), (0.7, 1))
        owner[rows, cols] = len(labels)
        areas.append(len(rows))
        labels.append(label)
    objects = []
    for k, label in enumerate(labels):
        ys, xs = np.nonzero(owner == k)
        box = [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]  # VOC: 1-based pixels
        difficult = (len(ys) < DIFFICULT_VISIBLE * areas[k]
                     or min(box[2] - box[0], box[3] - box[1]) + 1 < MIN_OBJECT)
        objects.append((label, [int(v) for v in box], difficult))
    return image, objects


def _xml(image_id, height, width, objects):
    lines = ['<annotation>', '  <folder>toy</folder>', f'  <filename>{image_id}.jpg</filename>',
             f'  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>']
    for label, (xmin, ymin, xmax, ymax), difficult in objects:
        lines += ['  <object>', f'    <name>{CLASS_NAMES[label]}</name>',
                  f'    <truncated>0</truncated><difficult>{int(difficult)}</difficult>',
                  f'    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>'
                  f'<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>', '  </object>']
    return '\n'.join(lines + ['</annotation>', ''])


def _generate(root, n_trainval, n_test, seed):
    rng = np.random.default_rng(seed)
    for folder in ('Annotations', 'JPEGImages', 'ImageSets/Main'):
        (root / folder).mkdir(parents=True)
    ids = [f'{k:06d}' for k in range(1, n_trainval + n_test + 1)]
    for image_id in ids:
        image, objects = _sample(rng)
        Image.fromarray(image).save(root / 'JPEGImages' / f'{image_id}.jpg', quality=90)
        (root / 'Annotations' / f'{image_id}.xml').write_text(_xml(image_id, *image.shape[:2],
                                                                  objects))
    for split, split_ids in (('trainval', ids[:n_trainval]), ('test', ids[n_trainval:])):
        (root / 'ImageSets/Main' / f'{split}.txt').write_text(''.join(f'{i}\n' for i in split_ids))


def make_toy_dataset(root, n_trainval=300, n_test=100, seed=0):
    """Write the toy dataset to root (returned as a Path) unless it is already there.

    Generation goes to a temporary folder beside root, renamed at the end, so an interrupted
    run leaves no half dataset. root may be missing, empty, or an earlier toy dataset.
    """
    root = Path(root)
    stamp = f'{VERSION} n_trainval={n_trainval} n_test={n_test} seed={seed}\n'
    stamp_path = root / '.toy-stamp'
    if stamp_path.is_file() and stamp_path.read_text() == stamp:
        return root
    if root.exists() and any(root.iterdir()) and not stamp_path.is_file():
        raise ValueError(f'{root}: not empty and not a toy dataset; pass a new or empty folder')
    root.parent.mkdir(parents=True, exist_ok=True)
    # The with removes the temporary folder on any error, KeyboardInterrupt too; on success it
    # has been renamed to root, and there is nothing left to remove.
    with tempfile.TemporaryDirectory(prefix=f'.{root.name}-', dir=root.parent,
                                     ignore_cleanup_errors=True) as tmp:
        os.chmod(tmp, 0o755)  # TemporaryDirectory makes it private
        _generate(Path(tmp), n_trainval, n_test, seed)
        Path(tmp, '.toy-stamp').write_text(stamp)
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    return root


def toy_dataset_dir(cache_dir=None):
    """The default toy dataset in cache_dir, $FRCNN_CACHE or ~/.cache/frcnn, made once."""
    cache_dir = cache_dir or os.environ.get('FRCNN_CACHE') or Path.home() / '.cache' / 'frcnn'
    return make_toy_dataset(Path(cache_dir) / VERSION)

