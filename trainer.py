"""Training Faster R-CNN: the four losses, one step, running means, checkpoints and plots.

Shape shorthand: N images, K anchors, S sampled RoIs, C classes with background.
"""
import errno
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from data.util import denormalize
from model.utils.creator_tool import AnchorTargetCreator, ProposalTargetCreator
from utils.vis_tool import bbox_image

LOSS_NAMES = ('rpn_loc_loss', 'rpn_cls_loss', 'roi_loc_loss', 'roi_cls_loss')


class NonFiniteLossError(RuntimeError):
    pass


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message names the file and why."""


def smooth_l1_loss(pred, target, label, sigma):
    """Smooth L1 on positive samples (label > 0), summed and divided by the non-ignored ones.

    pred, target: (S, 4); label: (S,) with -1 ignored, 0 negative, > 0 positive. The division
    by all non-ignored samples, not only positives, is the original Caffe implementation's.
    """
    sigma2 = sigma ** 2
    diff = (pred.float() - target) * (label > 0)[:, None]
    abs_diff = diff.abs()
    quadratic = abs_diff < 1 / sigma2
    loss = torch.where(quadratic, 0.5 * sigma2 * diff ** 2, abs_diff - 0.5 / sigma2)
    return loss.sum() / (label >= 0).sum().clamp(min=1)


def check_targets(bboxes, labels, img_sizes, n_fg_class):
    """Raises a clear error for ground truth that cannot be right; runs on the host copies."""
    for i, (bbox, label, (h, w)) in enumerate(zip(bboxes, labels, img_sizes)):
        if len(bbox) != len(label):
            raise ValueError(f'image {i}: {len(bbox)} boxes but {len(label)} labels')
        bad = ((bbox[:, 2] <= bbox[:, 0]) | (bbox[:, 3] <= bbox[:, 1]) | (bbox[:, :2] < 0).any(1)
               | (bbox[:, 2] > w) | (bbox[:, 3] > h))
        if bad.any():
            raise ValueError(f'image {i}: box {bbox[bad][0].tolist()} is empty or outside the '
                             f'{w}x{h} image (boxes are x_min, y_min, x_max, y_max)')
        if ((label < 0) | (label >= n_fg_class)).any():
            raise ValueError(f'image {i}: labels must be in 0..{n_fg_class - 1}, got '
                             f'{label.tolist()}')


class FasterRCNNWithLosses(nn.Module):
    """The detector, its training targets and its four losses as one module.

    Being one module lets DistributedDataParallel wrap the whole training forward.
    """

    def __init__(self, faster_rcnn, anchor_target_creator=None, proposal_target_creator=None,
                 rpn_sigma=3.0, roi_sigma=1.0):
        super().__init__()
        self.faster_rcnn = faster_rcnn
        self.anchor_target_creator = anchor_target_creator or AnchorTargetCreator()
        self.proposal_target_creator = proposal_target_creator or ProposalTargetCreator()
        self.rpn_sigma, self.roi_sigma = rpn_sigma, roi_sigma

    def forward(self, images, img_sizes, scales, bboxes, labels, generator=None):
        """Losses for one batch.

        Args:
            images: (N, 3, H, W) normalised, padded; img_sizes: N (height, width); scales: N.
            bboxes, labels: N tensors (R_i, 4) and (R_i,), labels in 0..n_fg-1, on the device.
            generator: drives the target creators' sampling.

        Returns a dict of the four losses (float32 scalars) and their sum under 'total_loss'.
        """
        model = self.faster_rcnn
        features = model.extractor(images)
        rpn_locs, rpn_scores, rois, roi_indices, anchor = model.rpn(features, img_sizes, scales)

        gt_rpn_locs, gt_rpn_labels, sample_rois, sample_indices, gt_roi_locs, gt_roi_labels = (
            [], [], [], [], [], [])
        for i, (bbox, label) in enumerate(zip(bboxes, labels)):
            loc, lab = self.anchor_target_creator(bbox, anchor, img_sizes[i], generator)
            gt_rpn_locs.append(loc)
            gt_rpn_labels.append(lab)
            roi, roi_loc, roi_label = self.proposal_target_creator(
                rois[roi_indices == i], bbox, label, generator)
            sample_rois.append(roi)
            sample_indices.append(torch.full_like(roi_label, i))
            gt_roi_locs.append(roi_loc)
            gt_roi_labels.append(roi_label)
        roi_cls_loc, roi_score = model.head(features, torch.cat(sample_rois),
                                            torch.cat(sample_indices))

        gt_rpn_label = torch.cat(gt_rpn_labels)  # (N*K,)
        gt_roi_label = torch.cat(gt_roi_labels)  # (S,)
        n_sample = len(gt_roi_label)
        roi_loc = roi_cls_loc.view(n_sample, -1, 4)[torch.arange(n_sample), gt_roi_label]  # (S, 4)
        losses = {
            'rpn_loc_loss': smooth_l1_loss(rpn_locs.reshape(-1, 4), torch.cat(gt_rpn_locs),
                                           gt_rpn_label, self.rpn_sigma),
            'rpn_cls_loss': F.cross_entropy(rpn_scores.reshape(-1, 2).float(), gt_rpn_label,
                                            ignore_index=-1),
            'roi_loc_loss': smooth_l1_loss(roi_loc, torch.cat(gt_roi_locs), gt_roi_label,
                                           self.roi_sigma),
            'roi_cls_loss': F.cross_entropy(roi_score.float(), gt_roi_label),
        }
        losses['total_loss'] = sum(losses.values())
        return losses


def make_optimizer(model, name, lr, momentum, weight_decay):
    """SGD (or Adam) with the Caffe solver's groups: biases at 2x lr and without weight decay."""
    weights, biases = [], []
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            (biases if param_name.endswith('bias') else weights).append(p)
    groups = [{'params': weights, 'weight_decay': weight_decay},
              {'params': biases, 'lr': 2 * lr, 'weight_decay': 0.0}]
    if name == 'adam':
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def rng_state():
    """Every RNG state a run touches, as checkpoint-safe values (tensors and plain types)."""
    np_state = np.random.get_state()
    return {'python': random.getstate(),
            'numpy': [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def seed_all(seed):
    """Seeds every RNG a run touches (Python, NumPy, torch on every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state):
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state['python']))
    np_state = state['numpy']
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        # One state per GPU the saving process saw; a resume may see fewer.
        torch.cuda.set_rng_state_all(state['cuda'][:torch.cuda.device_count()])


def save_checkpoint(state, path):
    """Writes to a temporary file and renames it: a kill mid-save leaves the old file intact.

    A failed write (disk full, no permission) removes the temporary file and raises
    CheckpointError naming the path and the reason.
    """
    tmp = Path(f'{path}.tmp')
    try:
        # Through a Python file object, a full disk is OSError(ENOSPC), not a bare C++ assert.
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise  # e.g. KeyboardInterrupt: the old checkpoint is intact, nothing to explain
        reason = 'no space left on device' if getattr(e, 'errno', None) == errno.ENOSPC else e
        raise CheckpointError(f'cannot write checkpoint {path}: {reason}') from e


def load_checkpoint(path, map_location='cpu'):
    """Loads a checkpoint as data (weights_only: a checkpoint can never run code)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint at {path}')
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file: say which file
        raise CheckpointError(f'{path} is not a readable checkpoint '
                              f'({type(e).__name__}: {e})') from e
    missing = {'model', 'config', 'class_names'} - set(state) if isinstance(state, dict) else {
        'model'}
    if missing:
        raise CheckpointError(f'{path} is not a frcnn checkpoint: it has no {sorted(missing)}')
    return state


class FasterRCNNTrainer:
    """Owns the training step: losses, optimiser, lr schedule, AMP, running means, plots.

    Args:
        faster_rcnn: the model; cfg: the run's Config; vis: a utils.vis_tool.Visualizer or None;
        device: where the model lives; rank, world_size: the process's place in the job.
    """

    def __init__(self, faster_rcnn, cfg, vis=None, device='cpu', rank=0, world_size=1):
        device = torch.device(device)
        self.faster_rcnn, self.cfg, self.vis, self.device = faster_rcnn, cfg, vis, device
        self.net = FasterRCNNWithLosses(
            faster_rcnn,
            AnchorTargetCreator(cfg.rpn_n_sample, cfg.rpn_pos_iou_thresh, cfg.rpn_neg_iou_thresh,
                                cfg.rpn_pos_ratio),
            ProposalTargetCreator(cfg.roi_n_sample, cfg.roi_pos_ratio, cfg.roi_pos_iou_thresh,
                                  cfg.roi_neg_iou_thresh_hi, cfg.roi_neg_iou_thresh_lo,
                                  # the std predict decodes with: one value for both sides
                                  tuple(faster_rcnn.loc_normalize_std.tolist())),
            cfg.rpn_sigma, cfg.roi_sigma)
        self.forward = self.net
        if world_size > 1:
            self.forward = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == 'cuda' else None)
        self.world_size = world_size
        self.optimizer = make_optimizer(faster_rcnn, cfg.optimizer, self.base_lr(), cfg.momentum,
                                        cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, list(cfg.lr_milestones), cfg.lr_decay)
        # float16 needs loss scaling; bfloat16 (the CPU choice) has float32's range and does not.
        self.amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == 'cuda')
        self.seed, self.rank = cfg.seed, rank
        self.generator = torch.Generator(device=device)
        self.set_epoch(0)
        self.step = 0
        self.reset_meters()

    def set_epoch(self, epoch):
        """Reseeds target sampling from (seed, rank, epoch): a resumed run samples the same."""
        self.generator.manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + epoch)

    def base_lr(self):
        """The weights' lr before any decay: --lr, times the total batch with linear scaling."""
        scale = self.cfg.batch_size * self.world_size if self.cfg.lr_scaling == 'linear' else 1
        return self.cfg.lr * scale

    def lr(self):
        return self.optimizer.param_groups[0]['lr']

    def apply_options(self):
        """Puts the Config's solver options (lr, its schedule, momentum, weight decay) into the
        loaded optimizer and scheduler, so that options given with --resume take effect.

        The lr is recomputed the way MultiStepLR reached it, milestone by milestone, so an
        unchanged option gives back bit-identical values.
        """
        cfg, scheduler = self.cfg, self.scheduler
        scheduler.milestones = type(scheduler.milestones)(cfg.lr_milestones)
        scheduler.gamma = cfg.lr_decay
        scheduler.base_lrs = [self.base_lr(), 2 * self.base_lr()]  # make_optimizer's groups
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

    def reset_meters(self):
        self.meter_sums = dict.fromkeys(LOSS_NAMES + ('total_loss',), 0.0)
        self.meter_count = 0

    def meters(self):
        """Running means of the losses since the last reset (the one host sync of logging)."""
        return {k: float(v) / max(self.meter_count, 1) for k, v in self.meter_sums.items()}

    def train_step(self, batch):
        """One optimiser step on a collated batch (data.dataset.collate_train)."""
        sizes = [tuple(s) for s in batch['sizes'].tolist()]
        check_targets(batch['bboxes'], batch['labels'], sizes, self.faster_rcnn.n_class - 1)
        images = batch['images'].to(self.device, non_blocking=True)
        bboxes = [b.to(self.device) for b in batch['bboxes']]
        labels = [lab.to(self.device) for lab in batch['labels']]
        scales = batch['scales'].tolist()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp):
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
        self.vis.plot_many(means, self.step)
        h, w = batch['sizes'][0].tolist()
        model = self.faster_rcnn
        image = denormalize(batch['images'][0][:, :h, :w], model.normalization)
        self.vis.img('ground truth', bbox_image(image, batch['bboxes'][0], batch['labels'][0],
                                                None, class_names))
        bboxes, labels, scores = model.predict([image], preset='visualize')
        self.vis.img('prediction', bbox_image(image, bboxes[0].cpu(), labels[0].cpu(),
                                              scores[0].cpu(), class_names))

    def state_dict(self):
        return {'model': self.faster_rcnn.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(), 'scaler': self.scaler.state_dict(),
                'step': self.step, 'rng': rng_state()}

    def load_state_dict(self, state):
        self.faster_rcnn.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if state['scaler'] and self.scaler.is_enabled():  # empty when saved without float16
            self.scaler.load_state_dict(state['scaler'])
        self.step = state['step']
        set_rng_state(state['rng'])
        self.apply_options()
