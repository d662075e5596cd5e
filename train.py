"""Command line: train, evaluate and detect with Faster R-CNN.

    python train.py train [--dataset=toy|voc07|voc0712|custom|coco|coco2017] [--option=value ...]
    python train.py eval --load-path=runs/<run>/best.pt
    python train.py detect --load-path=runs/<run>/best.pt image.jpg [more.jpg ...]
    python train.py export --load-path=runs/<run>/best.pt --out=model.onnx   (then --onnx=)
    python train.py VERB --help     every option of the verb: type, default and meaning
    torchrun --nproc_per_node=K train.py train ...   (data-parallel, one process per device)

The options of train are the fields of utils.config.Config; the run itself is trainer.train.
"""
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import time
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

import trainer
from data.dataset import ImageFiles
from data.util import DataError
from model.ops.speed import fast_mixed_precision, keep_freed_memory, mixed_precision
from utils.checkpoint import load_checkpoint, load_detector
from utils.config import FIXED_ON_RESUME, GROUPS, Config, option_name, options_help
from utils.evaluate import evaluate, format_result, images_per_second, model_device
from utils.export import EXPORTED, OnnxDetector, export_checkpoint
from utils.run import new_run_dir, run_command, unique_name, write_atomic
from utils.vis_tool import bbox_image

# The options that change what eval measures; train takes every Config field.
EVAL_OPTIONS = ('dataset', 'voc_data_dir', 'coco_json', 'coco_test_json', 'image_dir',
                'coco_dir', 'skip_bad', 'num_workers', 'min_size', 'max_size', 'backend',
                'n_test_pre_nms', 'n_test_post_nms', 'eval_score_thresh', 'eval_nms_thresh',
                'batch_size', 'amp', 'device', 'metric', 'test_n_images', 'compile')


def train(**options):
    """Trains a detector and tests its best checkpoint; writes a run folder (see README).

    With --resume, the saved run's options with those given now on top: every one of them
    applies (e.g. more --epochs, another --lr), except those in FIXED_ON_RESUME, which are
    refused when they differ. A run folder with no checkpoint yet (stopped during its first
    epoch) starts again from its saved options.
    """
    given = Config.parse_options(options)
    if given.get('resume') is None:
        cfg = Config.from_kwargs(**options)
        rank = int(os.environ.get('RANK', 0))
        return trainer.train(cfg, new_run_dir(cfg.out_dir, cfg.run_name, cfg.dataset, rank))
    path = Path(given['resume'])
    ckpt = path / 'last.pt' if path.is_dir() else path
    state = None
    if ckpt.is_file() or not (path / 'config.json').is_file():
        # names the file if it is missing or broken
        state = load_checkpoint(ckpt, required=('model', 'class_names', 'config'))
        saved = state['config']
    else:
        try:
            saved = json.loads((path / 'config.json').read_text())
        except ValueError as e:
            raise ValueError(f'{path / "config.json"} is not valid JSON ({e})') from e
    saved = Config.parse_options(saved)
    for name in FIXED_ON_RESUME:
        if name in given and given[name] != saved[name]:
            raise ValueError(f'{option_name(name)}={given[name]!r} cannot change on --resume '
                             f'(the run has {saved[name]!r}); start a new run for it')
    trainer.train(Config.from_kwargs(**{**saved, **given}), ckpt.parent, state)


def load_model(load_path, device='cpu', onnx=None, **overrides):
    """A trained detector from a checkpoint, set up to run fast, or with onnx an exported file
    in ONNX Runtime: (model in eval mode, Config, class names, the COCO category id of each
    class or None).

    overrides: eval's options (EVAL_OPTIONS, less EXPORTED with onnx). Without --amp, the
    checkpoint's setting, except on a device where mixed precision is slower.
    """
    for name in Config.parse_options(overrides):
        if name not in EVAL_OPTIONS or (onnx and name in EXPORTED):
            raise ValueError(f'{option_name(name)} does not apply to ' + (
                f'{onnx}: export it again to change it' if onnx and name in EXPORTED else
                'a trained model; python train.py eval --help lists the options that do'))
    if (load_path is None) == (onnx is None):
        raise ValueError('give either --load-path=CHECKPOINT or --onnx=FILE')
    model = OnnxDetector(onnx) if onnx else None
    state = model.meta if onnx else load_checkpoint(
        load_path, required=('model', 'class_names', 'config'))
    device = trainer.pick_device('cpu' if onnx else device)
    if onnx or ('amp' not in overrides and not fast_mixed_precision(device)):
        overrides['amp'] = False
    cfg = Config.from_kwargs(**{**state['config'], **overrides, 'caffe_pretrain': False,
                                'pretrained_path': None, 'pretrained': None, 'resume': None},
                             need_data=False)
    if onnx:  # thresholds are inputs of the graph
        model.presets['evaluate'] = dict(score_thresh=cfg.eval_score_thresh,
                                         nms_thresh=cfg.eval_nms_thresh)
    else:
        model, _ = load_detector(state, device, **dataclasses.asdict(cfg.model_options()))
        model = trainer.run_fast(model, cfg.compile)
    return model, cfg, tuple(state['class_names']), state.get('category_ids')


def eval(load_path=None, onnx=None, *, device='auto', **options):  # noqa: A001 (the CLI verb)
    """Per-class AP and mAP of a checkpoint (or with --onnx, an exported file in ONNX Runtime)
    on the test split (both VOC metrics, or with --metric=coco COCO AP): the numbers train ends
    with. Options not given are the checkpoint's run's."""
    model, cfg, class_names, _ = load_model(load_path, device, onnx, **options)
    cfg.check_data_dir()
    test = trainer.usable_test_set(cfg, trainer.bbox_dataset(cfg, 'test', class_names))
    result = evaluate(model, test, cfg.batch_size,
                      cfg.test_n_images, cfg.metric, cfg.num_workers, report=True, amp=cfg.amp)
    print(format_result(result, class_names, cfg.metric))


def detect(load_path: str | None = None, *images, onnx: str | None = None,
           out_dir: str = 'detections', preset: str = 'visualize', device: str = 'auto',
           batch_size: int = 1, num_workers: int = 2, amp: bool | None = None):
    """Draws the detected boxes on each image, at the image's own size, into out_dir/<name>.png
    and writes every detection to out_dir/detections.json. An image that cannot be read or used
    is reported, recorded with its error, and skipped; the command then fails naming how many.

    Args:
        load_path: the checkpoint (runs/<run>/best.pt)
        onnx: instead, a file export wrote, run by ONNX Runtime on the CPU
        out_dir: where the pictures and detections.json go
        preset: visualize (confident boxes only) or evaluate (the paper's test thresholds)
        device: auto (CUDA where there is one), cpu or cuda
        batch_size: images predicted together (padding moves a smaller image's scores slightly)
        num_workers: processes reading the images meanwhile
        amp: mixed precision (default: as the checkpoint was trained, where it is faster)
    """
    if onnx is not None and load_path is not None:  # with --onnx, every argument is an image
        load_path, images = None, (load_path, *images)
    if not images:
        raise ValueError('detect needs at least one image path')
    if preset not in ('visualize', 'evaluate'):
        raise ValueError(f'--preset={preset!r} is not valid; choose visualize or evaluate')
    options = dict(batch_size=batch_size, num_workers=num_workers, amp=amp)
    model, cfg, class_names, category_ids = load_model(
        load_path, device, onnx, **{k: v for k, v in options.items() if v is not None})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, taken = [], set()
    loader = DataLoader(ImageFiles(images, trainer.size_limits(cfg)), cfg.batch_size,
                        num_workers=min(cfg.num_workers, len(images)), collate_fn=list)
    start = time.perf_counter()
    with (tqdm(total=len(images), desc='detect', disable=None) as bar,
          mixed_precision(model_device(model), cfg.amp)):
        for batch in loader:
            good = [image for _, image, error in batch if error is None]
            found = iter(zip(*model.predict(good, preset=preset)) if good else ())  # in order
            for path, image, error in batch:
                if error is not None:
                    print(f'skipping {error}', file=sys.stderr)
                    records.append({'image': str(path), 'error': error})
                    continue
                bboxes, labels, scores = (x.cpu() for x in next(found))
                name = f'{unique_name(Path(path).stem, taken)}.png'
                drawn = bbox_image(image, bboxes, labels, scores, class_names)  # (3, H, W)
                Image.fromarray(drawn.transpose(1, 2, 0)).save(out / name)
                records.append({'image': str(path), 'output': name, 'detections': [
                    {'bbox': b.tolist(), 'label': class_names[lab], 'score': float(s)}
                    | ({'category_id': category_ids[lab]} if category_ids else {})  # COCO
                    for b, lab, s in zip(bboxes, labels, scores)]})
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    write_atomic(out / 'detections.json', json.dumps(records, indent=2))
    failed = sum('error' in r for r in records)
    print(f'{len(images) - failed} images with their boxes and detections.json written to {out}'
          f' ({images_per_second(len(images) - failed, seconds)})')
    if failed:
        raise DataError(f'{failed} of {len(images)} images could not be used (see above and '
                        f'{out / "detections.json"})')


def export(load_path: str, out: str = 'model.onnx'):
    """Writes a checkpoint's detector to one ONNX file that ONNX Runtime runs: an image of any
    size in; boxes, labels and scores out (see README, Deploy).

    Args:
        load_path: the checkpoint (runs/<run>/best.pt)
        out: the ONNX file to write
    """
    export_checkpoint(load_path, out)
    print(f'{out} written; python train.py detect --onnx={out} IMAGE ... runs it')


COMMANDS = {'train': train, 'eval': eval, 'detect': detect, 'export': export}


def usage(verb):
    """The --help text of a verb: its docstring's first paragraph and its options, grouped."""
    function = COMMANDS[verb]
    lines = [f'usage: python train.py {verb}{" --load-path=CHECKPOINT" * (verb != "train")}'
             f'{" IMAGE [IMAGE ...]" * (verb == "detect")} [--option=value ...]', '',
             *textwrap.wrap(inspect.getdoc(function).split('\n\n')[0], 100)]
    if verb in ('detect', 'export'):
        return '\n'.join(lines + ['\noptions:', *options_help(function)])
    if verb == 'eval':  # its model: a checkpoint or an ONNX file, as detect's
        lines += ['\ndetector:', *options_help(detect, ('load_path', 'onnx'))]
    for title, classes in GROUPS:  # every group has options of eval's too
        lines.append(f'\n{title} options:')
        for cls in classes:
            lines += options_help(cls, None if verb == 'train' else EVAL_OPTIONS)
    return '\n'.join(lines)


def main(argv=None):
    """The command line. An error a user can cause (a bad option, path, data or checkpoint)
    ends the command with one line naming it; --debug shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = (argv or ['--help'])[0]
    if verb in ('--help', '-h'):
        return print(__doc__.strip())
    if verb not in COMMANDS:
        sys.exit(f'error: unknown command {verb!r}; choose one of {", ".join(COMMANDS)} '
                 '(python train.py --help)')
    if {'--help', '-h'} & set(argv[1:]):
        return print(usage(verb))
    keep_freed_memory()
    run_command(COMMANDS, argv)


if __name__ == '__main__':
    main()
