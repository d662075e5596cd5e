import os
import subprocess
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (before torch loads its OpenMP): the background
# trainings below share the two cores with the tests, and spinning threads take the cores from
# working ones. Two 2-thread trainings of one epoch at once took 169 s each with spinning, 61 s
# with sleeping (42 s for one alone); the results are the same either way.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


# --- the two long trainings, in the background ------------------------------------------------
# README's quick start and small_fpn on the toy dataset as COCO JSON each train for minutes. They
# run as a user runs them (train.py in a process of its own), started as the session starts and
# trained while the other tests run; the tests that read them are moved to the end of the
# session. The quick start keeps torch's default thread count, so it gives the numbers of the
# README command on this machine; small_fpn runs on one thread, so its numbers do not depend on
# the machine's core count, and a single-threaded training loses no core to waits for the other
# thread while it shares the cores. They run at a lower priority (nice 10) than the tests, so
# they take the cores that the tests leave idle, and the tests are not slowed down.

def quickstart_args(root, cache):
    """README's quick start (python train.py train), only the folders moved."""
    return ['--device=cpu', f'--out-dir={root}', '--run-name=run', '--visdom=false']


def coco_fpn_args(root, cache):
    """small_fpn on the toy dataset written as COCO JSON, 5 epochs at 192-300 px, on one thread
    (test_train.py's COCO_FPN_AP50 says what it reaches)."""
    from data.toy import toy_dataset_dir
    from misc.voc_to_coco import write_coco_json
    files = write_coco_json(toy_dataset_dir(cache), root / 'json')
    return ['--dataset=coco', f'--coco-json={files["trainval"]}',
            f'--coco-test-json={files["test"]}', '--extractor=small_fpn', '--min-size=192',
            '--max-size=300', '--epochs=5', '--lr-milestones=4', '--num-workers=0',
            '--device=cpu', f'--out-dir={root}', '--run-name=run', '--visdom=false']


# fixture name: (the options of train.py train, environment variables)
BACKGROUND = {'quickstart_run': (quickstart_args, {}),
              'coco_fpn_run': (coco_fpn_args, {'OMP_NUM_THREADS': '1'})}


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs CUDA')
        for item in items:
            if 'gpu' in item.keywords:
                item.add_marker(skip)
    items.sort(key=lambda item: bool(BACKGROUND.keys() & set(item.fixturenames)))


@pytest.fixture(scope='session')
def toy_cache(tmp_path_factory):
    """The FRCNN_CACHE of the background trainings, where they find the default toy dataset."""
    return tmp_path_factory.mktemp('toy_cache')


@pytest.fixture(scope='session', autouse=True)
def background_runs(request, tmp_path_factory, toy_cache):
    """Starts the trainings that this session's tests use: {fixture name: (run folder, process,
    log file)}. They share one toy dataset, made here first."""
    from data.toy import toy_dataset_dir
    needed = sorted({name for item in request.session.items for name in item.fixturenames
                     if name in BACKGROUND})
    runs = {}
    if needed:
        toy_dataset_dir(toy_cache)
        for name in needed:
            root = tmp_path_factory.mktemp(name)
            options, env = BACKGROUND[name]
            log = open(root / 'log.txt', 'w')  # noqa: SIM115 (closed at the session's end)
            process = subprocess.Popen(
                [sys.executable, 'train.py', 'train', *options(root, toy_cache)], cwd=ROOT,
                env={**os.environ, 'FRCNN_CACHE': str(toy_cache), **env}, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))
            runs[name] = root / 'run', process, log
    yield runs
    for _, process, log in runs.values():
        process.kill()
        process.wait()
        log.close()


def finished(runs, name):
    run_dir, process, log = runs[name]
    if process.wait() != 0:
        tail = Path(log.name).read_text()[-3000:]
        pytest.fail(f'{name}: train.py exited with status {process.returncode}:\n{tail}')
    return run_dir


@pytest.fixture(scope='session')
def quickstart_run(background_runs):
    """README's quick start's run folder, for every test that needs a well-trained model."""
    return finished(background_runs, 'quickstart_run')


@pytest.fixture(scope='session')
def coco_fpn_run(background_runs):
    """small_fpn's run folder, trained on the toy dataset as COCO JSON."""
    return finished(background_runs, 'coco_fpn_run')


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
