"""Converts a VOC-format folder into COCO JSON files, one per split.

The folder is one data.voc_dataset.VOCBboxDataset reads, with both split files
ImageSets/Main/trainval.txt and test.txt and numeric ids: VOC2007 or the toy dataset (data.toy),
whose COCO JSON files test the COCO path on the same images as the VOC path.

    python misc/voc_to_coco.py ~/.cache/frcnn/toy-v2 --out=toy_coco
    python misc/voc_to_coco.py my_voc_folder --class-names=cat,dog --out=my_coco
    python train.py train --dataset=coco --coco-json=toy_coco/trainval.json \\
        --coco-test-json=toy_coco/test.json
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.toy import CLASS_NAMES  # noqa: E402
from data.voc_dataset import VOCBboxDataset  # noqa: E402
from utils.config import Config  # noqa: E402
from utils.run import run_command  # noqa: E402


def write_coco_json(root, out=None, class_names=CLASS_NAMES):
    """Write the annotations of the VOC-format folder at root as COCO JSON files
    out/trainval.json and out/test.json (out: root by default), the splits of ImageSets;
    returns their paths.

    Image ids are the numbers of the VOC ids (int('000005') is 5; an id that is no number
    raises ValueError), category ids 1, 2, ... the class_names in order. bbox is [x_min, y_min,
    x_max - x_min, y_max - y_min] of VOCBboxDataset's 0-based boxes, so that COCOBboxDataset
    reads back exactly what VOCBboxDataset reads. A difficult object is iscrowd=1: COCO's tools
    ignore crowds as ours ignore difficult objects (training drops them, evaluation counts
    neither a miss nor a false positive on them). file_names are relative to out.
    """
    root, out = Path(root), Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    categories = [dict(id=k + 1, name=name) for k, name in enumerate(class_names)]
    for split in ('trainval', 'test'):
        voc, images, annotations = VOCBboxDataset(root, split, class_names), [], []
        for i, image_id in enumerate(map(int, voc.ids)):
            (height, width), path = voc.image_size(i), Path(os.path.relpath(voc.image_path(i), out))
            images.append(dict(id=image_id, file_name=path.as_posix(), width=width, height=height))
            for (x, y, x_max, y_max), k, crowd in zip(*(a.tolist() for a in voc.get_annotation(i))):
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id, category_id=k + 1,
                    bbox=[x, y, x_max - x, y_max - y], area=(x_max - x) * (y_max - y),
                    iscrowd=int(crowd)))
        (out / f'{split}.json').write_text(json.dumps(dict(images=images, annotations=annotations,
                                                           categories=categories)))
    return {split: out / f'{split}.json' for split in ('trainval', 'test')}


def main(root, out=None, class_names=None):
    """Write the trainval and test splits of a VOC-format folder as COCO JSON files.

    Args:
        root: the VOC-format folder
        out: the folder for trainval.json and test.json (default: root)
        class_names: the classes in label order, e.g. cat,dog (default: the toy dataset's)
    """
    class_names = Config(class_names=class_names).class_names or CLASS_NAMES
    for split, path in write_coco_json(root, out, class_names).items():
        print(f'wrote {path}: split {split}')


if __name__ == '__main__':
    run_command(main)
