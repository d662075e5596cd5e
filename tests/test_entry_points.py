"""Every command-line entry point fails in one line: train.py's verbs and the misc/ scripts,
run as a user runs them (a process of their own, forked by tests/launcher.py). An expected
failure exits with status 1 and at most two lines on stderr that name the file or option, and
writes nothing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_options
from launcher import run

from model.ops.backend import cupy_problem
from utils.run import save_config

pytestmark = pytest.mark.slow  # each case starts a command: 0.3-5 s
ROOT = Path(__file__).resolve().parents[1]
# No network: downloads meet a closed port on loopback, and an empty torch.hub cache.
OFFLINE = {'https_proxy': 'http://127.0.0.1:9', 'http_proxy': 'http://127.0.0.1:9'}


def assert_fails_in_one_line(result, *named):
    """Exit status 1, at most two lines on stderr (a download's own 'Downloading: ...' line
    may come first), the last 'error: ...' naming every string in named."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert 1 <= len(lines) <= 2 and lines[-1].startswith('error: '), result.stderr
    for name in named:
        assert str(name) in lines[-1], (name, result.stderr)
    return lines[-1]


class Evil:
    def __reduce__(self):
        return os.system, ('echo this must never run',)


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    """A file of random bytes, a pickle that runs code when loaded, and a checkpoint of
    something else."""
    folder = tmp_path_factory.mktemp('bad')
    (folder / 'random.pt').write_bytes(torch.randint(0, 256, (3000,), dtype=torch.uint8,
                                                     generator=torch.Generator().manual_seed(0))
                                       .numpy().tobytes())
    torch.save({'model': Evil()}, folder / 'evil.pt')
    torch.save({'weights': torch.zeros(2)}, folder / 'other.pt')
    return folder


# --- detect checks its options before any work --------------------------------------------

@pytest.mark.parametrize('option', ['--foo=1', '--epochs=3'])
def test_detect_refuses_an_unknown_or_train_only_option_before_any_work(trained_run, toy_root,
                                                                        tmp_path, option):
    image = sorted((toy_root / 'JPEGImages').glob('*.jpg'))[0]
    result = run('train.py', 'detect', f'--load-path={trained_run / "best.pt"}', image,
                 f'--out-dir={tmp_path / "out"}', option)
    assert_fails_in_one_line(result, option.split('=')[0], 'train.py detect --help')
    assert not (tmp_path / 'out').exists()


def test_a_misc_script_refuses_an_unknown_option_before_any_work(tmp_path):
    """Without the check, the caffe converter would first try its download."""
    result = run('misc/convert_caffe_pretrain.py', '--sourse=vgg16.pth',
                 f'--out={tmp_path / "out.pt"}', env={**OFFLINE, 'TORCH_HOME': str(tmp_path)})
    assert_fails_in_one_line(result, '--sourse', 'convert_caffe_pretrain.py --help')
    assert 'Downloading' not in result.stderr and not (tmp_path / 'out.pt').exists()


# --- training data with no objects ----------------------------------------------------------

def test_coco_json_without_annotations_is_an_error_naming_the_file(toy_root, tmp_path):
    from misc.voc_to_coco import write_coco_json
    files = write_coco_json(toy_root, tmp_path / 'json')
    records = json.loads(files['trainval'].read_text())
    records['annotations'] = []
    files['trainval'].write_text(json.dumps(records))
    result = run('train.py', 'train', '--dataset=coco', f'--coco-json={files["trainval"]}',
                 f'--coco-test-json={files["test"]}', f'--out-dir={tmp_path / "runs"}')
    assert 'has no objects' in assert_fails_in_one_line(result, files['trainval'])
    assert not (tmp_path / 'runs').exists()


def test_voc_folder_without_objects_is_an_error_naming_the_folder(toy_root, tmp_path):
    data = shutil.copytree(toy_root, tmp_path / 'data')
    for xml in (data / 'Annotations').glob('*.xml'):
        text = xml.read_text()
        if '<object>' in text:
            xml.write_text(text[:text.index('<object>')] + '</annotation>\n')
    result = run('train.py', 'train', '--dataset=custom', f'--voc-data-dir={data}',
                 '--class-names=circle,square', f'--out-dir={tmp_path / "runs"}')
    assert 'has no objects' in assert_fails_in_one_line(result, data)
    assert not (tmp_path / 'runs').exists()


# --- checkpoints and weights files that are not what they should be -------------------------

@pytest.mark.parametrize('name, says', [
    ('random.pt', 'is not a readable checkpoint'), ('evil.pt', 'holds Python objects')])
def test_a_broken_checkpoint_is_named_in_one_line(bad_files, tmp_path, name, says):
    """(A missing file and another program's checkpoint: test_train.py, in-process.)"""
    result = run('train.py', 'eval', f'--load-path={bad_files / name}', cwd=tmp_path)
    assert says in assert_fails_in_one_line(result, bad_files / name)
    assert 'must never run' not in result.stdout + result.stderr


def test_a_broken_pretrained_weights_file_is_named_before_the_run_folder(bad_files, tmp_path):
    result = run('train.py', 'train', '--extractor=vgg16',
                 f'--pretrained-path={bad_files / "random.pt"}', f'--out-dir={tmp_path}/runs')
    assert_fails_in_one_line(result, bad_files / 'random.pt', 'vgg16 weights')
    assert not (tmp_path / 'runs').exists()


def test_pretrained_imagenet_offline_names_the_option_the_url_and_the_way_around(tmp_path):
    result = run('train.py', 'train', '--pretrained=imagenet', '--extractor=resnet50',
                 f'--out-dir={tmp_path}/runs', env={**OFFLINE, 'TORCH_HOME': str(tmp_path)})
    assert_fails_in_one_line(result, '--pretrained=imagenet', 'https://download.pytorch.org/',
                             '--pretrained-path')
    assert not (tmp_path / 'runs').exists()


# --- the converters --------------------------------------------------------------------------

@pytest.mark.parametrize('script, name, says', [
    ('misc/convert_caffe_pretrain.py', 'missing.pt', 'no --source file at'),
    ('misc/convert_caffe_pretrain.py', 'random.pt', 'is not a readable --source file'),
    ('misc/convert_caffe_pretrain.py', 'other.pt', 'not a VGG16 state dict'),
    ('misc/convert_torchvision_fpn.py', 'evil.pt', 'holds Python objects'),
    ('misc/convert_torchvision_fpn.py', 'other.pt', "not a state dict of torchvision's"),
    ('misc/convert_sfr_checkpoint.py', 'random.pt', 'not a readable simple-faster-rcnn')])
def test_converters_name_a_bad_source_in_one_line(bad_files, tmp_path, script, name, says):
    """The converters read --source through the same checked loader; each case once."""
    result = run(script, f'--source={bad_files / name}', f'--out={tmp_path / "out.pt"}')
    assert says in assert_fails_in_one_line(result, bad_files / name)
    assert not (tmp_path / 'out.pt').exists()


@pytest.mark.parametrize('script, args', [('misc/convert_caffe_pretrain.py', []),
                                          ('misc/convert_torchvision_fpn.py', ['--source=coco'])])
def test_converters_offline_say_what_they_fetch_and_the_way_around(tmp_path, script, args):
    result = run(script, *args, f'--out={tmp_path / "out.pt"}',
                 env={**OFFLINE, 'TORCH_HOME': str(tmp_path)})
    assert_fails_in_one_line(result, 'cannot download', 'https://', '--source=FILE')
    assert not (tmp_path / 'out.pt').exists()


# --- options ---------------------------------------------------------------------------------

@pytest.mark.skipif(cupy_problem() is None, reason='CuPy works here')
def test_backend_cupy_without_cupy_fails_before_the_run_folder(tmp_path):
    result = run('train.py', 'train', '--backend=cupy', f'--out-dir={tmp_path}/runs')
    assert_fails_in_one_line(result, '--backend=cupy', '--backend=auto')
    assert not (tmp_path / 'runs').exists()


def test_an_empty_class_name_is_refused(tmp_path):
    result = run('train.py', 'train', '--class-names=circle,,square', f'--out-dir={tmp_path}')
    assert_fails_in_one_line(result, '--class-names=circle,,square', 'empty')


def test_a_long_legal_run_name_makes_its_folder(tmp_path):
    """A 250-character name fits (names may have 255): the temporary folder does not add to
    it."""
    run_dir = tmp_path / ('r' * 250)
    save_config({'seed': 0}, run_dir)
    assert json.loads((run_dir / 'config.json').read_text()) == {'seed': 0}
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]


# --- a full disk -----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (where this machine lets us mount one): room for a run's config.json,
    not for its first checkpoint."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip('cannot mount a tmpfs here')
    yield disk
    subprocess.run(['umount', str(disk)], check=True)


def test_a_full_disk_says_so_naming_the_checkpoint(toy_root, small_disk):
    options = tiny_run_options(toy_root, small_disk, n_val_images=0, test_n_images=2)
    result = run('train.py', 'train', *[f'--{k.replace("_", "-")}={v}' for k, v in
                                        options.items()])
    assert_fails_in_one_line(result, small_disk / 'run' / 'last.pt', 'no space left on device')
    assert sorted(p.name for p in (small_disk / 'run').iterdir()) == ['config.json',
                                                                      'metrics.jsonl']


# --- warnings, and what a run leaves out -------------------------------------------------------

def test_warnings_are_one_line_each_and_counted_past_three(tmp_path):
    code = ('import sys, warnings; sys.path.insert(0, "."); from utils.run import run_command; '
            'run_command(lambda: [warnings.warn(f"bad thing {i}") for i in range(5)] and None,'
            ' [])')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        'warning: bad thing 0', 'warning: bad thing 1', 'warning: bad thing 2',
        'warning: 2 more like "bad thing 0" not shown']


def test_eval_counts_every_test_image_it_skips(trained_run, toy_root, tmp_path):
    """One unreadable test image and one too small for the detector, with --skip-bad: both
    are named, and the count says 2."""
    from PIL import Image
    data = shutil.copytree(toy_root, tmp_path / 'data')
    test_ids = (data / 'ImageSets' / 'Main' / 'test.txt').read_text().split()
    (data / 'JPEGImages' / f'{test_ids[0]}.jpg').write_bytes(b'not a jpeg')
    Image.new('RGB', (1, 1)).save(data / 'JPEGImages' / f'{test_ids[1]}.jpg')
    result = run('train.py', 'eval', f'--load-path={trained_run / "best.pt"}',
                 f'--voc-data-dir={data}', '--skip-bad', '--test-n-images=4', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith('warning: ')]
    assert any(f'{test_ids[0]}.jpg' in line for line in warned), warned
    assert any(f'{test_ids[1]}.jpg' in line for line in warned), warned
    assert any(line.startswith('warning: 2 test images skipped') for line in warned), warned
