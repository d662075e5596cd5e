import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import score_lists
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.coco_eval import COCO_AP_KEYS, eval_detection_coco, format_coco_table

SMALL, LARGE = (0, 0, 10, 10), (20, 20, 120, 120)  # areas 100 (< 32^2) and 10000 (> 96^2)
MEDIUM, CROWD = (0, 0, 40, 40), (60, 0, 100, 40)  # area 1600 each


def _eval(preds, gts, **kwargs):
    return score_lists(eval_detection_coco, preds, gts, **kwargs)


def test_perfect_detections_torch_inputs():
    gt_bboxes = [torch.tensor([SMALL, LARGE], dtype=torch.float32), torch.zeros(0, 4)]
    gt_labels = [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.int64)]
    scores = [torch.tensor([0.9, 0.3]), torch.zeros(0)]
    result = eval_detection_coco(gt_bboxes, gt_labels, scores, gt_bboxes, gt_labels,
                                 image_sizes=[(200, 300), (100, 100)])
    for key in ('ap', 'ap50', 'ap75', 'ap_small', 'ap_large', 'map'):
        # COCOeval's precision tp / (tp + fp + eps) is 1 - 2e-16, not 1.
        assert result[key] == pytest.approx(1.0, abs=1e-12), key
    assert math.isnan(result['ap_medium'])  # no medium object
    np.testing.assert_allclose(result['ap_per_class'], [1.0, 1.0], atol=1e-12)


def test_iou_exactly_0_6_counts_for_ap50_not_ap75():
    # Shifting the 10x10 box by 2.5 px: intersection 7.5 * 10 = 75, union 100 + 100 - 75 = 125,
    # IoU 75 / 125 = 0.6, a match at the thresholds 0.50, 0.55 and 0.60 (COCO matches IoU >=
    # threshold) and at none of the seven above.
    result = _eval([[((2.5, 0, 12.5, 10), 0, 0.9)]], [[(SMALL, 0, False)]])
    assert result['ap50'] == pytest.approx(1.0, abs=1e-12)
    assert result['ap75'] == 0.0
    assert result['ap'] == pytest.approx(0.3, abs=1e-12)


def test_crowd_gt_neither_helps_nor_hurts():
    gts, without_crowd = [[(MEDIUM, 0, False), (CROWD, 0, True)]], [[(MEDIUM, 0, False)]]
    on_crowd, on_object = (CROWD, 0, 0.9), (MEDIUM, 0, 0.5)
    # Ranked first, a detection on the crowd box would cost precision if it counted as a false
    # positive (as it does once the crowd box is gone) ...
    assert _eval([[on_crowd, on_object]], without_crowd)['ap'] < 0.9
    # ... but on the crowd box it is ignored: the same AP as without both.
    assert _eval([[on_crowd, on_object]], gts)['ap'] == _eval([[on_object]], without_crowd)['ap']
    # Nor does it detect anything: alone, it scores as no detection at all.
    assert _eval([[on_crowd]], gts)['ap'] == _eval([[]], gts)['ap'] == 0.0


def test_no_detections_give_zero_where_there_is_gt():
    gts = [[(SMALL, 0, False)], [(LARGE, 1, False)]]
    result = _eval([[], []], gts, n_class=3)
    for key in ('ap', 'ap50', 'ap75', 'ap_small', 'ap_large', 'map'):
        assert result[key] == 0.0, key
    assert math.isnan(result['ap_medium'])
    np.testing.assert_array_equal(result['ap_per_class'], [0.0, 0.0, np.nan])


def test_gt_areas_choose_the_size_range():
    # A 10x10 box that official data says covers 2000 px (e.g. a mask area) is medium.
    result = _eval([[(SMALL, 0, 0.9)]], [[(SMALL, 0, False)]], gt_areas=[[2000.0]])
    assert math.isnan(result['ap_small'])
    assert result['ap_medium'] == pytest.approx(1.0, abs=1e-12)


def test_quiet_with_summary_and_table(capsys):
    result = _eval([[(SMALL, 0, 0.9)]], [[(SMALL, 0, False)]])
    assert capsys.readouterr().out == ''
    lines = result['summary'].splitlines()
    assert len(lines) == 12 and lines[0].startswith(' Average Precision  (AP) @[ IoU=0.50:0.95')
    assert format_coco_table(result).splitlines() == [
        'metric  AP', 'AP      1.0000', 'AP50    1.0000', 'AP75    1.0000', 'APs     1.0000',
        'APm     n/a', 'APl     n/a']


def _random_dataset(n_image=15, n_fg=3, seed=0):
    """Boxes of all three sizes, crowd objects, images without gt, near misses, wrong labels and
    false positives. Returns the five lists of eval_detection_coco and gt_difficults."""
    rng = np.random.default_rng(seed)
    data = [[] for _ in range(6)]
    for _ in range(n_image):
        n_gt = rng.integers(0, 6)
        top_left = rng.uniform(0, 300, (n_gt, 2))
        gt_bbox = np.hstack((top_left, top_left + np.exp(rng.uniform(1.5, 5.5, (n_gt, 2)))))
        gt_label = rng.integers(0, n_fg, n_gt)
        detected = rng.random(n_gt) < 0.8
        jitter = rng.normal(0, 0.08, (detected.sum(), 4)) * np.tile(
            gt_bbox[detected, 2:] - gt_bbox[detected, :2], 2)
        n_fp = rng.integers(0, 4)
        fp_top_left = rng.uniform(0, 300, (n_fp, 2))
        bbox = np.vstack((gt_bbox[detected] + jitter,
                          np.hstack((fp_top_left, fp_top_left + rng.uniform(5, 150, (n_fp, 2))))))
        true_label = gt_label[detected]
        wrong = rng.random(len(true_label)) < 0.1
        label = np.concatenate((np.where(wrong, (true_label + 1) % n_fg, true_label),
                                rng.integers(0, n_fg, n_fp)))
        for values, column in zip((bbox, label, rng.random(len(label)), gt_bbox, gt_label,
                                   rng.random(n_gt) < 0.15), data, strict=True):
            column.append(values)
    return data


def _write_coco_files(tmp_path, data, n_class):
    """The same dataset as COCO JSON files, written without utils.coco_eval."""
    def xywh(box):
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
    bboxes, labels, scores, gt_bboxes, gt_labels, gt_difficults = data
    annotations = [{'image_id': i + 1, 'category_id': int(label) + 1, 'bbox': xywh(box),
                    'area': xywh(box)[2] * xywh(box)[3], 'iscrowd': int(crowd)}
                   for i in range(len(gt_bboxes))
                   for box, label, crowd in zip(gt_bboxes[i], gt_labels[i], gt_difficults[i])]
    gt = {'images': [{'id': i + 1} for i in range(len(gt_bboxes))],
          'annotations': [{**ann, 'id': j + 1} for j, ann in enumerate(annotations)],
          'categories': [{'id': k + 1, 'name': f'class{k}'} for k in range(n_class)]}
    results = [{'image_id': i + 1, 'category_id': int(label) + 1, 'bbox': xywh(box),
                'score': float(score)}
               for i in range(len(bboxes))
               for box, label, score in zip(bboxes[i], labels[i], scores[i])]
    gt_file, res_file = tmp_path / 'gt.json', tmp_path / 'results.json'
    gt_file.write_text(json.dumps(gt))
    res_file.write_text(json.dumps(results))
    return str(gt_file), str(res_file)


def _cocoeval(gt_file, res_file, cat_ids=None):
    """COCOeval the documented way, from files; returns its stats and printed summary."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_gt = COCO(gt_file)
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(res_file), 'bbox')
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        start = log.tell()
        evaluator.summarize()
    return np.where(evaluator.stats == -1, np.nan, evaluator.stats), log.getvalue()[start:]


def test_equals_pycocotools_from_files(tmp_path):
    data = _random_dataset()
    assert any(len(labels) == 0 for labels in data[4]) and any(map(np.any, data[5]))
    stats, summary = _cocoeval(*_write_coco_files(tmp_path, data, 3))
    result = eval_detection_coco(*data[:5], gt_difficults=data[5])
    assert 0.1 < result['ap'] < 0.9  # not a degenerate case
    np.testing.assert_array_equal([result[key] for key in COCO_AP_KEYS], stats[:6])
    assert result['summary'] == summary and result['map'] == result['ap']


def test_ap_per_class_equals_pycocotools_restricted_to_the_class(tmp_path):
    data = _random_dataset(seed=1)
    files = _write_coco_files(tmp_path, data, 4)  # class 3 has no gt: NaN
    result = eval_detection_coco(*data[:5], gt_difficults=data[5], n_class=4)
    expected = [_cocoeval(*files, cat_ids=[cls + 1])[0][0] for cls in range(4)]
    np.testing.assert_array_equal(result['ap_per_class'], expected)
    assert math.isnan(expected[3]) and not np.isnan(expected[:3]).any()
