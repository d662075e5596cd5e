"""Converts torchvision's fasterrcnn_resnet50_fpn weights into our resnet50_fpn checkpoint.

Our R50-FPN computes what torchvision's does (tests/test_fpn.py compares them on the same
weights; README lists where the two differ), so its detection weights, e.g. the COCO-trained
ones, load into ours name by name. Its one-logit objectness becomes our (background,
foreground) pair as (0, logit): our softmax of it is its sigmoid.

    python misc/convert_torchvision_fpn.py --source=coco --out=weights/r50_fpn_coco.pt
    python misc/convert_torchvision_fpn.py --source=my_model.pth --class-names=cat,dog \\
        --out=weights/mine.pt
    python train.py detect --load-path=weights/r50_fpn_coco.pt photos/*.jpg
"""
import dataclasses
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.backbones.base import download, read_torch_file  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.config import Config  # noqa: E402
from utils.run import run_command  # noqa: E402

# torchvision's key prefix -> ours. Newer torchvision wraps the FPN and RPN convs in a
# Sequential ('inner_blocks.0.0.', 'conv.0.0.'); older files do not: both are accepted.
RENAMES = (
    (r'backbone\.body\.conv1\.', 'extractor.stages.0.0.'),
    (r'backbone\.body\.bn1\.', 'extractor.stages.0.1.'),
    (r'backbone\.body\.layer1\.', 'extractor.stages.0.4.'),
    (r'backbone\.body\.layer2\.', 'extractor.stages.1.'),
    (r'backbone\.body\.layer3\.', 'extractor.stages.2.'),
    (r'backbone\.body\.layer4\.', 'extractor.stages.3.'),
    (r'backbone\.fpn\.inner_blocks\.(\d)\.(0\.)?', r'extractor.lateral.\1.'),
    (r'backbone\.fpn\.layer_blocks\.(\d)\.(0\.)?', r'extractor.output.\1.'),
    (r'rpn\.head\.conv\.(0\.0\.)?', 'rpn.conv1.'),
    (r'rpn\.head\.bbox_pred\.', 'rpn.loc.'),
    (r'roi_heads\.box_head\.fc6\.', 'head.classifier.0.'),
    (r'roi_heads\.box_head\.fc7\.', 'head.classifier.2.'),
    (r'roi_heads\.box_predictor\.cls_score\.', 'head.score.'),
    (r'roi_heads\.box_predictor\.bbox_pred\.', 'head.cls_loc.'),
)


def torchvision_to_ours(state):
    """torchvision's FasterRCNN R50-FPN state dict -> our FasterRCNN's (a ValueError names
    a key that has no place in ours)."""
    ours = {}
    for key, value in state.items():
        if key.endswith('num_batches_tracked'):  # BatchNorm's counter; ours is frozen
            continue
        if key.startswith('rpn.head.cls_logits.'):  # (A, ...) logits -> (2A, ...) pairs
            pair = torch.stack([torch.zeros_like(value), value], dim=1)
            ours['rpn.score.' + key.rsplit('.', 1)[1]] = pair.flatten(0, 1)
            continue
        for pattern, replacement in RENAMES:
            renamed, n = re.subn('^' + pattern, replacement, key)
            if n:
                ours[renamed] = value
                break
        else:
            raise ValueError(f'it has {key}, which is not part of it')
    return ours


def coco_class_names():
    """torchvision's COCO categories (ids 1..90 with gaps, 'N/A' in the gaps): names made
    unique, and the category id of each."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta['categories'][1:]
    return [f'N/A-{i}' if n == 'N/A' else n for i, n in enumerate(names, 1)], list(range(1, 91))


def main(source='coco', out='weights/resnet50_fpn_coco.pt', class_names=None):
    """source: a file holding torchvision's state dict, or 'coco' for its COCO-trained weights
    (downloaded). class_names: the foreground classes in label order (default: COCO's)."""
    if source == 'coco':
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
        published = FasterRCNN_ResNet50_FPN_Weights.COCO_V1
        try:
            state = download("torchvision's COCO weights", published.url,
                             published.get_state_dict)
        except OSError as e:
            raise ValueError(f'--source=coco: {e}; download the file where there is a network '
                             'and give it with --source=FILE') from e
    else:
        state = read_torch_file(source, '--source file')
    if not isinstance(state, dict):
        raise ValueError(f'{source} does not hold a state dict')
    try:
        model = torchvision_to_ours(state)
        n_fg_class = model['head.score.weight'].shape[0] - 1
    except (ValueError, KeyError, AttributeError) as e:
        raise ValueError(f'{source} is not a state dict of torchvision\'s '
                         f'fasterrcnn_resnet50_fpn ({e})') from e
    category_ids = None
    if class_names is None and n_fg_class == 90:
        class_names, category_ids = coco_class_names()
    class_names = list(Config(class_names=class_names).class_names or ())
    if len(class_names) != n_fg_class:
        raise ValueError(f'{source} has {n_fg_class} classes; give their names in order with '
                         f'--class-names (got {len(class_names)})')
    cfg = Config(dataset='coco2017' if category_ids else 'custom', extractor='resnet50_fpn',
                 class_names=class_names)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({'model': model, 'class_names': class_names, 'config': cfg.to_dict(),
                     'model_options': dataclasses.asdict(cfg.model_options()),
                     'category_ids': category_ids}, out)
    print(f'wrote {out}: resnet50_fpn, {n_fg_class} classes')


if __name__ == '__main__':
    run_command(main)
