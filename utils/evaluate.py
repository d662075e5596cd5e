"""Scoring a detector on a dataset: its predictions against the ground truth, by the VOC
devkit's metric (utils/eval_tool.py) or COCO AP (utils/coco_eval.py)."""
import time

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.dataset import collate_test
from model.ops.speed import mixed_precision
from utils.coco_eval import eval_detection_coco, format_coco_table
from utils.eval_tool import eval_detection_voc, format_ap_table


@torch.no_grad()
def evaluate(model, dataset, batch_size=1, n_images=None, metric='voc', num_workers=0,
             report=False, amp=False):
    """Predicts on an evaluation dataset (a bbox dataset: image, bbox, label, difficult) and
    scores it: metric 'voc', both VOC metrics (devkit-exact; 'map' is VOC07's), or 'coco', COCO
    AP through pycocotools ('map' is AP).

    n_images: the first n only; num_workers processes read the images while the model
    predicts; report: print the images per second of the whole pass (reading, predicting);
    amp: predict under --amp's mixed precision."""
    if n_images is not None:
        dataset = Subset(dataset, range(min(n_images, len(dataset))))
    loader = DataLoader(dataset, batch_size, collate_fn=collate_test, num_workers=num_workers)
    preds, gts = ([], [], []), ([], [], [])
    start = time.perf_counter()
    with mixed_precision(model_device(model), amp):
        for batch in tqdm(loader, desc='evaluate', leave=False, disable=None):
            for out, values in zip(preds, model.predict(batch['images'])):
                out.extend(v.cpu() for v in values)
            for out, key in zip(gts, ('bboxes', 'labels', 'difficults')):
                out.extend(batch[key])
    if report:
        print(images_per_second(len(dataset), time.perf_counter() - start))
    if metric == 'coco':
        return eval_detection_coco(*preds, *gts, n_class=model.n_class - 1)
    voc07, area = (eval_detection_voc(*preds, *gts, use_07_metric=use_07, pixel_inclusive=True,
                                      n_class=model.n_class - 1) for use_07 in (True, False))
    return {'map': voc07['map'], 'ap': voc07['ap'], 'map_area': area['map'], 'ap_area': area['ap']}


def model_device(model):
    """Where a detector runs: its parameters' device (an OnnxDetector's: the CPU)."""
    return next(model.parameters()).device if hasattr(model, 'parameters') else torch.device('cpu')


def images_per_second(n_images, seconds):
    return f'{n_images} images in {seconds:.1f} s: {n_images / seconds:.2f} images/s'


def format_result(result, class_names, metric):
    """evaluate's result as text: per-class AP tables (VOC07's and the area metric's), or the
    six COCO numbers and the per-class AP."""
    if metric == 'coco':
        return '\n'.join([format_coco_table(result),
                          format_ap_table(result['ap_per_class'], class_names, result['map'])])
    voc07 = format_ap_table(result['ap'], class_names, result['map'])
    area = format_ap_table(result['ap_area'], class_names, result['map_area'])
    return f'VOC07 11-point metric:\n{voc07}\nVOC2010+ area metric:\n{area}'
