"""train.py on users' data and options: what goes wrong, said clearly, with nothing lost.

Every case starts from tiny generated data (the session's toy dataset, copied and damaged).
"""
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import launcher
import pytest
import torch
from conftest import tiny_run_options
from PIL import Image

import utils.checkpoint
from data.util import DataError
from train import detect, main, train
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.run import new_run_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def records(run_dir):
    """metrics.jsonl parsed strictly: NaN or a cut line fails the test."""
    def no_constants(name):
        raise AssertionError(f'metrics.jsonl holds {name}: not strict JSON')
    lines = (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(line, parse_constant=no_constants) for line in lines]


def custom_folder(toy_root, dest, n=None, annotations='annotations', images='images'):
    """toy_root's images as a labelImg-style folder (no ImageSets: the 80/20 hash split),
    in the lower-case folder names many public VOC-format datasets use."""
    (dest / annotations).mkdir(parents=True)
    (dest / images).mkdir()
    for xml in sorted((toy_root / 'Annotations').glob('*.xml'))[:n]:
        shutil.copy(xml, dest / annotations / xml.name)
        shutil.copy(toy_root / 'JPEGImages' / f'{xml.stem}.jpg', dest / images)
    return dest


def add_image(folder, name, size, box=(1, 1, 12, 12)):
    """A grey image of size (W, H) and its XML with one 'circle' box (1-based VOC pixels)."""
    Image.new('RGB', size, (128, 128, 128)).save(folder / 'images' / f'{name}.jpg')
    (folder / 'annotations' / f'{name}.xml').write_text(
        f'<annotation><filename>{name}.jpg</filename><object><name>circle</name><bndbox>'
        f'<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>'
        '</bndbox></object></annotation>')


def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return dest


# --- the README's own example, and the validation hold-out ------------------------------------

def test_readme_custom_example_trains_on_images(toy_root, tmp_path, capsys):
    """README's custom-data command, run as written on an 80-image folder (only the folder
    and, for time, the size of the run changed): it trains on images and reports on them."""
    readme = (ROOT / 'README.md').read_text().splitlines()
    line = next(x for x in readme if x.startswith('python train.py train --dataset=custom'))
    data = custom_folder(toy_root, tmp_path / 'my_data')
    options = dict(arg.split('=', 1) for arg in shlex.split(line)[3:])
    options.update({'--voc-data-dir': str(data), '--epochs': '1', '--extractor': 'small',
                    '--min-size': '160', '--max-size': '200', '--num-workers': '0',
                    '--visdom': 'false', '--out-dir': str(tmp_path), '--run-name': 'mine',
                    '--test-n-images': '4', '--plot-every': '10'})
    main(['train', *(f'{k}={v}' for k, v in options.items())])
    out = capsys.readouterr().out
    # 66 of the 80 fall in the trainval part of the hash split; 10% of them are held out.
    assert '59 training images, 7 held out for validation, 14 test images' in out
    losses = [r for r in records(tmp_path / 'mine') if 'total_loss' in r]
    assert len(losses) == 5 and all(math.isfinite(r['total_loss']) for r in losses)
    assert json.loads((tmp_path / 'mine' / 'config.json').read_text())['n_val_images'] == 7


def test_too_many_held_out_images_is_an_error_naming_the_option(toy_root, tmp_path):
    with pytest.raises(ValueError, match=r'--n-val-images=40 would hold out more than half of '
                                         r'the 60 images'):
        train(**tiny_run_options(toy_root, tmp_path, n_val_images=40))
    assert not (tmp_path / 'run').exists()


def test_validation_without_objects_still_chooses_a_best_checkpoint(toy_root, tmp_path):
    """Objects in 3 training images only (a split with none at all is an error:
    test_entry_points.py): the validation and test images hold none, so their mAP is
    undefined; best.pt is the last epoch, and metrics.jsonl stays strict JSON (null, not NaN)."""
    from data.dataset import build_bbox_dataset
    data = custom_folder(toy_root, tmp_path / 'empty', n=30)
    test_ids = build_bbox_dataset('custom', data, 'test', ('circle', 'square', 'triangle')).ids
    kept = [xml.stem for xml in sorted((data / 'annotations').glob('*.xml'))
            if xml.stem not in test_ids][-3:]  # none of them held out for validation (seed 0)
    for xml in (data / 'annotations').glob('*.xml'):
        if xml.stem not in kept:
            xml.write_text(f'<annotation><filename>{xml.stem}.jpg</filename></annotation>')
    options = tiny_run_options(data, tmp_path, dataset='custom', extractor='small', epochs=2,
                               class_names='circle,square,triangle', n_val_images=None)
    with pytest.warns(UserWarning, match='held out for validation contain no objects'):
        train(**options)
    best = load_checkpoint(tmp_path / 'run' / 'best.pt')
    assert best['epoch'] == 1
    test = [r for r in records(tmp_path / 'run') if r.get('split') == 'test']
    assert test[0]['map'] is None


# --- degenerate and corrupt images are found before training ----------------------------------

@pytest.mark.parametrize('size, problem', [
    ((1, 1), r'is 1x1, smaller than 16 px on a side'),
    ((10000, 100), r'is 10000x100, which --min-size/--max-size resize to 200x2'),
])
def test_unusable_images_are_refused_or_skipped_by_name(toy_root, tmp_path, size, problem):
    data = custom_folder(toy_root, tmp_path / 'data', n=40)
    add_image(data, 'odd', size, box=(1, 1) + size)
    options = tiny_run_options(data, tmp_path, dataset='custom', extractor='small',
                               n_val_images=0)
    with pytest.raises(DataError, match=rf'odd\.jpg: the image {problem}'):
        train(**options)
    assert not (tmp_path / 'run').exists()
    with pytest.warns(UserWarning, match=rf'skipping: .*odd\.jpg: the image {problem}'):
        train(**{**options, 'skip_bad': True})
    assert (tmp_path / 'run' / 'best.pt').is_file()


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def voc_copy(toy_root, dest):
    shutil.copytree(toy_root, dest)
    ids = {split: (dest / 'ImageSets' / 'Main' / f'{split}.txt').read_text().split()
           for split in ('trainval', 'test')}
    return dest, ids


def test_truncated_training_image_is_skipped_before_training(toy_root, tmp_path):
    data, ids = voc_copy(toy_root, tmp_path / 'data')
    truncate(data / 'JPEGImages' / f'{ids["trainval"][5]}.jpg')
    options = tiny_run_options(data, tmp_path, skip_bad=True)
    with pytest.warns(UserWarning) as warned:
        train(**options)
    skips = [str(w.message) for w in warned if str(w.message).startswith('skipping')]
    assert len(skips) == 1 and f'{ids["trainval"][5]}.jpg' in skips[0]
    assert sum('skipped 1 bad files' in str(w.message) for w in warned) == 1  # counted once
    assert load_checkpoint(tmp_path / 'run' / 'last.pt')['step'] == 55  # 59 - 4 held out


def test_corrupt_test_image_stops_the_run_before_training(toy_root, tmp_path):
    data, ids = voc_copy(toy_root, tmp_path / 'data')
    truncate(data / 'JPEGImages' / f'{ids["test"][3]}.jpg')
    with pytest.raises(DataError, match=rf'{ids["test"][3]}\.jpg'):
        train(**tiny_run_options(data, tmp_path))
    assert not (tmp_path / 'run' / 'last.pt').exists()


# --- run folders, resume ----------------------------------------------------------------------

def test_a_new_run_never_overwrites_an_old_one(trained_run, toy_root):
    before = (trained_run / 'last.pt').read_bytes()
    with pytest.raises(ValueError, match=r'--run-name=run: .*run already exists; continue that '
                                         r'run with --resume=.*run or choose another'):
        train(**tiny_run_options(toy_root, trained_run.parent))
    assert (trained_run / 'last.pt').read_bytes() == before
    first = new_run_dir(trained_run.parent, None, 'toy')
    first.mkdir()
    assert new_run_dir(trained_run.parent, None, 'toy') not in (first, trained_run)


@pytest.mark.parametrize('option, value', [
    ('optimizer', 'adam'), ('class_names', 'a,b,c'), ('extractor', 'vgg16'),
    ('n_val_images', 10), ('seed', 1), ('anchor_scales', [4, 8])])
def test_resume_refuses_options_that_cannot_change(trained_run, tmp_path, option, value):
    run = copy_run(trained_run, tmp_path / 'run')
    with pytest.raises(ValueError, match=rf'--{option.replace("_", "-")}=.* cannot change on '
                                         r'--resume \(the run has '):
        train(resume=str(run), epochs=2, **{option: value})


def test_resume_applies_new_options(trained_run, toy_root, tmp_path):
    """--lr, --lr-milestones, --momentum and --epochs given with --resume take effect, and
    config.json records them."""
    run = copy_run(trained_run, tmp_path / 'run')
    train(resume=str(run), epochs=2, lr=0.005, lr_milestones=[1], momentum=0.8, plot_every=7)
    state = load_checkpoint(run / 'last.pt')
    weights, biases = state['optimizer']['param_groups']
    # Milestone 1 passed at the end of epoch 2: 0.005 x 0.1 for the weights, twice for biases.
    assert (weights['lr'], biases['lr']) == (0.005 * 0.1, 0.01 * 0.1)
    assert weights['momentum'] == 0.8 and state['epoch'] == 1
    config = json.loads((run / 'config.json').read_text())
    assert (config['lr'], config['epochs'], config['momentum']) == (0.005, 2, 0.8)
    steps = [r['step'] for r in records(run) if 'total_loss' in r]
    assert steps == sorted(set(steps)) and steps[-1] == 112


def test_resume_drops_records_written_after_the_checkpoint(trained_run, tmp_path):
    """A kill after logging but before the next checkpoint: those steps run again on resume
    and are logged once."""
    run = copy_run(trained_run, tmp_path / 'run')
    with open(run / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': 60, 'epoch': 1, 'total_loss': 1.0}) + '\n{"step": 7')
    train(resume=str(run), epochs=2)
    logged = records(run)
    steps = [r['step'] for r in logged if 'total_loss' in r]
    assert steps == sorted(set(steps)) and 60 in steps
    assert [r for r in logged if r['step'] == 60][0]['total_loss'] != 1.0


def test_resume_of_a_run_stopped_in_its_first_epoch_starts_it_again(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / 'run')
    for name in ('last.pt', 'best.pt', 'metrics.jsonl'):
        (run / name).unlink()
    train(resume=str(run))
    again, first = load_checkpoint(run / 'last.pt'), load_checkpoint(trained_run / 'last.pt')
    assert again['step'] == first['step']
    for key, value in first['model'].items():
        assert torch.equal(value, again['model'][key]), key


def test_resume_without_a_run_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r'no checkpoint at .*nothing'):
        train(resume=str(tmp_path / 'nothing'))


# --- checkpoints on a full disk -----------------------------------------------------------------

def test_full_disk_names_the_checkpoint_and_leaves_no_temporary_file(trained_run, tmp_path):
    state = load_checkpoint(trained_run / 'last.pt')
    path = tmp_path / 'last.pt'
    utils.checkpoint.save_checkpoint(state, path)
    os.symlink('/dev/full', f'{path}.tmp')  # writing there fails with ENOSPC, like a full disk
    with pytest.raises(CheckpointError, match=rf'cannot write checkpoint {path}: no space left '
                                              r'on device'):
        utils.checkpoint.save_checkpoint(state, path)
    assert not os.path.lexists(f'{path}.tmp')
    assert load_checkpoint(path)['step'] == state['step']  # the previous one is intact


# --- the reference port's command -------------------------------------------------------------

@pytest.mark.slow
def test_caffe_pretrain_trains_vgg16_from_the_caffe_weights(tmp_path):
    """`train --caffe-pretrain` (the reference port's command) on the toy data: VGG16 starts
    from the weights file; conv1-conv2 are frozen, so they end exactly as loaded."""
    import torchvision

    from data.toy import make_toy_dataset
    torch.manual_seed(1)
    weights = torchvision.models.vgg16(weights=None).state_dict()  # the converter's layout
    weights = {k: v for k, v in weights.items() if not k.startswith('classifier.6.')}
    torch.save(weights, tmp_path / 'vgg16_caffe.pth')
    toy = make_toy_dataset(tmp_path / 'toy', n_trainval=6, n_test=2, seed=1)
    main(['train', '--caffe-pretrain', f'--caffe-pretrain-path={tmp_path / "vgg16_caffe.pth"}',
          f'--voc-data-dir={toy}', '--epochs=1', '--min-size=64', '--max-size=96',
          '--n-val-images=0', '--visdom=false', f'--out-dir={tmp_path}', '--run-name=caffe'])
    state = load_checkpoint(tmp_path / 'caffe' / 'last.pt')
    assert state['config']['extractor'] == 'vgg16'
    assert state['config']['normalization'] == 'caffe'
    assert torch.equal(state['model']['extractor.0.weight'], weights['features.0.weight'])
    assert not torch.equal(state['model']['extractor.28.weight'],
                           weights['features.28.weight'])  # conv5_3 trained


# --- detect -----------------------------------------------------------------------------------

def test_detect_names_outputs_uniquely_and_skips_a_bad_image(trained_run, toy_root, tmp_path,
                                                              capsys):
    source = sorted((toy_root / 'JPEGImages').glob('*.jpg'))[:2]
    for folder, image in zip(('a', 'b'), source, strict=True):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / 'photo.jpg')
    (tmp_path / 'a' / 'broken.jpg').write_bytes(b'not an image')
    inputs = [tmp_path / 'a' / 'photo.jpg', tmp_path / 'a' / 'broken.jpg',
              tmp_path / 'b' / 'photo.jpg']
    with pytest.raises(DataError, match=r'1 of 3 images could not be used'):
        detect(str(trained_run / 'best.pt'), *map(str, inputs), out_dir=str(tmp_path / 'det'))
    result = json.loads((tmp_path / 'det' / 'detections.json').read_text())
    assert [r.get('output') for r in result] == ['photo.png', None, 'photo-2.png']
    assert 'broken.jpg: cannot read image' in result[1]['error']
    assert 'broken.jpg' in capsys.readouterr().err
    for r, image in zip((result[0], result[2]), source, strict=True):
        with Image.open(tmp_path / 'det' / r['output']) as drawn, Image.open(image) as original:
            assert drawn.size == original.size


# --- the command line -------------------------------------------------------------------------

def run_cli(*args, cwd=ROOT):
    return launcher.run('train.py', *args, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--epochs=abc'], "error: --epochs='abc' is not a whole number"),
    (['--epochs=1.5'], 'error: --epochs=1.5 is not a whole number'),
    (['--amp=perhaps'], "error: --amp='perhaps' is not a boolean; use true or false"),
    (['--lrr=0.1'], 'error: unknown option --lrr; did you mean --lr'),
    (['--dataset=custom', '--voc-data-dir=/no/such'], 'error: --voc-data-dir: nothing at'),
])
def test_cli_errors_are_one_line(args, message):
    result = run_cli('train', '--visdom=false', *args)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr.startswith(message) and result.stderr.count('\n') == 1, result.stderr


@pytest.mark.slow
def test_cli_debug_shows_the_traceback():
    result = run_cli('train', '--debug', '--epochs=abc')
    assert result.returncode == 1 and 'Traceback' in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: --epochs='abc' is not a whole number")


# --- kill -9 at random points, then --resume ---------------------------------------------------

def final_weights(run_dir):
    return load_checkpoint(Path(run_dir) / 'last.pt')['model']


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_ends_as_an_uninterrupted_run(toy_root, tmp_path):
    """2-epoch runs killed with SIGKILL at random moments (start-up, data checks, training,
    evaluation, saving), once or twice each, and resumed after every kill, end with the same
    weights as a run never killed. FRCNN_KILL_TRIALS sets the number of runs killed (3 in the
    suite; the closing note reports a longer loop)."""
    trials = int(os.environ.get('FRCNN_KILL_TRIALS', 3))
    options = tiny_run_options(toy_root, tmp_path / 'straight', epochs=2, min_size=128,
                               max_size=160)
    start = time.monotonic()
    assert run_cli('train', *(f'--{k}={v}' for k, v in options.items())).returncode == 0
    duration = time.monotonic() - start
    straight = final_weights(tmp_path / 'straight' / 'run')

    rng = random.Random(int(os.environ.get('FRCNN_KILL_SEED', 0)))
    n_killed, n_runs = 0, 0
    for attempt in range(3 * trials):  # a run that ends before its first kill is not counted
        if n_runs == trials:
            break
        out_dir = tmp_path / f'killed{attempt}'
        args = [f'--{k}={v}' for k, v in {**options, 'out_dir': out_dir}.items()]
        kill_times = [rng.uniform(0.5, 0.9 * duration) for _ in range(rng.choice((1, 2)))]
        kills_before = n_killed
        while True:
            resume = [f'--resume={out_dir / "run"}'] if (out_dir / 'run').exists() else []
            process = launcher.start('train.py', 'train', *args, *resume)
            try:
                process.wait(timeout=kill_times.pop() if kill_times else None)
            except subprocess.TimeoutExpired:
                process.kill()
                n_killed += 1
            result = process.result(timeout=300)
            if result.returncode == 0:
                break
            assert result.returncode == -signal.SIGKILL, result.stderr
        if n_killed == kills_before:
            continue
        n_runs += 1
        resumed = final_weights(out_dir / 'run')
        for key, value in straight.items():
            assert torch.equal(value, resumed[key]), (attempt, key)
    print(f'{n_runs} runs, {n_killed} kills, every one resumed to the uninterrupted weights')
    assert n_runs == trials
