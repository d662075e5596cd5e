import sys
from pathlib import Path

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
