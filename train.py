"""Command line: train, evaluate and detect with Faster R-CNN.

    python train.py train [--dataset=toy|voc07|voc0712|custom] [--option=value ...]
    python train.py eval --load-path=runs/<run>/best.pt
    python train.py detect --load-path=runs/<run>/best.pt image.jpg [more.jpg ...]
    torchrun --nproc_per_node=K train.py train ...   (data-parallel, one process per device)

Every option is a field of utils.config.Config.

Under torchrun each process trains on its own shard of the images and DDP averages the
gradients. Rank 0 alone logs, plots, writes the run folder and evaluates, while the others wait
at a barrier: the validation set is small and mAP needs all predictions in one place.
"""
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import fire
import torch
from PIL import Image
from torch import distributed as dist
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from data.dataset import (
    TestDataset,
    TrainDataset,
    build_bbox_dataset,
    collate_test,
    collate_train,
    usable_indices,
)
from data.toy import toy_dataset_dir
from data.util import DataError, read_image, size_problem
from model.faster_rcnn_vgg16 import FEAT_STRIDE, build_faster_rcnn
from model.utils.creator_tool import ProposalCreator
from trainer import (
    FasterRCNNTrainer,
    NonFiniteLossError,
    load_checkpoint,
    save_checkpoint,
    seed_all,
)
from utils.config import FIXED_ON_RESUME, Config, option_name
from utils.eval_tool import eval_detection_voc, format_ap_table
from utils.vis_tool import Visualizer, bbox_image


def pick_device(name, local_rank=0):
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device=cuda but no CUDA device is visible; use --device=cpu or auto')
    if name == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    return torch.device('cuda', local_rank)


def build_model(cfg, n_fg_class, load_weights=True):
    """The detector a Config describes, for ``n_fg_class`` foreground classes.

    ``load_weights=False`` starts from random weights (a checkpoint will replace them).
    """
    weights = cfg.caffe_pretrain_path if cfg.caffe_pretrain else cfg.pretrained_path
    weights = weights if load_weights else None
    if weights is not None and not os.path.isfile(weights):
        hint = ' (make it with misc/convert_caffe_pretrain.py)' if cfg.caffe_pretrain else ''
        raise ValueError(f'no VGG16 weights at {weights}{hint}')
    proposal_creator = ProposalCreator(
        cfg.rpn_nms_thresh, cfg.n_train_pre_nms, cfg.n_train_post_nms, cfg.n_test_pre_nms,
        cfg.n_test_post_nms, cfg.rpn_min_size, backend=cfg.backend)
    return build_faster_rcnn(
        n_fg_class, cfg.extractor, weights, anchor_scales=cfg.anchor_scales,
        anchor_ratios=cfg.anchor_ratios, proposal_creator=proposal_creator, backend=cfg.backend,
        min_size=cfg.min_size, max_size=cfg.max_size, normalization=cfg.normalization)


def bbox_dataset(cfg, split, class_names=None, check_images=False):
    """A split's bbox dataset, every object with its difficult flag; see data.dataset."""
    data_dir = cfg.voc_data_dir or (toy_dataset_dir() if cfg.dataset == 'toy' else None)
    return build_bbox_dataset(cfg.dataset, data_dir, split, class_names or cfg.class_names,
                              skip_bad=cfg.skip_bad, check_images=check_images)


def size_limits(cfg):
    """What decides whether the detector can use an image (see data.util.size_problem)."""
    return cfg.min_size, cfg.max_size, cfg.rpn_min_size, FEAT_STRIDE


def usable(cfg, dataset):
    """Indices of dataset's images the detector can use (too small or thin ones refused)."""
    return usable_indices(dataset, *size_limits(cfg), cfg.skip_bad)


def split_validation(indices, n_val, seed):
    """(train, val): n_val of indices held out of the training split, fixed by the seed."""
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(indices[k] for k in order[n_val:]), sorted(indices[k] for k in order[:n_val])


def run_data(cfg, class_names=None):
    """(train, val, test) datasets of a run, the class names and the number held out.

    Every image of both splits is decoded and size-checked here, before training starts: a
    long run never dies at its end on a bad test image. val is None when there are no
    held-out images or they hold no object (mAP is then undefined, best.pt is the last epoch).
    """
    trainval = bbox_dataset(cfg, 'trainval', class_names, check_images=True)
    class_names = tuple(trainval.class_names)
    test = bbox_dataset(cfg, 'test', class_names, check_images=True)
    kept = usable(cfg, trainval)
    n_val = cfg.n_val(len(kept))
    train_idx, val_idx = split_validation(kept, n_val, cfg.seed)
    if not train_idx:
        raise DataError(f'{cfg.voc_data_dir or cfg.dataset}: no usable training images '
                        f'(the trainval split has {len(trainval)}, {len(kept)} usable)')
    n_val_objects = sum(int((~trainval.get_annotation(i)[2]).sum()) for i in val_idx)
    if val_idx and not n_val_objects:
        warnings.warn(f'the {len(val_idx)} images held out for validation contain no objects, '
                      'so their mAP is undefined; best.pt will be the last epoch', stacklevel=2)
    train_set = TrainDataset(Subset(trainval, train_idx), cfg.min_size, cfg.max_size,
                             cfg.normalization, seed=cfg.seed, use_difficult=cfg.use_difficult)
    val_set = TestDataset(Subset(trainval, val_idx)) if n_val_objects else None
    test_set = TestDataset(Subset(test, usable(cfg, test)))
    return train_set, val_set, test_set, class_names, n_val


@torch.no_grad()
def evaluate(model, dataset, batch_size=1, n_images=None):
    """Predicts on an evaluation dataset and scores it with both VOC metrics (devkit-exact)."""
    if n_images is not None:
        dataset = Subset(dataset, range(min(n_images, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_test)
    preds, gts = ([], [], []), ([], [], [])
    for batch in tqdm(loader, desc='evaluate', leave=False, disable=None):
        for out, values in zip(preds, model.predict(batch['images'])):
            out.extend(v.cpu() for v in values)
        for out, key in zip(gts, ('bboxes', 'labels', 'difficults')):
            out.extend(batch[key])
    result = {}
    for name, use_07 in (('map', True), ('map_area', False)):
        r = eval_detection_voc(*preds, *gts, use_07_metric=use_07, pixel_inclusive=True,
                               n_class=model.n_class - 1)
        result[name], result['ap' if use_07 else 'ap_area'] = r['map'], r['ap']
    return result


def _json_value(value):
    """NaN and infinities as null: metrics.jsonl stays strict JSON (a class absent from the
    test split has an undefined AP)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLog:
    """The run folder's JSON-lines metrics log (rank 0 only).

    On resume, records after the checkpoint's step are dropped: the steps are run again and
    would otherwise be logged twice.
    """

    def __init__(self, path, enabled, resume_step=None):
        self.path, self.enabled = Path(path), enabled
        if enabled and resume_step is not None and self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines()
                     if _record_step(line) <= resume_step]
            write_atomic(self.path, ''.join(line + '\n' for line in lines))

    def write(self, **record):
        if self.enabled:
            record = {k: _json_value(v) for k, v in record.items()}
            with open(self.path, 'a') as f:
                f.write(json.dumps(record, allow_nan=False) + '\n')


def _record_step(line):
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: drop it
        return math.inf


def write_atomic(path, text):
    """Writes text to path through a temporary file and a rename: never half a file."""
    tmp = Path(f'{path}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def save_config(cfg, run_dir):
    """Writes run_dir/config.json. A new run folder appears whole, with its config.json, or
    not at all (it is made under a temporary name and renamed), so --resume can rely on it."""
    text = json.dumps(cfg.to_dict(), indent=2)
    if run_dir.is_dir():
        write_atomic(run_dir / 'config.json', text)
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{run_dir.name}-', dir=run_dir.parent))
    (tmp / 'config.json').write_text(text)
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(run_dir)


def setup_distributed(cfg):
    """rank, world size and device; torchrun's environment starts a process group."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(cfg.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def new_run_dir(cfg):
    """The folder of a new run: --run-name under --out-dir (refused if it exists: a new run
    never overwrites an old one), or <dataset>-<time>, made unique."""
    out_dir = Path(cfg.out_dir)
    if cfg.run_name is not None:
        run_dir = out_dir / cfg.run_name
        if run_dir.exists() and int(os.environ.get('RANK', 0)) == 0:
            raise ValueError(f'--run-name={cfg.run_name}: {run_dir} already exists; continue '
                             f'that run with --resume={run_dir} or choose another --run-name')
        return run_dir
    name = f'{cfg.dataset}-{time.strftime("%Y%m%d-%H%M%S")}'
    run_dir, k = out_dir / name, 1
    while run_dir.exists():
        k += 1
        run_dir = out_dir / f'{name}-{k}'
    return run_dir


def open_run(kwargs):
    """(Config, checkpoint state or None, run folder) for train's options.

    With --resume, the saved run's options with those given now on top: every one of them
    applies (e.g. more --epochs, another --lr), except those in FIXED_ON_RESUME, which are
    refused when they differ. A run folder with no checkpoint yet (stopped during its first
    epoch) starts again from its saved options.
    """
    given = Config.parse_options(kwargs)
    if given.get('resume') is None:
        cfg = Config.from_kwargs(**kwargs)
        return cfg, None, new_run_dir(cfg)
    path = Path(given['resume'])
    ckpt = path / 'last.pt' if path.is_dir() else path
    state = None
    if ckpt.is_file() or not (path / 'config.json').is_file():
        state = load_checkpoint(ckpt)  # names the file if it is missing or broken
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
    cfg = Config.from_kwargs(**{**saved, **given})
    return cfg, state, ckpt.parent


def train(**kwargs):
    """Trains a detector; every option is a Config field (see utils/config.py)."""
    cfg, state, run_dir = open_run(kwargs)
    rank, world_size, device = setup_distributed(cfg)
    main = rank == 0
    seed_all(cfg.seed)

    train_set, val_set, test_set, class_names, cfg.n_val_images = run_data(
        cfg, state and state['class_names'])  # config.json records the resolved hold-out
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate_train,
                        num_workers=cfg.num_workers, pin_memory=device.type == 'cuda')

    model = build_model(cfg, len(class_names), load_weights=state is None).to(device)
    vis = Visualizer(cfg.env, cfg.visdom_server, cfg.visdom_port, enabled=cfg.visdom and main)
    trainer = FasterRCNNTrainer(model, cfg, vis, device, rank, world_size)
    start_epoch, best_map, saved_epoch = 0, -1.0, None
    if state is not None:
        trainer.load_state_dict(state)
        start_epoch, best_map = state['epoch'] + 1, state['best_map']
        saved_epoch = state['epoch']
    if main:
        save_config(cfg, run_dir)
        print(f'run folder: {run_dir}; {len(train_set)} training images, {cfg.n_val_images} '
              f'held out for validation, {len(test_set)} test images, classes: '
              f'{", ".join(class_names)}'
              + (f'; resuming after epoch {start_epoch}' if start_epoch else ''))
    log = RunLog(run_dir / 'metrics.jsonl', main, resume_step=trainer.step)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            trainer.set_epoch(epoch)
            bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.epochs}', disable=not main or None)
            for batch in bar:
                trainer.train_step(batch)
                if main and trainer.step % cfg.plot_every == 0:
                    means = trainer.meters()
                    trainer.reset_meters()
                    bar.set_postfix(loss=f'{means["total_loss"]:.3f}')
                    log.write(step=trainer.step, epoch=epoch, lr=trainer.lr(), **means)
                    trainer.plot(batch, means, class_names)
            trainer.scheduler.step()
            if main:
                val_map = None
                if val_set is not None:
                    val_map = evaluate(model, val_set, cfg.batch_size)['map']
                    log.write(step=trainer.step, epoch=epoch, split='val', map=val_map)
                    vis.plot('val_map', val_map, epoch + 1)
                    print(f'epoch {epoch + 1}: validation mAP {val_map:.4f}')
                # Best is chosen on images held out of training, never on the test set.
                is_best = val_map is None or val_map > best_map
                best_map = val_map if is_best and val_map is not None else best_map
                ckpt = {**trainer.state_dict(), 'epoch': epoch, 'config': cfg.to_dict(),
                        'class_names': list(class_names), 'best_map': best_map}
                save_checkpoint(ckpt, run_dir / 'last.pt')
                saved_epoch = epoch
                if is_best:
                    save_checkpoint(ckpt, run_dir / 'best.pt')
            if world_size > 1:
                dist.barrier()  # the others wait while rank 0 evaluates and saves
    except NonFiniteLossError as e:
        kept = ('no checkpoint had been written yet' if saved_epoch is None else
                f'{run_dir / "last.pt"} (epoch {saved_epoch + 1}) is kept')
        sys.exit(f'error: {e}; training stopped, {kept}')

    if main:
        best = load_checkpoint(run_dir / 'best.pt', device)
        model.load_state_dict(best['model'])
        result = evaluate(model, test_set, cfg.batch_size, cfg.test_n_images)
        log.write(step=trainer.step, epoch=best['epoch'], split='test', map=result['map'],
                  map_area=result['map_area'])
        print(f'test set, best checkpoint (epoch {best["epoch"] + 1}):')
        print(format_ap_table(result['ap'], class_names, result['map']))
    if world_size > 1:
        dist.destroy_process_group()


def load_model(load_path, device='cpu', **overrides):
    """A trained detector from a checkpoint: (model in eval mode, Config, class names)."""
    state = load_checkpoint(load_path)
    cfg = Config.from_kwargs(**{**state['config'], **overrides, 'caffe_pretrain': False,
                                'pretrained_path': None, 'resume': None}, need_data=False)
    model = build_model(cfg, len(state['class_names']))
    model.load_state_dict(state['model'])
    return model.to(pick_device(device)).eval(), cfg, tuple(state['class_names'])


def eval(load_path, **kwargs):  # noqa: A001 (the CLI verb)
    """Per-class AP and mAP on the test split, both VOC metrics; the numbers train ends with."""
    model, cfg, class_names = load_model(load_path, kwargs.pop('device', 'auto'), **kwargs)
    cfg.check_data_dir()
    test = bbox_dataset(cfg, 'test', class_names)
    result = evaluate(model, TestDataset(Subset(test, usable(cfg, test))), cfg.batch_size,
                      cfg.test_n_images)
    print('VOC07 11-point metric:')
    print(format_ap_table(result['ap'], class_names, result['map']))
    print('VOC2010+ area metric:')
    print(format_ap_table(result['ap_area'], class_names, result['map_area']))


def unique_stem(path, taken):
    """path's file stem, with -2, -3, ... appended until it is not in taken (lower case, for
    case-insensitive filesystems); the result is added to taken."""
    stem, k = Path(path).stem, 1
    name = stem
    while name.lower() in taken:
        k += 1
        name = f'{stem}-{k}'
    taken.add(name.lower())
    return name


def detect(load_path, *images, out_dir='detections', preset='visualize', device='auto'):
    """Draws detected boxes on each image, at the image's own size, into out_dir/<name>.png
    and writes every detection to out_dir/detections.json.

    An image that cannot be read or used is reported, recorded with its error, and skipped;
    the others are processed, and the command then fails naming how many were skipped.
    """
    if not images:
        raise ValueError('detect needs at least one image path')
    model, cfg, class_names = load_model(load_path, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, taken = [], set()
    for path in tqdm(images, desc='detect', disable=None):
        try:
            image = read_image(path)
            problem = size_problem(image.shape[1:], *size_limits(cfg))
            if problem is not None:
                raise DataError(f'{path}: the image {problem}')
        except DataError as e:
            print(f'skipping {e}', file=sys.stderr)
            records.append({'image': str(path), 'error': str(e)})
            continue
        bboxes, labels, scores = (x[0].cpu() for x in model.predict([image], preset=preset))
        name = f'{unique_stem(path, taken)}.png'
        drawn = bbox_image(image, bboxes, labels, scores, class_names)  # (3, H, W) uint8
        Image.fromarray(drawn.transpose(1, 2, 0)).save(out / name)
        records.append({'image': str(path), 'output': name, 'detections': [
            {'bbox': b.tolist(), 'label': class_names[lab], 'score': float(s)}
            for b, lab, s in zip(bboxes, labels, scores)]})
    write_atomic(out / 'detections.json', json.dumps(records, indent=2))
    failed = sum('error' in r for r in records)
    print(f'{len(images) - failed} images with their boxes and detections.json written to {out}')
    if failed:
        raise DataError(f'{failed} of {len(images)} images could not be used (see above and '
                        f'{out / "detections.json"})')


COMMANDS = {'train': train, 'eval': eval, 'detect': detect}


def main(argv=None):
    """The command line. An error a user can cause (a bad option, path, data or checkpoint)
    ends the command with one line naming it; --debug shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = '--debug' in argv
    argv = [arg for arg in argv if arg != '--debug']
    try:
        fire.Fire(COMMANDS, command=argv)
    except (ValueError, OSError) as e:
        if debug:
            raise
        # An error from a DataLoader worker carries the worker's traceback; its last line is
        # the original message.
        sys.exit(f'error: {str(e).strip().splitlines()[-1]}')


if __name__ == '__main__':
    main()
