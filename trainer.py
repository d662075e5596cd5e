"""A training run around the model: the data of the run, the optimiser and its lr schedule,
mixed precision, data parallelism, the sampling generator, running means of the losses, plots,
validation, checkpoints, and the test of the best one.

The maths of a training step (targets, the four losses) is the model's: FasterRCNN.forward
with ground truth returns the losses (model/faster_rcnn.py). Everything here takes the run's
Config (utils/config.py) as an argument; train.py builds it.

Under torchrun each process trains on its own shard of the images and DDP averages the
gradients. Rank 0 alone logs, plots, writes the run folder and evaluates, while the others wait
at a barrier: the validation set is small and mAP needs all predictions in one place.
"""
import dataclasses
import os
import random
import warnings

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from data.dataset import TrainDataset, build_bbox_dataset, collate_train, usable_indices
from data.util import DataError
from model.backbones import FEAT_STRIDE
from model.faster_rcnn import LOSS_NAMES, build_faster_rcnn
from model.ops.speed import mixed_precision, speed_up
from model.transform import denormalize
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.evaluate import evaluate, format_result
from utils.run import RunLog, save_config
from utils.vis_tool import Visualizer, bbox_image


class NonFiniteLossError(RuntimeError):
    """A training step's loss is NaN or infinite (train_step names the step and the losses)."""


def make_optimizer(model, name, lr, momentum, weight_decay, double_bias=True):
    """SGD (or Adam) with the Caffe solver's groups: biases without weight decay and, with
    double_bias (the VGG16 models' setting), at 2x lr.

    The update runs fused (one kernel over all parameters: on a 2-core CPU, VGG16's SGD step
    takes about 80 ms instead of 700) where torch has a fused kernel for the parameters' device,
    else with torch's multi-tensor (foreach) kernels.
    """
    trainable = [(param_name, p) for param_name, p in model.named_parameters() if p.requires_grad]
    weights = [p for param_name, p in trainable if not param_name.endswith('bias')]
    biases = [p for param_name, p in trainable if param_name.endswith('bias')]
    groups = [{'params': weights, 'weight_decay': weight_decay},
              {'params': biases, 'lr': (1 + double_bias) * lr, 'weight_decay': 0.0}]
    optimizer, options = ((torch.optim.Adam, {}) if name == 'adam' else
                          (torch.optim.SGD, {'momentum': momentum}))
    try:
        return optimizer(groups, lr=lr, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device or dtype
        return optimizer(groups, lr=lr, foreach=True, **options)


def seed_all(seed):
    """Seeds the global RNGs (Python, NumPy, torch on every device): the initial weights.

    Everything random after that draws from generators of its own, seeded from (seed, epoch,
    ...): target sampling (FasterRCNNTrainer.generator), flips (TrainDataset), the shuffle
    (DistributedSampler). So a checkpoint needs no RNG state for an exact resume."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name, local_rank=0):
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device=cuda but no CUDA device is visible; use --device=cpu or auto')
    use_cuda = name != 'cpu' and torch.cuda.is_available()
    return torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')


def build_model(cfg, n_fg_class, load_weights=True):
    """The detector a Config describes, for ``n_fg_class`` foreground classes, set up to run
    fast on this machine (model.ops.speed; --compile compiles its extractor).

    ``load_weights=False`` starts from random weights (a checkpoint will replace them).
    """
    weights = cfg.caffe_pretrain_path if cfg.caffe_pretrain else cfg.pretrained_path
    if weights is not None and load_weights and not os.path.isfile(weights):
        hint = ' (make it with misc/convert_caffe_pretrain.py)' if cfg.caffe_pretrain else ''
        raise ValueError(f'no {cfg.extractor} weights at {weights}{hint}')
    weights = (weights or cfg.pretrained) if load_weights else None
    try:
        model = build_faster_rcnn(n_fg_class, cfg.model_options(), weights)
    except OSError as e:  # offline: the download of --pretrained=imagenet
        if weights != 'imagenet':
            raise
        raise ValueError(f'--pretrained=imagenet: {e}; or download the file elsewhere and '
                         'give it with --pretrained-path') from e
    return run_fast(model, cfg.compile)


def run_fast(model, compile_extractor=False):
    """The speed switch on, and with compile_extractor the extractor compiled (in place: the
    state dict keeps its keys; the RPN and head have data-dependent shapes and stay eager)."""
    if compile_extractor:
        model.extractor.compile()
    return speed_up(model)


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


def usable_test_set(cfg, test):
    """The test split's images the detector can use; a warning counts those skipped (bad
    files with --skip-bad, and sizes the detector cannot use)."""
    test_set = Subset(test, usable_indices(test, *size_limits(cfg), cfg.skip_bad))
    skipped = len(getattr(test, 'skipped', ())) + len(test) - len(test_set)
    if skipped:
        warnings.warn(f'{skipped} test images skipped (see above): the test mAP leaves them '
                      'out', stacklevel=2)
    return test_set


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
    kept = usable_indices(trainval, *size_limits(cfg), cfg.skip_bad)  # the detector can use
    n_val = cfg.n_val(len(kept))
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    val_idx = sorted(kept[k] for k in order[:n_val])  # held out of training, fixed by the seed
    train_idx = sorted(kept[k] for k in order[n_val:])
    source = {'coco': cfg.coco_json, 'coco2017': cfg.coco_dir}.get(cfg.dataset, cfg.voc_data_dir)
    if not train_idx:
        raise DataError(f'{source or cfg.dataset}: no usable training images '
                        f'(the trainval split has {len(trainval)}, {len(kept)} usable)')
    if not any(len(trainval.get_annotation(i)[1]) for i in train_idx):
        raise DataError(f'{source or cfg.dataset}: the training split has no objects, so '
                        'there is nothing to learn; annotate some, or check --class-names')
    n_val_objects = sum(int((~trainval.get_annotation(i)[2]).sum()) for i in val_idx)
    if val_idx and not n_val_objects:
        warnings.warn(f'the {len(val_idx)} images held out for validation contain no objects, '
                      'so their mAP is undefined; best.pt will be the last epoch', stacklevel=2)
    train_set = TrainDataset(Subset(trainval, train_idx), cfg.min_size, cfg.max_size,
                             cfg.normalization, seed=cfg.seed, use_difficult=cfg.use_difficult)
    val_set = Subset(trainval, val_idx) if n_val_objects else None
    test_set = usable_test_set(cfg, test)
    return train_set, val_set, test_set, class_names, n_val, getattr(trainval, 'category_ids', None)


def setup_distributed(cfg):
    """rank, world size and device; torchrun's environment starts a process group."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    device = pick_device(cfg.device, int(os.environ.get('LOCAL_RANK', 0)))
    if world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return (dist.get_rank() if world_size > 1 else 0), world_size, device


def train(cfg, run_dir, state=None):
    """Trains the detector cfg describes, writing run_dir; state: the checkpoint to resume."""
    rank, world_size, device = setup_distributed(cfg)
    main = rank == 0
    seed_all(cfg.seed)
    train_set, val_set, test_set, class_names, cfg.n_val_images, category_ids = run_data(
        cfg, state and state['class_names'])  # config.json records the resolved hold-out
    model = build_model(cfg, len(class_names), load_weights=state is None).to(device)
    vis = Visualizer(cfg.env, cfg.visdom_server, cfg.visdom_port, enabled=cfg.visdom and main)
    trainer = FasterRCNNTrainer(model, cfg, vis, device, rank, world_size)
    if state is not None:
        trainer.load_state_dict(state)
    start_epoch, best_map = (state['epoch'] + 1, state['best_map']) if state else (0, -1.0)
    if main:
        save_config(cfg.to_dict(), run_dir)
        print(f'run folder: {run_dir}; {len(train_set)} training images, {cfg.n_val_images} held '
              f'out for validation, {len(test_set)} test images, classes: {", ".join(class_names)}'
              + (f'; resuming after epoch {start_epoch}' if start_epoch else ''))
    log = RunLog(run_dir / 'metrics.jsonl', main, resume_step=trainer.step)
    checkpoint = {'class_names': list(class_names), 'config': cfg.to_dict(), 'category_ids':
                  category_ids, 'model_options': dataclasses.asdict(cfg.model_options())}

    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate_train,
                        num_workers=cfg.num_workers, pin_memory=device.type == 'cuda')
    for epoch in range(start_epoch, cfg.epochs):
        for seeded in (sampler, train_set, trainer):  # the shuffle, the flips, target sampling
            seeded.set_epoch(epoch)
        try:
            trainer.train_epoch(loader, epoch, log, class_names)
        except NonFiniteLossError as e:
            kept = (f'{run_dir / "last.pt"} (epoch {epoch}) is kept' if epoch else
                    'no checkpoint had been written yet')
            raise SystemExit(f'error: {e}; training stopped, {kept}') from e
        if main:
            best_map = trainer.end_epoch(epoch, val_set, best_map, run_dir, log, checkpoint)
        if world_size > 1:
            dist.barrier()  # the others wait while rank 0 evaluates and saves
    if main:
        test_best(model, run_dir, test_set, class_names, cfg, log, trainer.step)
    if world_size > 1:
        dist.destroy_process_group()


def test_best(model, run_dir, test_set, class_names, cfg, log, step):
    """Loads best.pt into the model and prints its per-class AP on the test split."""
    best = load_checkpoint(run_dir / 'best.pt')
    model.load_state_dict(best['model'])
    result = evaluate(model, test_set, cfg.batch_size, cfg.test_n_images, cfg.metric,
                      cfg.num_workers, report=True, amp=cfg.amp)
    print(f'test set, best checkpoint (epoch {best["epoch"] + 1}):')
    print(format_result(result, class_names, cfg.metric))
    log.write(step=step, epoch=best['epoch'], split='test', **{
        k: v for k, v in result.items() if isinstance(v, float)})


class FasterRCNNTrainer:
    """Owns the training step: losses, optimiser, lr schedule, AMP, running means, plots.

    Args:
        faster_rcnn: the model; cfg: the run's Config; vis: a utils.vis_tool.Visualizer or None;
        device: where the model lives; rank, world_size: the process's place in the job.
    """

    def __init__(self, faster_rcnn, cfg, vis=None, device='cpu', rank=0, world_size=1):
        self.faster_rcnn, self.cfg, self.vis, self.rank = faster_rcnn, cfg, vis, rank
        self.device = device = torch.device(device)
        # with ground truth, the model returns its losses
        self.forward = faster_rcnn if world_size == 1 else nn.parallel.DistributedDataParallel(
            faster_rcnn, device_ids=[device.index] if device.type == 'cuda' else None)
        # the weights' lr before any decay: --lr, times the total batch with linear scaling
        lr = cfg.lr * (cfg.batch_size * world_size if cfg.lr_scaling == 'linear' else 1)
        self.optimizer = make_optimizer(faster_rcnn, cfg.optimizer, lr, cfg.momentum,
                                        cfg.weight_decay, cfg.double_bias)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, list(cfg.lr_milestones), cfg.lr_decay)
        # float16 needs loss scaling; bfloat16 (the CPU choice) has float32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == 'cuda')
        self.generator = torch.Generator(device=device)
        self.set_epoch(0)
        self.step = 0
        self.meter_sums, self.meter_count = dict.fromkeys(LOSS_NAMES + ('total_loss',), 0.0), 0

    def set_epoch(self, epoch):
        """Reseeds target sampling from (seed, rank, epoch): a resumed run samples the same."""
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + self.rank * 10_007 + epoch)

    def pop_means(self):
        """Running means of the losses since the last call (the one host sync of logging)."""
        means = {k: float(v) / max(self.meter_count, 1) for k, v in self.meter_sums.items()}
        self.meter_sums, self.meter_count = dict.fromkeys(means, 0.0), 0
        return means

    def train_step(self, batch):
        """One optimiser step on a collated batch (data.dataset.collate_train)."""
        images = batch['images'].to(self.device, non_blocking=True)
        bboxes, labels = ([t.to(self.device) for t in batch[key]] for key in ('bboxes', 'labels'))
        sizes, scales = [tuple(s) for s in batch['sizes'].tolist()], batch['scales'].tolist()
        self.optimizer.zero_grad(set_to_none=True)
        with mixed_precision(self.device, self.cfg.amp):
            losses = self.forward(images, sizes, scales, bboxes, labels, self.generator)
        if not torch.isfinite(losses['total_loss']):
            values = ', '.join(f'{k}={float(losses[k].detach()):.4g}' for k in LOSS_NAMES)
            raise NonFiniteLossError(f'non-finite loss at step {self.step + 1}: {values}')
        self.scaler.scale(losses['total_loss']).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.meter_sums = {k: v + losses[k].detach() for k, v in self.meter_sums.items()}
        self.meter_count += 1
        return losses

    def train_epoch(self, loader, epoch, log, class_names):
        """One pass over the training images (call set_epoch first); every plot_every steps, the
        running means of the losses are logged and plotted (rank 0)."""
        cfg, main = self.cfg, self.rank == 0
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.epochs}', disable=not main or None)
        for batch in bar:
            self.train_step(batch)
            if main and self.step % cfg.plot_every == 0:
                means = self.pop_means()
                bar.set_postfix(loss=f'{means["total_loss"]:.3f}')
                log.write(step=self.step, epoch=epoch,
                          lr=self.optimizer.param_groups[0]['lr'], **means)
                self.plot(batch, means, class_names)
        self.scheduler.step()

    def end_epoch(self, epoch, val_set, best_map, run_dir, log, checkpoint):
        """Scores the held-out images, writes last.pt and, if this epoch is the best so far,
        best.pt. Returns the best validation mAP. The best epoch is chosen on images held out
        of training, never on the test set; without them, the last epoch is the best."""
        is_best = val_set is None  # then the last epoch is the best
        if val_set is not None:
            cfg = self.cfg
            val_map = evaluate(self.faster_rcnn, val_set, cfg.batch_size, metric=cfg.metric,
                               num_workers=cfg.num_workers, amp=cfg.amp)['map']
            log.write(step=self.step, epoch=epoch, split='val', map=val_map)
            self.vis.plot('val_map', val_map, epoch + 1)
            print(f'epoch {epoch + 1}: validation mAP {val_map:.4f}')
            is_best, best_map = val_map > best_map, max(best_map, val_map)
        state = {**self.state_dict(), **checkpoint, 'epoch': epoch, 'best_map': best_map}
        save_checkpoint(state, run_dir / 'last.pt')
        if is_best:
            save_checkpoint(state, run_dir / 'best.pt')
        return best_map

    def plot(self, batch, means, class_names):
        """Loss curves, and the batch's first image with its ground truth and predictions."""
        if self.vis is None or not self.vis.connected:
            return
        for name, mean in means.items():
            self.vis.plot(name, mean, self.step)
        h, w = batch['sizes'][0].tolist()
        image = denormalize(batch['images'][0][:, :h, :w], self.faster_rcnn.transform.normalization)
        truth = batch['bboxes'][0], batch['labels'][0], None
        predicted = [out[0].cpu() for out in self.faster_rcnn.predict([image], preset='visualize')]
        for name, (bbox, label, score) in (('ground truth', truth), ('prediction', predicted)):
            self.vis.img(name, bbox_image(image, bbox, label, score, class_names))

    def state_dict(self):
        return {'model': self.faster_rcnn.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(), 'scaler': self.scaler.state_dict(),
                'step': self.step}

    def load_state_dict(self, state):
        """Restores a checkpoint's weights, momentum buffers, gradient scale and step. The
        solver options (lr, its schedule, momentum, weight decay) are the Config's, so that
        options given with --resume take effect: the lr schedule is replayed from them, which
        gives back bit-identical lrs where they did not change."""
        self.faster_rcnn.load_state_dict(state['model'])
        options = [dict(group) for group in self.optimizer.param_groups]  # the Config's
        self.optimizer.load_state_dict(state['optimizer'])
        for group, own in zip(self.optimizer.param_groups, options, strict=True):
            group.update(own)
        # steps of the schedule with no optimizer step between them: torch warns
        with warnings.catch_warnings(action='ignore', category=UserWarning):
            for _ in range(state['scheduler']['last_epoch']):
                self.scheduler.step()
        if state['scaler'] and self.scaler.is_enabled():  # empty when saved without float16
            self.scaler.load_state_dict(state['scaler'])
        self.step = state['step']
