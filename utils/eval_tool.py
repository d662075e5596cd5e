"""PASCAL VOC detection mAP, computed the way the official devkit (VOCevaldet.m, VOCap) does.

Notation: per image, R predicted boxes and G ground-truth boxes; boxes are (x_min, y_min, x_max,
y_max). Labels are 0..n_fg-1 (no background class). Every argument of `eval_detection_voc` is a
list over images of numpy arrays or torch tensors.
"""
import numpy as np
import torch

# The devkit's `for t=0:0.1:1`, bit for bit. MATLAB builds a range from both ends (k*0.1 up to
# the middle, 1 - k*0.1 after it), so its 0.3 is 0.30000000000000004 while its 0.6 and 0.7 are
# the doubles nearest 0.6 and 0.7. np.arange(0, 1.1, 0.1) differs at 0.6 and 0.7, which changes
# the AP whenever a recall is exactly 3/5 or 7/10.
VOC07_RECALL_THRESHOLDS = np.array([k * 0.1 for k in range(6)]
                                   + [1 - k * 0.1 for k in (4, 3, 2, 1, 0)])


def eval_detection_voc(pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels,
                       gt_difficults=None, iou_thresh=0.5, use_07_metric=False,
                       pixel_inclusive=False, n_class=None):
    """Average precision per class and their mean, as the VOC devkit computes them.

    Args:
        pred_bboxes: list of (R, 4) predicted boxes, x_min y_min x_max y_max.
        pred_labels: list of (R,) int class ids 0..n_fg-1.
        pred_scores: list of (R,) float confidences; higher ranks first.
        gt_bboxes: list of (G, 4) ground-truth boxes.
        gt_labels: list of (G,) int class ids 0..n_fg-1.
        gt_difficults: list of (G,) bool; None means no object is difficult. A detection whose
            best match is a difficult object counts neither as true nor as false positive, and
            difficult objects are not counted among the positives.
        iou_thresh: a detection is a true positive when its best IoU is >= iou_thresh.
        use_07_metric: VOC2007 11-point interpolated AP; else the area under the monotone
            precision envelope (VOC2010 and later).
        pixel_inclusive: widths are x_max - x_min + 1 as in the devkit's 1-based integer boxes;
            False (our convention) uses continuous widths x_max - x_min.
        n_class: number of foreground classes; None infers max label + 1 over all inputs.

    Returns:
        dict with 'ap': (n_class,) float64, NaN for a class without non-difficult ground truth,
        and 'map': float, the mean over classes that are not NaN.
    """
    images, n_class = _per_image('eval_detection_voc', (
        pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels), (gt_difficults,), n_class)

    n_pos = np.zeros(n_class, np.int64)
    scores, matches = [[] for _ in range(n_class)], [[] for _ in range(n_class)]
    for bbox, label, score, gt_bbox, gt_label, gt_difficult in images:
        for cls in np.unique(np.concatenate((label, gt_label))):
            pred, gt = label == cls, gt_label == cls
            # Within an image, detections are matched in score order; the stable sort keeps
            # ties in input order, as MATLAB's sort does over the whole results file.
            order = np.argsort(-score[pred], kind='stable')
            scores[cls].append(score[pred][order])
            matches[cls].append(_match(bbox[pred][order], gt_bbox[gt], gt_difficult[gt],
                                       iou_thresh, pixel_inclusive))
            n_pos[cls] += np.count_nonzero(~gt_difficult[gt])

    ap = np.full(n_class, np.nan)
    for cls in np.flatnonzero(n_pos):
        order = np.argsort(-np.concatenate(scores[cls]), kind='stable')
        match = np.concatenate(matches[cls])[order]
        # Ignored detections only repeat the previous point of the PR curve (or give 0/0 before
        # the first counted one), so dropping them leaves both AP metrics unchanged.
        match = match[match >= 0]
        tp, fp = np.cumsum(match == 1), np.cumsum(match == 0)
        precision, recall = tp / (tp + fp), tp / n_pos[cls]
        ap[cls] = _ap_07(precision, recall) if use_07_metric else _ap_area(precision, recall)
    valid = ~np.isnan(ap)
    return {'ap': ap, 'map': float(ap[valid].mean()) if valid.any() else float('nan')}


def _match(bbox, gt_bbox, gt_difficult, iou_thresh, pixel_inclusive):
    """Greedy matching of score-sorted boxes (R, 4) to one image's gt (G, 4) of one class.

    Returns (R,) int8: 1 true positive, 0 false positive, -1 ignored (best match is difficult).
    """
    match = np.zeros(len(bbox), np.int8)
    if len(gt_bbox) == 0:
        return match
    iou = _iou(bbox, gt_bbox, 1.0 if pixel_inclusive else 0.0)  # (R, G)
    detected = np.zeros(len(gt_bbox), bool)
    for i, j in enumerate(iou.argmax(axis=1)):  # argmax keeps the first of tied gts, as the devkit
        if iou[i, j] < iou_thresh:
            continue
        if gt_difficult[j]:
            match[i] = -1
        elif not detected[j]:
            match[i], detected[j] = 1, True
        # else: a second detection of the same object stays a false positive
    return match


def _iou(bbox_a, bbox_b, offset):
    """(N, K) IoU of (N, 4) and (K, 4) boxes; offset 1 counts both end pixels as the devkit."""
    top_left = np.maximum(bbox_a[:, None, :2], bbox_b[None, :, :2])  # (N, K, 2)
    bottom_right = np.minimum(bbox_a[:, None, 2:], bbox_b[None, :, 2:])  # (N, K, 2)
    inter = np.prod(np.clip(bottom_right - top_left + offset, 0, None), axis=2)  # (N, K)
    area_a, area_b = (np.prod(bbox[:, 2:] - bbox[:, :2] + offset, axis=1)  # (N,), (K,)
                      for bbox in (bbox_a, bbox_b))
    union = area_a[:, None] + area_b[None, :] - inter
    # Like the devkit, only boxes that intersect get an IoU (also avoids 0 / 0 for empty boxes).
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def _ap_07(precision, recall):
    """VOC2007: mean over 11 recall thresholds of the best precision at recall >= threshold."""
    # initial=0: 0 where no recall reaches the threshold; precision >= 0 changes no other max.
    return float(np.mean([precision[recall >= t].max(initial=0) for t in VOC07_RECALL_THRESHOLDS]))


def _ap_area(precision, recall):
    """VOC2010+: area under the precision envelope (precision made non-increasing in recall)."""
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    step = np.flatnonzero(recall[1:] != recall[:-1]) + 1  # where recall changes
    return float(np.sum((recall[step] - recall[step - 1]) * precision[step]))


def format_ap_table(ap, class_names, map_value):
    """Text table: one line per class with its AP, then the mAP; NaN (no ground truth) as 'n/a'."""
    width = max(len(name) for name in (*class_names, 'mAP'))
    return '\n'.join([f'{"class":<{width}}  AP'] + [
        f'{name:<{width}}  {"n/a" if np.isnan(value) else f"{value:.4f}"}'
        for name, value in [*zip(class_names, ap, strict=True), ('mAP', map_value)]])


def _per_image(function, required, optional, n_class):
    """The per-image lists of `function`'s arguments, zipped into one tuple per image: required
    (pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels), then optional (gt_difficults,
    then any others; a None list stands for None in every image), the first six as _to_numpy
    gives them. Also n_class, where None infers the largest label, predicted or true, + 1."""
    n_image = len(required[3])
    inputs = (*required, *([None] * n_image if values is None else values for values in optional))
    if any(len(values) != n_image for values in inputs):
        raise ValueError(f'{function} needs one entry per image in each list; got lengths '
                         f'{[len(values) for values in inputs]}')
    images = [(*_to_numpy(*image[:6]), *image[6:]) for image in zip(*inputs, strict=True)]
    if n_class is None:
        n_class = 1 + max((int(labels.max()) for image in images for labels in (image[1], image[4])
                           if len(labels)), default=-1)
    return images, n_class


def _to_numpy(bbox, label, score, gt_bbox, gt_label, gt_difficult):
    """One image's inputs as float64 / int64 / bool numpy arrays; difficult None -> all False."""
    def array(values, dtype):
        values = values.numpy(force=True) if isinstance(values, torch.Tensor) else values
        return np.asarray(values, dtype=dtype).reshape(-1)

    gt_label = array(gt_label, np.int64)
    return (array(bbox, np.float64).reshape(-1, 4), array(label, np.int64),
            array(score, np.float64), array(gt_bbox, np.float64).reshape(-1, 4), gt_label,
            np.zeros(len(gt_label), bool) if gt_difficult is None else array(gt_difficult, bool))
