import math
import warnings

import numpy as np
import pytest
import torch
from conftest import score_lists

from utils.eval_tool import eval_detection_voc, format_ap_table


def _eval(preds, gts, **kwargs):
    return score_lists(eval_detection_voc, preds, gts, **kwargs)


def _both_metrics(preds, gts, **kwargs):
    return (_eval(preds, gts, use_07_metric=True, **kwargs)['ap'],
            _eval(preds, gts, use_07_metric=False, **kwargs)['ap'])


A, B = (0, 0, 10, 10), (20, 20, 30, 30)  # two far apart objects
MISS = (50, 50, 60, 60)  # overlaps nothing


def test_perfect_detector_torch_inputs():
    gt_bboxes = [torch.tensor([A, B], dtype=torch.float32), torch.tensor([B], dtype=torch.float32)]
    gt_labels = [torch.tensor([0, 1]), torch.tensor([1])]
    scores = [torch.tensor([0.9, 0.3]), torch.tensor([0.5])]
    for use_07_metric in (True, False):
        result = eval_detection_voc(gt_bboxes, gt_labels, scores, gt_bboxes, gt_labels,
                                    use_07_metric=use_07_metric)
        np.testing.assert_array_equal(result['ap'], [1.0, 1.0])
        assert result['ap'].dtype == np.float64 and result['map'] == 1.0


def test_two_objects_three_detections():
    # Sorted: TP (p 1, r 1/2), FP (p 1/2, r 1/2), TP (p 2/3, r 1).
    # Area: 1/2 * 1 + 1/2 * 2/3 = 5/6. 11-point: t = 0 .. 0.5 -> 1 (6 times), t = 0.6 .. 1 -> 2/3.
    preds = [[(A, 0, 0.9), (MISS, 0, 0.8)], [(B, 0, 0.7)]]
    gts = [[(A, 0, False)], [(B, 0, False)]]
    ap_07, ap_area = _both_metrics(preds, gts)
    assert ap_area[0] == pytest.approx(5 / 6)
    assert ap_07[0] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_duplicate_detection_is_false_positive():
    # Second detection of A is a FP even though it comes before the detection of B: same PR
    # curve as above. Listing order inside an image does not matter, scores do.
    preds = [[(B, 0, 0.7), (A, 0, 0.9), ((0, 0, 10, 9), 0, 0.8)]]
    gts = [[(A, 0, False), (B, 0, False)]]
    ap_07, ap_area = _both_metrics(preds, gts)
    assert ap_area[0] == pytest.approx(5 / 6)
    assert ap_07[0] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_duplicate_does_not_fall_back_to_second_best_object():
    # The second box overlaps A (IoU 90/110) more than the free B (IoU 70/130 >= 0.5); as in the
    # devkit it is compared with its best match only, A, already taken: a FP.
    a, b = (0, 0, 10, 10), (4, 0, 14, 10)
    preds = [[(a, 0, 0.9), ((1, 0, 11, 10), 0, 0.8)]]
    gts = [[(a, 0, False), (b, 0, False)]]
    ap_07, ap_area = _both_metrics(preds, gts)
    assert ap_area[0] == pytest.approx(0.5)  # PR points (1, 1/2), (1/2, 1/2)
    assert ap_07[0] == pytest.approx(6 / 11)


def test_difficult_objects_are_ignored():
    # Two detections of the difficult object D are neither TP nor FP, and D is not a positive:
    # the curve is (p 1, r 1) then (p 1/2, r 1), AP 1. Counting them as FPs, or D as a positive,
    # would give 1/2 (area).
    d = (30, 0, 40, 10)
    preds = [[(d, 0, 0.95), (d, 0, 0.9), (A, 0, 0.8), (MISS, 0, 0.7)]]
    gts = [[(A, 0, False), (d, 0, True)]]
    np.testing.assert_allclose(_both_metrics(preds, gts), [[1.0], [1.0]])
    # Not difficult, D is a positive: TP, duplicate FP, TP, FP -> 1/2 * 1 + 1/2 * 2/3.
    gts_not_difficult = [[(A, 0, False), (d, 0, False)]]
    assert _eval(preds, gts_not_difficult)['ap'][0] == pytest.approx(5 / 6)


def test_only_difficult_objects_give_nan():
    result = _eval([[(A, 0, 0.9), (B, 1, 0.8)]], [[(A, 0, True), (B, 1, False)]])
    assert math.isnan(result['ap'][0]) and result['ap'][1] == 1.0 and result['map'] == 1.0


def test_empty_images():
    preds = [[(A, 0, 0.9), (MISS, 0, 0.8)], [(B, 0, 0.7)]]
    gts = [[(A, 0, False)], [(B, 0, False)]]
    reference = _both_metrics(preds, gts)
    # Images with nothing at all change nothing.
    np.testing.assert_array_equal(_both_metrics([[]] + preds + [[]], [[]] + gts + [[]]), reference)
    # Predictions on an image without objects are false positives: ranked first, 2 of them.
    ap_07, ap_area = _both_metrics(preds + [[(A, 0, 0.99), (B, 0, 0.98)]], gts + [[]])
    # (p, r): (0, 0), (0, 0), (1/3, 1/2), (1/4, 1/2), (2/5, 1): the envelope is 2/5 everywhere.
    assert ap_area[0] == pytest.approx(0.4)
    assert ap_07[0] == pytest.approx(0.4)
    # An object nobody detects: recall stops at 1/2.
    ap_area = _eval([[(A, 0, 0.9)], []], [[(A, 0, False)], [(B, 0, False)]])['ap']
    assert ap_area[0] == pytest.approx(0.5)
    # No images at all, or no predictions at all.
    result = eval_detection_voc([], [], [], [], [], n_class=2)
    assert result['ap'].shape == (2,) and np.isnan(result['ap']).all()
    assert math.isnan(result['map'])
    np.testing.assert_array_equal(_eval([[]], [[(A, 1, False)]])['ap'], [np.nan, 0.0])


def test_class_without_ground_truth_is_nan_and_left_out_of_map():
    preds = [[(A, 0, 0.9), (B, 1, 0.8), (B, 2, 0.7)]]
    gts = [[(A, 0, False), (MISS, 2, False)]]
    result = _eval(preds, gts)
    assert result['ap'].shape == (3,) and math.isnan(result['ap'][1])
    assert result['ap'][0] == 1.0 and result['ap'][2] == 0.0
    assert result['map'] == 0.5
    assert _eval(preds, gts, n_class=5)['ap'].shape == (5,)


def test_pixel_inclusive_changes_iou_at_threshold():
    gt, box = (0, 0, 9, 9), (0, 0, 9, 4)
    # continuous: 9 * 4 / (9 * 9) = 0.444 < 0.5; devkit (+1): 10 * 5 / (10 * 10) = 0.5 >= 0.5.
    preds, gts = [[(box, 0, 0.9)]], [[(gt, 0, False)]]
    assert _eval(preds, gts)['ap'][0] == 0.0
    assert _eval(preds, gts, pixel_inclusive=True)['ap'][0] == 1.0
    # IoU exactly at the threshold counts (the devkit's ovmax >= minoverlap).
    assert _eval([[((0, 0, 10, 5), 0, 0.9)]], [[((0, 0, 10, 10), 0, False)]])['ap'][0] == 1.0
    assert _eval(preds, gts, iou_thresh=0.4)['ap'][0] == 1.0


def test_degenerate_boxes():
    # A zero-area box and object: no intersection, IoU 0 (not 0 / 0). With the +1 convention
    # both are one pixel and identical.
    point = (5, 5, 5, 5)
    preds, gts = [[(point, 0, 0.9)]], [[(point, 0, False)]]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert _eval(preds, gts)['ap'][0] == 0.0
        assert _eval(preds, gts, pixel_inclusive=True)['ap'][0] == 1.0


def test_11_point_and_area_differ_and_recall_thresholds_match_matlab():
    # 5 objects; detections TP TP TP FP FP TP. (p, r): p 1 up to r 3/5, then (3/4, 3/5),
    # (3/5, 3/5), (2/3, 4/5). Area: 3/5 * 1 + 1/5 * 2/3 = 11/15.
    # 11-point: t = 0 .. 0.6 -> 1 (7 thresholds, recall 3/5 reaches MATLAB's 0.6, which is not
    # the case for np.arange's 0.6000000000000001), t = 0.7, 0.8 -> 2/3, t = 0.9, 1 -> 0.
    objects = [(20 * i, 0, 20 * i + 10, 10) for i in range(5)]
    hits = [(objects[i], 0, score) for i, score in zip((0, 1, 2, 3), (0.9, 0.8, 0.7, 0.4),
                                                        strict=True)]
    preds = [hits + [(MISS, 0, 0.6), (MISS, 0, 0.5)]]
    gts = [[(box, 0, False) for box in objects]]
    ap_07, ap_area = _both_metrics(preds, gts)
    assert ap_area[0] == pytest.approx(11 / 15)
    assert ap_07[0] == pytest.approx((7 + 2 * 2 / 3) / 11)


def test_score_ties_keep_input_order():
    # Equal scores: the FP listed first is ranked first (stable sort), p 1/2 at r 1 -> 1/2.
    preds = [[(MISS, 0, 0.5)], [(A, 0, 0.5)]]
    gts = [[], [(A, 0, False)]]
    assert _eval(preds, gts)['ap'][0] == pytest.approx(0.5)
    assert _eval(preds[::-1], gts[::-1])['ap'][0] == 1.0


def _random_dataset(rng, n_image=12, n_class=3, quantize_scores=False):
    def boxes(n):
        top_left = rng.uniform(0, 80, (n, 2))
        return np.concatenate([top_left, top_left + rng.uniform(4, 30, (n, 2))], axis=1)

    data = {key: [] for key in ('pred_bboxes', 'pred_labels', 'pred_scores', 'gt_bboxes',
                                'gt_labels', 'gt_difficults')}
    for _ in range(n_image):
        n_gt, n_random = rng.integers(0, 5), rng.integers(0, 6)
        gt_bbox = boxes(n_gt)
        gt_label = rng.integers(0, n_class, n_gt)
        target = rng.integers(0, max(n_gt, 1), 2 * n_gt)  # two noisy detections per object
        near = gt_bbox[target] + rng.normal(0, 2, (2 * n_gt, 4))
        pred_bbox = np.concatenate([near, boxes(n_random)])
        pred_label = np.concatenate([gt_label[target], rng.integers(0, n_class, n_random)])
        score = rng.uniform(size=len(pred_bbox))
        data['pred_bboxes'].append(pred_bbox)
        data['pred_labels'].append(pred_label)
        data['pred_scores'].append(np.round(score, 1) if quantize_scores else score)
        data['gt_bboxes'].append(gt_bbox)
        data['gt_labels'].append(gt_label)
        data['gt_difficults'].append(rng.uniform(size=n_gt) < 0.2)
    return data


def _devkit_reference(data, n_class, iou_thresh, use_07_metric, pixel_inclusive):
    """A literal transcription of VOCevaldet.m and VOCap: one global pass over all detections
    of a class, keeping ignored detections in the curve (precision 0/0 = NaN, which MATLAB's max
    skips as np.fmax / np.nanmax do; an all-NaN max, where every detection of a class is
    ignored, is taken as 0 where MATLAB would give NaN)."""
    offset = 1.0 if pixel_inclusive else 0.0
    aps = []
    for cls in range(n_class):
        gts = [(np.asarray(b)[np.asarray(l) == cls], np.asarray(d)[np.asarray(l) == cls])
               for b, l, d in zip(data['gt_bboxes'], data['gt_labels'], data['gt_difficults'],
                                  strict=True)]
        npos = sum(int((~d).sum()) for _, d in gts)
        detected = [np.zeros(len(b), bool) for b, _ in gts]
        dets = [(s, i, b) for i, (bb, ll, ss) in enumerate(zip(
            data['pred_bboxes'], data['pred_labels'], data['pred_scores'], strict=True))
            for b, l, s in zip(bb, ll, ss, strict=True) if l == cls]
        dets.sort(key=lambda det: -det[0])  # Python's sort is stable, as MATLAB's
        tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
        for d, (_, i, bb) in enumerate(dets):
            ovmax, jmax = -np.inf, -1
            for j, bbgt in enumerate(gts[i][0]):
                iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + offset
                ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + offset
                if iw > 0 and ih > 0:
                    ua = ((bb[2] - bb[0] + offset) * (bb[3] - bb[1] + offset)
                          + (bbgt[2] - bbgt[0] + offset) * (bbgt[3] - bbgt[1] + offset) - iw * ih)
                    if iw * ih / ua > ovmax:
                        ovmax, jmax = iw * ih / ua, j
            if ovmax >= iou_thresh:
                if not gts[i][1][jmax]:
                    if not detected[i][jmax]:
                        tp[d], detected[i][jmax] = 1, True
                    else:
                        fp[d] = 1
            else:
                fp[d] = 1
        if npos == 0:
            aps.append(np.nan)
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        with np.errstate(invalid='ignore'):
            prec = tp / (fp + tp)
        if use_07_metric:
            ap = 0.0
            for t in [k * 0.1 for k in range(6)] + [1 - k * 0.1 for k in (4, 3, 2, 1, 0)]:
                p = prec[rec >= t]
                ap += (np.nanmax(p) if np.any(~np.isnan(p)) else 0.0) / 11
        else:
            mrec, mpre = np.r_[0, rec, 1], np.r_[0, prec, 0]
            for k in range(len(mpre) - 2, -1, -1):
                mpre[k] = np.fmax(mpre[k], mpre[k + 1])
            k = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
            ap = np.sum((mrec[k] - mrec[k - 1]) * mpre[k])
        aps.append(ap)
    return np.array(aps)


@pytest.mark.parametrize('seed', range(8))
def test_matches_devkit_transcription_on_random_data(seed):
    rng = np.random.default_rng(seed)
    data = _random_dataset(rng, quantize_scores=seed % 2 == 1)  # odd seeds: many score ties
    for use_07_metric in (True, False):
        for pixel_inclusive in (True, False):
            options = {'iou_thresh': 0.5, 'use_07_metric': use_07_metric,
                       'pixel_inclusive': pixel_inclusive}
            ap = eval_detection_voc(**data, n_class=3, **options)['ap']
            np.testing.assert_allclose(ap, _devkit_reference(data, 3, **options), rtol=1e-12)


@pytest.mark.parametrize('seed', range(8))
def test_ap_in_unit_interval_and_image_order_irrelevant(seed):
    rng = np.random.default_rng(100 + seed)
    data = _random_dataset(rng, n_image=20)  # continuous scores: no ties
    result = eval_detection_voc(**data, n_class=3)
    ap = result['ap'][~np.isnan(result['ap'])]
    assert np.all((ap >= 0) & (ap <= 1))
    permutation = rng.permutation(20)
    permuted = {key: [values[i] for i in permutation] for key, values in data.items()}
    for use_07_metric in (True, False):
        np.testing.assert_allclose(
            eval_detection_voc(**permuted, n_class=3, use_07_metric=use_07_metric)['ap'],
            eval_detection_voc(**data, n_class=3, use_07_metric=use_07_metric)['ap'],
            rtol=1e-12)


def test_mismatched_list_lengths_raise():
    with pytest.raises(ValueError, match='one entry per image'):
        eval_detection_voc([np.zeros((0, 4))], [[]], [[]], [], [])


def test_format_ap_table():
    table = format_ap_table(np.array([0.5, np.nan, 0.25]), ('cat', 'dog', 'aeroplane'), 0.375)
    assert table.splitlines() == ['class      AP', 'cat        0.5000', 'dog        n/a',
                                  'aeroplane  0.2500', 'mAP        0.3750']
