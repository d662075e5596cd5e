"""The training loop around the model: optimiser, lr schedule, mixed precision, data
parallelism, the sampling generator, running means of the losses and plots.

The maths of a training step (targets, the four losses) is the model's: FasterRCNN.forward
with ground truth returns the losses (model/faster_rcnn.py).
"""
import functools
import random
import warnings

import numpy as np
import torch
from torch import nn

from model.faster_rcnn import LOSS_NAMES
from model.transform import denormalize
from utils.vis_tool import bbox_image


class NonFiniteLossError(RuntimeError):
    pass


def make_optimizer(model, name, lr, momentum, weight_decay, double_bias=True):
    """SGD (or Adam) with the Caffe solver's groups: biases without weight decay and, with
    double_bias (the VGG16 models' setting), at 2x lr.

    The update runs fused (one kernel over all parameters: on a 2-core CPU, VGG16's SGD step
    takes about 80 ms instead of 700) where torch has a fused kernel for the parameters' device,
    else with torch's multi-tensor (foreach) kernels.
    """
    weights, biases = [], []
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            (biases if param_name.endswith('bias') else weights).append(p)
    groups = [{'params': weights, 'weight_decay': weight_decay},
              {'params': biases, 'lr': (1 + double_bias) * lr, 'weight_decay': 0.0}]
    optimizer, options = ((torch.optim.Adam, {}) if name == 'adam' else
                          (torch.optim.SGD, {'momentum': momentum}))
    try:
        return optimizer(groups, lr=lr, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device or dtype
        return optimizer(groups, lr=lr, foreach=True, **options)


def fast_mixed_precision(device):
    """Whether --amp makes this device faster: CUDA, or a CPU whose oneDNN computes in bfloat16
    (AVX-512 or AMX). Elsewhere bfloat16 is emulated: on a 2-core AVX2 CPU VGG16's convs took
    23.5 s under --amp against 2.4 s in float32."""
    return torch.device(device).type != 'cpu' or cpu_computes_bfloat16()


@functools.cache  # asked at every training step under --amp; the CPU does not change
def cpu_computes_bfloat16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # no such op in this torch build: assume it is fast
        return True


def mixed_precision(device, enabled):
    """--amp's autocast: float16 on CUDA (with the trainer's gradient scaler), bfloat16
    elsewhere (float32's range: no scaler needed). Warns where that is slower than float32.

    Around a whole evaluation, each weight is cast once rather than once per image: autocast
    keeps its casts until the context closes (VGG16's fc6 alone takes 68 ms to cast on our CPU).
    """
    device = torch.device(device)
    if enabled and not fast_mixed_precision(device):
        warnings.warn('--amp on a CPU without bfloat16 instructions (AVX-512 or AMX) runs '
                      'emulated, several times slower than float32: use --amp=false', stacklevel=2)
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def seed_all(seed):
    """Seeds the global RNGs (Python, NumPy, torch on every device): the initial weights.

    Everything random after that draws from generators of its own, seeded from (seed, epoch,
    ...): target sampling (FasterRCNNTrainer.generator), flips (TrainDataset), the shuffle
    (DistributedSampler). So a checkpoint needs no RNG state for an exact resume."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class FasterRCNNTrainer:
    """Owns the training step: losses, optimiser, lr schedule, AMP, running means, plots.

    Args:
        faster_rcnn: the model; cfg: the run's Config; vis: a utils.vis_tool.Visualizer or None;
        device: where the model lives; rank, world_size: the process's place in the job.
    """

    def __init__(self, faster_rcnn, cfg, vis=None, device='cpu', rank=0, world_size=1):
        device = torch.device(device)
        self.faster_rcnn, self.cfg, self.vis, self.device = faster_rcnn, cfg, vis, device
        self.forward = faster_rcnn  # with ground truth, the model returns its losses
        if world_size > 1:
            self.forward = nn.parallel.DistributedDataParallel(
                faster_rcnn, device_ids=[device.index] if device.type == 'cuda' else None)
        self.seed, self.rank, self.world_size = cfg.seed, rank, world_size
        self.optimizer = make_optimizer(faster_rcnn, cfg.optimizer, self.base_lr(), cfg.momentum,
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
        self.generator.manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + epoch)

    def base_lr(self):
        """The weights' lr before any decay: --lr, times the total batch with linear scaling."""
        scale = self.cfg.batch_size * self.world_size if self.cfg.lr_scaling == 'linear' else 1
        return self.cfg.lr * scale

    def apply_options(self):
        """Puts the Config's solver options (lr, its schedule, momentum, weight decay) into the
        loaded optimizer and scheduler, so that options given with --resume take effect.

        The lr is recomputed the way MultiStepLR reached it, milestone by milestone, so an
        unchanged option gives back bit-identical values.
        """
        cfg, scheduler = self.cfg, self.scheduler
        scheduler.milestones = type(scheduler.milestones)(cfg.lr_milestones)
        scheduler.gamma = cfg.lr_decay
        # make_optimizer's groups: weights, then biases
        scheduler.base_lrs = [self.base_lr(), (1 + cfg.double_bias) * self.base_lr()]
        passed = [m for m in sorted(scheduler.milestones) if m <= scheduler.last_epoch]
        for group, base_lr, decay in zip(self.optimizer.param_groups, scheduler.base_lrs,
                                         (cfg.weight_decay, 0.0), strict=True):
            lr = base_lr
            for milestone in passed:
                lr = lr * cfg.lr_decay ** scheduler.milestones[milestone]
            group.update(initial_lr=base_lr, lr=lr, weight_decay=decay)
            if cfg.optimizer == 'sgd':
                group['momentum'] = cfg.momentum
        scheduler._last_lr = [group['lr'] for group in self.optimizer.param_groups]

    def pop_means(self):
        """Running means of the losses since the last call (the one host sync of logging)."""
        means = {k: float(v) / max(self.meter_count, 1) for k, v in self.meter_sums.items()}
        self.meter_sums, self.meter_count = dict.fromkeys(means, 0.0), 0
        return means

    def train_step(self, batch):
        """One optimiser step on a collated batch (data.dataset.collate_train)."""
        sizes = [tuple(s) for s in batch['sizes'].tolist()]
        images = batch['images'].to(self.device, non_blocking=True)
        bboxes = [b.to(self.device) for b in batch['bboxes']]
        labels = [lab.to(self.device) for lab in batch['labels']]
        scales = batch['scales'].tolist()
        self.optimizer.zero_grad(set_to_none=True)
        with mixed_precision(self.device, self.cfg.amp):
            losses = self.forward(images, sizes, scales, bboxes, labels, self.generator)
        total = losses['total_loss']
        if not torch.isfinite(total):
            values = ', '.join(f'{k}={float(losses[k].detach()):.4g}' for k in LOSS_NAMES)
            raise NonFiniteLossError(f'non-finite loss at step {self.step + 1}: {values}')
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        for k in self.meter_sums:
            self.meter_sums[k] = self.meter_sums[k] + losses[k].detach()
        self.meter_count += 1
        return losses

    def plot(self, batch, means, class_names):
        """Loss curves, and the batch's first image with its ground truth and predictions."""
        if self.vis is None or not self.vis.connected:
            return
        for name, mean in means.items():
            self.vis.plot(name, mean, self.step)
        h, w = batch['sizes'][0].tolist()
        model = self.faster_rcnn
        image = denormalize(batch['images'][0][:, :h, :w], model.transform.normalization)
        self.vis.img('ground truth', bbox_image(image, batch['bboxes'][0], batch['labels'][0],
                                                None, class_names))
        bboxes, labels, scores = model.predict([image], preset='visualize')
        self.vis.img('prediction', bbox_image(image, bboxes[0].cpu(), labels[0].cpu(),
                                              scores[0].cpu(), class_names))

    def state_dict(self):
        return {'model': self.faster_rcnn.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(), 'scaler': self.scaler.state_dict(),
                'step': self.step}

    def load_state_dict(self, state):
        self.faster_rcnn.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if state['scaler'] and self.scaler.is_enabled():  # empty when saved without float16
            self.scaler.load_state_dict(state['scaler'])
        self.step = state['step']
        self.apply_options()
