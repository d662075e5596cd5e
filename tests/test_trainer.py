
import pytest
import torch

from model.faster_rcnn import ModelOptions, build_faster_rcnn
from model.losses import smooth_l1_loss
from trainer import FasterRCNNTrainer, make_optimizer
from utils.config import Config


def test_smooth_l1_by_hand():
    # sigma 1: |d| < 1 -> 0.5 d^2, else |d| - 0.5; only label > 0 rows count;
    # divided by the number of rows with label >= 0 (here 3 of 4).
    pred = torch.tensor([[0.5, 0, 0, 0], [3.0, 0, 0, 0], [9.0, 9, 9, 9], [1.0, 1, 1, 1]])
    target = torch.zeros(4, 4)
    label = torch.tensor([1, 2, 0, -1])
    expected = (0.5 * 0.25 + (3 - 0.5)) / 3
    assert float(smooth_l1_loss(pred, target, label, 1.0)) == pytest.approx(expected)
    # sigma 3: the quadratic zone shrinks to |d| < 1/9: 0.5 -> 0.5 - 0.5/9.
    assert float(smooth_l1_loss(pred[:1], target[:1], label[:1], 3.0)) == pytest.approx(
        0.5 - 0.5 / 9)
    assert float(smooth_l1_loss(pred, target, torch.full((4,), -1), 1.0)) == 0


def test_optimizer_gives_biases_twice_the_lr_and_no_decay():
    model = build_faster_rcnn(3, ModelOptions('small'))
    opt = make_optimizer(model, 'sgd', 0.01, 0.9, 5e-4)
    weights, biases = opt.param_groups
    assert (weights['lr'], weights['weight_decay'], weights['momentum']) == (0.01, 5e-4, 0.9)
    assert (biases['lr'], biases['weight_decay']) == (0.02, 0.0)
    n_bias = sum(1 for name, p in model.named_parameters() if name.endswith('bias'))
    assert len(biases['params']) == n_bias
    assert isinstance(make_optimizer(model, 'adam', 0.01, 0.9, 0), torch.optim.Adam)


@pytest.mark.filterwarnings('ignore:Detected call of')
def test_lr_drops_at_the_milestones():
    cfg = Config(lr=0.01, lr_milestones=(2,), epochs=4)
    trainer = FasterRCNNTrainer(build_faster_rcnn(3, ModelOptions('small')), cfg)
    lrs = []
    for _ in range(4):
        lrs.append(trainer.optimizer.param_groups[0]['lr'])
        trainer.scheduler.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001])


@pytest.mark.filterwarnings('ignore:Detected call of')
def test_a_box_on_the_image_edge_trains_after_resizing():
    # A box clipped to the right edge of a 1153 x 500 image, resized to 1000 x 434, ends at
    # 1000.00006 in float32: the model takes it as it is (no check may refuse valid data).
    from model.transform import resize_bbox
    bbox = resize_bbox(torch.tensor([[600.0, 0, 1153, 500]]), (500, 1153), (434, 1000))
    assert bbox[0, 2] > 1000
    cfg = Config(lr=0.01, min_size=434, max_size=1000, anchor_scales=(8,))
    trainer = FasterRCNNTrainer(build_faster_rcnn(1, cfg.model_options()), cfg)
    batch = dict(images=torch.randn(1, 3, 434, 1000), sizes=torch.tensor([[434, 1000]]),
                 bboxes=[bbox], labels=[torch.tensor([0])], scales=torch.tensor([0.8673]))
    losses = trainer.train_step(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert trainer.pop_means()['total_loss'] == pytest.approx(float(losses['total_loss']))
    assert trainer.pop_means()['total_loss'] == 0  # reset by the first call


def test_seed_all_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    from trainer import seed_all
    seed_all(7)
    first = (random.random(), np.random.rand(), torch.rand(()).item())
    seed_all(7)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == first
    seed_all(8)
    assert random.random() != first[0] and np.random.rand() != first[1]


@pytest.mark.filterwarnings('ignore:Detected call of')
def test_resume_puts_new_solver_options_into_a_loaded_state():
    """What --resume does: options in the Config win over the loaded optimizer's; unchanged
    ones give back exactly the values the schedule reached (two milestones passed)."""
    cfg = Config(lr=0.01, lr_milestones=(1, 2), epochs=4, lr_decay=0.3)
    trained = FasterRCNNTrainer(build_faster_rcnn(3, ModelOptions('small')), cfg)
    for _ in range(3):
        trained.scheduler.step()
    state = {**trained.state_dict()}
    same = FasterRCNNTrainer(build_faster_rcnn(3, ModelOptions('small')), cfg)
    same.load_state_dict(state)
    assert [g['lr'] for g in same.optimizer.param_groups] == [
        g['lr'] for g in trained.optimizer.param_groups] == [0.01 * 0.3 * 0.3, 0.02 * 0.3 * 0.3]

    changed = Config(lr=0.05, lr_milestones=(2,), epochs=4, momentum=0.5, weight_decay=1e-4)
    resumed = FasterRCNNTrainer(build_faster_rcnn(3, ModelOptions('small')), changed)
    resumed.load_state_dict(state)
    weights, biases = resumed.optimizer.param_groups
    assert (weights['lr'], biases['lr']) == (0.05 * 0.1, 0.1 * 0.1)  # milestone 2 passed
    assert (weights['momentum'], weights['weight_decay'], biases['weight_decay']) == (
        0.5, 1e-4, 0.0)
    resumed.scheduler.step()  # the schedule goes on from there
    assert resumed.scheduler.base_lrs == [0.05, 0.1]
    assert resumed.optimizer.param_groups[0]['lr'] == 0.05 * 0.1
