"""COCO detection AP (AP@[.5:.95], AP50, AP75, AP by object size), computed by pycocotools.

Notation: N images; per image, R predicted boxes and G ground-truth boxes, (x_min, y_min, x_max,
y_max) in 0-based continuous pixels of the original image. Labels are 0..n_fg-1. The inputs are
those of utils.eval_tool.eval_detection_voc: lists over images of numpy arrays or torch tensors.
They become an in-memory COCO ground truth (image ids 1..N, category ids label + 1, bbox
[x, y, w, h]) and a result set that COCOeval scores as the official evaluation does: 101-point
interpolated precision, IoU thresholds 0.50:0.05:0.95, at most 100 detections per image and class.
"""
import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.eval_tool import _per_image

# The six AP rows of COCOeval's 12-line summary, in the order of COCOeval.stats.
COCO_AP_KEYS = ('ap', 'ap50', 'ap75', 'ap_small', 'ap_medium', 'ap_large')


def eval_detection_coco(pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels,
                        gt_difficults=None, image_sizes=None, n_class=None, gt_areas=None):
    """COCO AP of detections over a set of images.

    Args:
        pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels: as in eval_detection_voc:
            lists of (R, 4), (R,), (R,), (G, 4), (G,).
        gt_difficults: list of (G,) bool, passed to COCO as iscrowd=1; None: nothing is. Like a
            crowd region, a difficult object neither counts as a positive nor makes a detection
            on it a false positive. COCO's IoU with a crowd box is intersection / detection area,
            and a detection goes to an unmatched non-crowd object before any crowd one.
        image_sizes: list of (H, W) ints, stored in the image entries; bbox AP does not use them.
        n_class: number of foreground classes; None infers max label + 1 over all inputs.
        gt_areas: list of (G,) floats, COCO's 'area' that puts an object in the small (< 32^2),
            medium (< 96^2) or large range; None uses the box's w * h. Official COCO annotations
            carry the segmentation's area, so AP_s/m/l on official data need the JSON's areas.

    Returns:
        dict of floats 'ap' (AP@[.5:.95]), 'ap50', 'ap75', 'ap_small', 'ap_medium', 'ap_large',
        NaN where COCOeval gives -1 (no ground truth in that range); 'map' equal to 'ap';
        'ap_per_class': (n_class,) float64 AP@[.5:.95], NaN for a class without ground truth;
        'summary': COCOeval's 12-line summary text (pycocotools' printing is silenced).
        With no detections at all, every AP is 0 where there is ground truth and NaN elsewhere,
        as COCOeval gives for an empty result set (loadRes refuses one; an empty COCO stands in).
    """
    images, n_class = _per_image('eval_detection_coco', (
        pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels), (
        gt_difficults, image_sizes, gt_areas), n_class)

    dataset = {'images': [], 'annotations': [],
               'categories': [{'id': cls + 1, 'name': str(cls)} for cls in range(n_class)]}
    results = []
    for image_id, image in enumerate(images, 1):
        bbox, label, score, gt_bbox, gt_label, gt_difficult, size, area = image
        xywh, gt_xywh = (np.hstack((box[:, :2], box[:, 2:] - box[:, :2]))  # (R, 4), (G, 4)
                         for box in (bbox, gt_bbox))  # x y w h, COCO's box
        # COCO's size ranges read 'area'; official annotations carry the mask's (see gt_areas).
        area = (gt_xywh[:, 2] * gt_xywh[:, 3]).tolist() if area is None else list(map(float, area))
        if len(area) != len(gt_bbox):
            raise ValueError(f'gt_areas[{image_id - 1}] needs one area per ground-truth box')
        size = {} if size is None else {'height': int(size[0]), 'width': int(size[1])}
        dataset['images'].append({'id': image_id, **size})
        dataset['annotations'] += [  # ids from 1: COCOeval reads id 0 as 'not matched'
            {'id': len(dataset['annotations']) + j, 'image_id': image_id, 'bbox': box, 'area': a,
             'category_id': int(cls) + 1, 'iscrowd': int(crowd)} for j, (box, cls, a, crowd) in
            enumerate(zip(gt_xywh.tolist(), gt_label, area, gt_difficult, strict=True), 1)]
        results += [{'image_id': image_id, 'category_id': int(cls) + 1, 'bbox': box, 'score': s}
                    for box, cls, s in zip(xywh.tolist(), label, score.tolist(), strict=True)]

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        # loadRes reads results[0], so with no detections an empty COCO stands in: COCOeval then
        # gives AP 0 where there is ground truth and -1 elsewhere.
        dt = gt.loadRes(results) if results else COCO()
        dt.dataset.setdefault('annotations', [])  # read only when there are no images
        evaluator = COCOeval(gt, dt, 'bbox')
        evaluator.evaluate()
        evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        evaluator.summarize()

    result = {key: float('nan') if value == -1 else float(value)
              for key, value in zip(COCO_AP_KEYS, evaluator.stats[:6], strict=True)}
    precision = evaluator.eval['precision'][:, :, :, 0, -1]  # (T, 101, n_class): area all, 100 dets
    ap_per_class = [p[p > -1].mean() if (p > -1).any() else np.nan
                    for p in precision.transpose(2, 0, 1)]  # (n_class, T, 101)
    return {**result, 'map': result['ap'], 'ap_per_class': np.array(ap_per_class, np.float64),
            'summary': summary.getvalue()}


def format_coco_table(result):
    """Text table of the six AP numbers of an eval_detection_coco result; NaN (no gt) as 'n/a'."""
    return '\n'.join(['metric  AP'] + [
        f'{name:<6}  {"n/a" if np.isnan(result[key]) else f"{result[key]:.4f}"}'
        for name, key in zip(('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'), COCO_AP_KEYS)])
