"""utils/evaluate.py: scoring a trained detector on a dataset."""
import torch
from torch.profiler import profile, record_function

from data.dataset import build_bbox_dataset
from utils.checkpoint import load_detector
from utils.evaluate import evaluate


def test_evaluate_with_amp_casts_each_weight_once_for_all_images(trained_run, toy_root):
    """--amp predicts in bfloat16 on the CPU, inside one autocast context around the whole
    evaluation: each fc weight is cast once, not once per image."""
    model, class_names = load_detector(trained_run / 'best.pt')
    test = build_bbox_dataset('toy', toy_root, 'test', class_names)
    test = torch.utils.data.Subset(test, range(3))
    weight = tuple(model.head.score.weight.shape)  # (C, D): cast only when the weight is
    casts = {}
    for amp in (False, True):
        with profile(record_shapes=True) as prof, record_function('evaluate'):
            result = evaluate(model, test, amp=amp)
        casts[amp] = sum(event.count for event in prof.key_averages(group_by_input_shape=True)
                         if event.key == 'aten::_to_copy' and event.input_shapes
                         and tuple(event.input_shapes[0]) == weight)
        assert 0 <= result['map'] <= 1
    assert casts == {False: 0, True: 1}
