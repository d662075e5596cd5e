import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
    """A small toy VOC-format dataset (VOCdevkit layout), generated once per test session."""
    from data.toy import make_toy_dataset
    return make_toy_dataset(tmp_path_factory.mktemp('toy'), n_trainval=60, n_test=20, seed=0)


def tiny_run_options(toy_root, out_dir, **overrides):
    """Options for a seconds-long training run on the session's toy dataset."""
    options = dict(dataset='toy', voc_data_dir=str(toy_root), out_dir=str(out_dir),
                   run_name='run', epochs=1, n_val_images=4, test_n_images=6, min_size=160,
                   max_size=200, num_workers=0, visdom=False, plot_every=10, seed=0)
    options.update(overrides)
    return options


@pytest.fixture(scope='session')
def trained_run(toy_root, tmp_path_factory):
    """A run folder with a checkpoint trained for one short epoch."""
    import trainer
    from utils.config import Config
    run_dir = tmp_path_factory.mktemp('trained') / 'run'
    trainer.train(Config.from_kwargs(**tiny_run_options(toy_root, run_dir.parent)), run_dir)
    return run_dir


@pytest.fixture(scope='session')
def quickstart_run(tmp_path_factory):
    """README's quick start, trained once per session with its defaults (only the folders
    moved): its run folder, for every test that needs a well-trained model."""
    import trainer
    from utils.config import Config
    root = tmp_path_factory.mktemp('quickstart')
    os.environ['FRCNN_CACHE'] = str(root / 'cache')  # the toy dataset, generated here
    try:
        cfg = Config.from_kwargs(dataset='toy', device='cpu', out_dir=str(root),
                                 run_name='quickstart', visdom=False)
        trainer.train(cfg, root / 'quickstart')
    finally:
        del os.environ['FRCNN_CACHE']
    return root / 'quickstart'


def score_lists(metric, preds, gts, **kwargs):
    """metric (eval_detection_voc or eval_detection_coco) on per-image lists of
    (box, label, score) predictions and (box, label, difficult) ground truth."""
    def columns(items, third_dtype):
        return (np.array([box for box, _, _ in items], np.float32).reshape(-1, 4),
                np.array([label for _, label, _ in items], np.int64),
                np.array([third for _, _, third in items], third_dtype))
    pred = [columns(items, np.float32) for items in preds]
    gt = [columns(items, bool) for items in gts]
    return metric(*zip(*pred, strict=True), *zip(*gt, strict=True), **kwargs)
