"""Converts a checkpoint of the original port (simple-faster-rcnn-pytorch) into ours.

The port's VGG16 Faster R-CNN is ours layer for layer, under the same module names (extractor.N
for VGG16's features[:30], rpn.conv1 / score / loc, head.classifier, head.cls_loc, head.score),
with the same anchors (ratio-major, h / w = ratio), RoI pooling (7x7 at 1/16) and loc
normalisation (0.1, 0.1, 0.2, 0.2). Two things differ:
- its box regressions give each anchor's and each class's four outputs as dy, dx, dh, dw; ours
  as dx, dy, dw, dh (x first, as our boxes): the rows of rpn.loc and head.cls_loc are reordered;
- trained with use_drop, its head.classifier has dropout layers between the two fc layers, so
  fc7 is head.classifier.3 there and head.classifier.2 here.
Its file is its trainer's {'model': state dict, 'config': its options, ...}; the config's
caffe_pretrain says which normalisation its images had (caffe BGR, or torchvision's).

    python misc/convert_sfr_checkpoint.py fasterrcnn_12211511_0.701.pth --out=weights/sfr.pt
    python train.py eval --load-path=weights/sfr.pt --dataset=voc07 --voc-data-dir=VOCdevkit/VOC2007
"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.voc_dataset import VOC_BBOX_LABEL_NAMES  # noqa: E402
from model.backbones.base import read_torch_file  # noqa: E402
from model.faster_rcnn import build_faster_rcnn  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.config import Config  # noqa: E402
from utils.run import run_command  # noqa: E402

XY_FIRST = [1, 0, 3, 2]  # (dy, dx, dh, dw) -> (dx, dy, dw, dh); the same order maps back


def swap_xy(tensor):
    """The rows of a box-regression layer, four per anchor or class, with y and x swapped."""
    return tensor.unflatten(0, (-1, 4))[:, XY_FIRST].flatten(0, 1)


def sfr_to_ours(state):
    """The port's FasterRCNNVGG16 state dict -> our FasterRCNN's (VGG16)."""
    ours = {}
    for key, value in state.items():
        if key.startswith('head.classifier.3.'):  # with use_drop: fc7 after a dropout layer
            key = key.replace('head.classifier.3.', 'head.classifier.2.')
        ours[key] = swap_xy(value) if key.startswith(('rpn.loc.', 'head.cls_loc.')) else value
    return ours


def main(source, out='weights/sfr_vgg16.pt', class_names=None):
    """source: the port's checkpoint file; class_names: its foreground classes in label order
    (default: the 20 VOC classes, as the port trains)."""
    checkpoint = read_torch_file(source, 'simple-faster-rcnn-pytorch checkpoint')
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('model'), dict):
        raise ValueError(f"{source} is not a simple-faster-rcnn-pytorch checkpoint: it has no "
                         "'model' state dict (its trainer saves {'model': ..., 'config': ...})")
    state = sfr_to_ours(checkpoint['model'])
    score = state.get('head.score.weight')
    if score is None:
        raise ValueError(f'{source} has no head.score.weight: not the port\'s VGG16 model')
    names = class_names or (VOC_BBOX_LABEL_NAMES if score.shape[0] == 21 else None)
    caffe = bool((checkpoint.get('config') or {}).get('caffe_pretrain', False))
    cfg = Config(dataset='voc07', extractor='vgg16', class_names=names,
                 normalization='caffe' if caffe else 'torchvision')
    if len(cfg.class_names or ()) != score.shape[0] - 1:
        raise ValueError(f'{source} has {score.shape[0] - 1} classes; give their names in '
                         'order with --class-names')
    expected = build_faster_rcnn(score.shape[0] - 1, cfg.model_options()).state_dict()
    wrong = [key for key in {**expected, **state}
             if key not in state or key not in expected or state[key].shape != expected[key].shape]
    if wrong:
        raise ValueError(f"{source} is not the port's VGG16 model: {wrong[0]} is missing, extra "
                         f'or of another shape ({len(wrong)} such tensors)')
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({'model': state, 'class_names': list(cfg.class_names),
                     'config': cfg.to_dict(), 'category_ids': None,
                     'model_options': dataclasses.asdict(cfg.model_options())}, out)
    print(f'wrote {out}: vgg16, {score.shape[0] - 1} classes, {cfg.normalization} '
          'normalisation; python train.py eval / detect --load-path=' + str(out))


if __name__ == '__main__':
    run_command(main)
