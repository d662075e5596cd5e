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
import ctypes
import inspect
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
    TrainDataset,
    build_bbox_dataset,
    collate_test,
    collate_train,
    usable_indices,
)
from data.util import DataError, read_image, size_problem
from model.backbones import FEAT_STRIDE
from model.faster_rcnn import build_faster_rcnn
from trainer import (
    FasterRCNNTrainer,
    NonFiniteLossError,
    fast_mixed_precision,
    mixed_precision,
    seed_all,
)
from utils.checkpoint import load_checkpoint, load_detector, save_checkpoint
from utils.coco_eval import eval_detection_coco, format_coco_table
from utils.config import FIXED_ON_RESUME, Config, option_name
from utils.eval_tool import eval_detection_voc, format_ap_table
from utils.vis_tool import Visualizer, bbox_image


def pick_device(name, local_rank=0):
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device=cuda but no CUDA device is visible; use --device=cpu or auto')
    if name == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    return torch.device('cuda', local_rank)


def model_options(cfg):
    """The Config fields that shape the detector: build_faster_rcnn's keywords of the same
    name. Checkpoints store them, so that the model can be rebuilt without the Config."""
    parameters = inspect.signature(build_faster_rcnn).parameters
    return {name: getattr(cfg, name) for name in parameters if hasattr(cfg, name)}


def build_model(cfg, n_fg_class, load_weights=True):
    """The detector a Config describes, for ``n_fg_class`` foreground classes.

    ``load_weights=False`` starts from random weights (a checkpoint will replace them).
    """
    weights = cfg.caffe_pretrain_path if cfg.caffe_pretrain else cfg.pretrained_path
    if weights is not None and load_weights and not os.path.isfile(weights):
        hint = ' (make it with misc/convert_caffe_pretrain.py)' if cfg.caffe_pretrain else ''
        raise ValueError(f'no {cfg.extractor} weights at {weights}{hint}')
    weights = (weights or cfg.pretrained) if load_weights else None
    return compiled(build_faster_rcnn(n_fg_class, weights=weights, **model_options(cfg)), cfg)


def compiled(model, cfg):
    """The model, its extractor compiled with torch.compile if --compile (in place: the
    state dict keeps its keys). The RPN and head have data-dependent shapes; they stay eager."""
    if cfg.compile:
        model.extractor.compile()
    return model


def bbox_dataset(cfg, split, class_names=None, check_images=False):
    """A split's bbox dataset, every object with its difficult flag; see data.dataset."""
    data_dir = cfg.coco_dir if cfg.dataset == 'coco2017' else cfg.voc_data_dir
    return build_bbox_dataset(cfg.dataset, data_dir, split, class_names or cfg.class_names,
                              skip_bad=cfg.skip_bad, check_images=check_images,
                              coco_json=cfg.coco_json, coco_test_json=cfg.coco_test_json,
                              image_dir=cfg.image_dir)


def size_limits(cfg):
    """What decides whether the detector can use an image (see data.util.size_problem)."""
    return cfg.min_size, cfg.max_size, cfg.rpn_min_size, FEAT_STRIDE


def usable(cfg, dataset):
    """Indices of dataset's images the detector can use (too small or thin ones refused)."""
    return usable_indices(dataset, *size_limits(cfg), cfg.skip_bad)


def run_data(cfg, class_names=None):
    """(train, val, test) datasets of a run, the class names, the number held out, and the
    COCO category id of each class (None for VOC-format data).

    Every image of both splits is decoded and size-checked here, before training starts: a
    long run never dies at its end on a bad test image. val is None when there are no
    held-out images or they hold no object (mAP is then undefined, best.pt is the last epoch).
    """
    trainval = bbox_dataset(cfg, 'trainval', class_names, check_images=True)
    class_names = tuple(trainval.class_names)
    test = bbox_dataset(cfg, 'test', class_names, check_images=True)
    kept = usable(cfg, trainval)
    n_val = cfg.n_val(len(kept))
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    val_idx = sorted(kept[k] for k in order[:n_val])  # held out of training, fixed by the seed
    train_idx = sorted(kept[k] for k in order[n_val:])
    if not train_idx:
        raise DataError(f'{cfg.voc_data_dir or cfg.dataset}: no usable training images '
                        f'(the trainval split has {len(trainval)}, {len(kept)} usable)')
    n_val_objects = sum(int((~trainval.get_annotation(i)[2]).sum()) for i in val_idx)
    if val_idx and not n_val_objects:
        warnings.warn(f'the {len(val_idx)} images held out for validation contain no objects, '
                      'so their mAP is undefined; best.pt will be the last epoch', stacklevel=2)
    train_set = TrainDataset(Subset(trainval, train_idx), cfg.min_size, cfg.max_size,
                             cfg.normalization, seed=cfg.seed, use_difficult=cfg.use_difficult)
    val_set = Subset(trainval, val_idx) if n_val_objects else None
    test_set = Subset(test, usable(cfg, test))
    return train_set, val_set, test_set, class_names, n_val, getattr(trainval, 'category_ids',
                                                                     None)


@torch.no_grad()
def evaluate(model, dataset, batch_size=1, n_images=None, metric='voc', num_workers=0,
             report=False, amp=False):
    """Predicts on an evaluation dataset and scores it: metric 'voc', both VOC metrics
    (devkit-exact; 'map' is VOC07's), or 'coco', COCO AP through pycocotools ('map' is AP).

    num_workers processes read the images while the model predicts; report: print the images
    per second of the whole pass (reading, predicting), at the end; amp: predict under --amp's
    mixed precision."""
    if n_images is not None:
        dataset = Subset(dataset, range(min(n_images, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_test,
                        num_workers=num_workers)
    preds, gts = ([], [], []), ([], [], [])
    start = time.perf_counter()
    with mixed_precision(next(model.parameters()).device, amp):
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


def images_per_second(n_images, seconds):
    return f'{n_images} images in {seconds:.1f} s: {n_images / seconds:.2f} images/s'


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
            # NaN as null: strict JSON (the AP of a class absent from a split is undefined)
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in record.items()}
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
    taken = {path.name.lower() for path in out_dir.iterdir()} if out_dir.is_dir() else set()
    return out_dir / unique_name(f'{cfg.dataset}-{time.strftime("%Y%m%d-%H%M%S")}', taken)


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
    cfg = Config.from_kwargs(**{**saved, **given})
    return cfg, state, ckpt.parent


def train(**kwargs):
    """Trains a detector; every option is a Config field (see utils/config.py)."""
    cfg, state, run_dir = open_run(kwargs)
    rank, world_size, device = setup_distributed(cfg)
    main = rank == 0
    seed_all(cfg.seed)
    train_set, val_set, test_set, class_names, cfg.n_val_images, category_ids = run_data(
        cfg, state and state['class_names'])  # config.json records the resolved hold-out
    model = build_model(cfg, len(class_names), load_weights=state is None).to(device)
    vis = Visualizer(cfg.env, cfg.visdom_server, cfg.visdom_port, enabled=cfg.visdom and main)
    trainer = FasterRCNNTrainer(model, cfg, vis, device, rank, world_size)
    start_epoch, best_map = 0, -1.0
    if state is not None:
        trainer.load_state_dict(state)
        start_epoch, best_map = state['epoch'] + 1, state['best_map']
    if main:
        save_config(cfg, run_dir)
        print(f'run folder: {run_dir}; {len(train_set)} training images, {cfg.n_val_images} '
              f'held out for validation, {len(test_set)} test images, classes: '
              f'{", ".join(class_names)}'
              + (f'; resuming after epoch {start_epoch}' if start_epoch else ''))
    log = RunLog(run_dir / 'metrics.jsonl', main, resume_step=trainer.step)
    checkpoint = {'class_names': list(class_names), 'config': cfg.to_dict(),
                  'model_options': model_options(cfg), 'category_ids': category_ids}

    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate_train,
                        num_workers=cfg.num_workers, pin_memory=device.type == 'cuda')
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        try:
            train_epoch(trainer, loader, epoch, log, class_names)
        except NonFiniteLossError as e:
            kept = (f'{run_dir / "last.pt"} (epoch {epoch}) is kept' if epoch else
                    'no checkpoint had been written yet')
            sys.exit(f'error: {e}; training stopped, {kept}')
        if main:
            best_map = end_epoch(trainer, epoch, val_set, best_map, run_dir, log, checkpoint)
        if world_size > 1:
            dist.barrier()  # the others wait while rank 0 evaluates and saves
    if main:
        test_best(model, run_dir, test_set, class_names, cfg, log, trainer.step)
    if world_size > 1:
        dist.destroy_process_group()


def train_epoch(trainer, loader, epoch, log, class_names):
    """One pass over the training images; every plot_every steps, the running means of the
    losses are logged and plotted (rank 0)."""
    cfg, main = trainer.cfg, trainer.rank == 0
    trainer.set_epoch(epoch)
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.epochs}', disable=not main or None)
    for batch in bar:
        trainer.train_step(batch)
        if main and trainer.step % cfg.plot_every == 0:
            means = trainer.pop_means()
            bar.set_postfix(loss=f'{means["total_loss"]:.3f}')
            log.write(step=trainer.step, epoch=epoch,
                      lr=trainer.optimizer.param_groups[0]['lr'], **means)
            trainer.plot(batch, means, class_names)
    trainer.scheduler.step()


def end_epoch(trainer, epoch, val_set, best_map, run_dir, log, checkpoint):
    """Scores the held-out images, writes last.pt and, if this epoch is the best so far,
    best.pt. Returns the best validation mAP. The best epoch is chosen on images held out of
    training, never on the test set; without them, the last epoch is the best."""
    val_map = None
    if val_set is not None:
        cfg = trainer.cfg
        val_map = evaluate(trainer.faster_rcnn, val_set, cfg.batch_size, metric=cfg.metric,
                           num_workers=cfg.num_workers, amp=cfg.amp)['map']
        log.write(step=trainer.step, epoch=epoch, split='val', map=val_map)
        trainer.vis.plot('val_map', val_map, epoch + 1)
        print(f'epoch {epoch + 1}: validation mAP {val_map:.4f}')
    is_best = val_map is None or val_map > best_map
    best_map = val_map if is_best and val_map is not None else best_map
    state = {**trainer.state_dict(), **checkpoint, 'epoch': epoch, 'best_map': best_map}
    save_checkpoint(state, run_dir / 'last.pt')
    if is_best:
        save_checkpoint(state, run_dir / 'best.pt')
    return best_map


def test_best(model, run_dir, test_set, class_names, cfg, log, step):
    """Loads best.pt into the model and prints its per-class AP on the test split."""
    best = load_checkpoint(run_dir / 'best.pt', next(model.parameters()).device)
    model.load_state_dict(best['model'])
    result = evaluate(model, test_set, cfg.batch_size, cfg.test_n_images, cfg.metric,
                      cfg.num_workers, report=True, amp=cfg.amp)
    print(f'test set, best checkpoint (epoch {best["epoch"] + 1}):')
    print_result(result, class_names, cfg.metric)
    log.write(step=step, epoch=best['epoch'], split='test', **{
        k: v for k, v in result.items() if isinstance(v, float)})


def print_result(result, class_names, metric):
    """The per-class table and, for COCO AP, the six COCO numbers."""
    if metric == 'coco':
        print(format_coco_table(result))
        print(format_ap_table(result['ap_per_class'], class_names, result['map']))
    else:
        print(format_ap_table(result['ap'], class_names, result['map']))


def load_model(load_path, device='cpu', **overrides):
    """A trained detector from a checkpoint: (model in eval mode, Config, class names, the COCO
    category id of each class or None).

    overrides: options given on the command line, e.g. --backend or --voc-data-dir. Without
    --amp, the checkpoint's setting, except on a device where mixed precision is slower.
    """
    state = load_checkpoint(load_path, required=('model', 'class_names', 'config'))
    device = pick_device(device)
    if 'amp' not in overrides and not fast_mixed_precision(device):
        overrides['amp'] = False
    cfg = Config.from_kwargs(**{**state['config'], **overrides, 'caffe_pretrain': False,
                                'pretrained_path': None, 'pretrained': None, 'resume': None},
                             need_data=False)
    model, class_names = load_detector(state, device, **model_options(cfg))
    return compiled(model, cfg), cfg, class_names, state.get('category_ids')


def eval(load_path, **kwargs):  # noqa: A001 (the CLI verb)
    """Per-class AP and mAP on the test split (both VOC metrics, or with --metric=coco COCO
    AP): the numbers train ends with."""
    model, cfg, class_names, _ = load_model(load_path, kwargs.pop('device', 'auto'), **kwargs)
    cfg.check_data_dir()
    test = bbox_dataset(cfg, 'test', class_names)
    result = evaluate(model, Subset(test, usable(cfg, test)), cfg.batch_size,
                      cfg.test_n_images, cfg.metric, cfg.num_workers, report=True, amp=cfg.amp)
    if cfg.metric == 'coco':
        return print_result(result, class_names, 'coco')
    print('VOC07 11-point metric:')
    print(format_ap_table(result['ap'], class_names, result['map']))
    print('VOC2010+ area metric:')
    print(format_ap_table(result['ap_area'], class_names, result['map_area']))


def unique_name(name, taken):
    """name, with -2, -3, ... appended until it is not in taken (lower case, for
    case-insensitive filesystems); the result is added to taken."""
    unique, k = name, 1
    while unique.lower() in taken:
        k += 1
        unique = f'{name}-{k}'
    taken.add(unique.lower())
    return unique


class ImageFiles(torch.utils.data.Dataset):
    """detect's input: (path, image or None, error message or None) per file, read and checked
    in DataLoader workers."""

    def __init__(self, paths, limits):
        self.paths, self.limits = paths, limits

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            image = read_image(path)
            problem = size_problem(image.shape[1:], *self.limits)
            if problem is not None:
                raise DataError(f'{path}: the image {problem}')
        except DataError as e:
            return path, None, str(e)
        return path, image, None


def detect(load_path, *images, out_dir='detections', preset='visualize', device='auto',
           batch_size=1, num_workers=2, amp=None):
    """Draws detected boxes on each image, at the image's own size, into out_dir/<name>.png
    and writes every detection to out_dir/detections.json.

    batch_size images are predicted together (more keeps a GPU busier; padding the smaller
    ones of a batch moves their scores slightly), num_workers processes read them meanwhile;
    amp: predict under mixed precision (default: as the checkpoint was trained, where the
    device runs it faster).
    An image that cannot be read or used is reported, recorded with its error, and skipped;
    the others are processed, and the command then fails naming how many were skipped.
    """
    if not images:
        raise ValueError('detect needs at least one image path')
    for name, value, least in (('--batch-size', batch_size, 1),
                               ('--num-workers', num_workers, 0)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f'{name}={value!r} must be a whole number >= {least}')
    model, cfg, class_names, category_ids = load_model(
        load_path, device, **({} if amp is None else {'amp': amp}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, taken = [], set()
    loader = DataLoader(ImageFiles(images, size_limits(cfg)), batch_size=batch_size,
                        num_workers=min(num_workers, len(images)), collate_fn=list)
    start = time.perf_counter()
    with (tqdm(total=len(images), desc='detect', disable=None) as bar,
          mixed_precision(next(model.parameters()).device, cfg.amp)):
        for batch in loader:
            good = [i for i, (_, _, error) in enumerate(batch) if error is None]
            found = dict(zip(good, zip(*model.predict([batch[i][1] for i in good],
                                                      preset=preset)))) if good else {}
            for i, (path, image, error) in enumerate(batch):
                if error is not None:
                    print(f'skipping {error}', file=sys.stderr)
                    records.append({'image': str(path), 'error': error})
                    continue
                bboxes, labels, scores = (x.cpu() for x in found[i])
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


COMMANDS = {'train': train, 'eval': eval, 'detect': detect}


def keep_freed_memory():
    """Has glibc's malloc keep freed memory for the next allocation instead of handing it
    back to the OS. By default it maps every block over 32 MB fresh and unmaps it when freed,
    so each forward pass page-faults its large activations in again: 10% of VGG16's conv time
    at 600x800 on our 2-core CPU (1475 -> 1322 ms fp32, 742 -> 664 ms bf16), with the same
    peak memory. Blocks up to 1 GB are kept. A no-op without glibc (macOS, Windows)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def main(argv=None):
    """The command line. An error a user can cause (a bad option, path, data or checkpoint)
    ends the command with one line naming it; --debug shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = '--debug' in argv
    argv = [arg for arg in argv if arg != '--debug']
    keep_freed_memory()
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
