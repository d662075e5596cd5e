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
import os
import sys
import time
from pathlib import Path

import fire
import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from data.dataset import TestDataset, TrainDataset, build_bbox_dataset, collate_test, collate_train
from data.toy import toy_dataset_dir
from data.util import read_image
from model.faster_rcnn_vgg16 import build_faster_rcnn
from model.utils.creator_tool import ProposalCreator
from trainer import FasterRCNNTrainer, NonFiniteLossError, load_checkpoint, save_checkpoint
from utils.config import Config
from utils.eval_tool import eval_detection_voc, format_ap_table
from utils.vis_tool import Visualizer, vis_bbox


def pick_device(name, local_rank=0):
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device=cuda but no CUDA device is visible; use --device=cpu or auto')
    if name == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    return torch.device('cuda', local_rank)


def build_model(cfg, n_fg_class):
    """The detector a Config describes, for ``n_fg_class`` foreground classes."""
    weights = cfg.caffe_pretrain_path if cfg.caffe_pretrain else cfg.pretrained_path
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


def bbox_datasets(cfg, split, class_names=None):
    """(training-style, evaluation-style) datasets of a split: without and with difficult."""
    data_dir = cfg.voc_data_dir or (toy_dataset_dir() if cfg.dataset == 'toy' else None)
    names = class_names or cfg.class_names
    kwargs = dict(class_names=names, skip_bad=cfg.skip_bad)
    train_style = build_bbox_dataset(cfg.dataset, data_dir, split,
                                     use_difficult=cfg.use_difficult, **kwargs)
    kwargs['class_names'] = names or train_style.class_names
    return train_style, build_bbox_dataset(cfg.dataset, data_dir, split, use_difficult=True,
                                           **kwargs)


def split_validation(n, n_val, seed):
    """Indices (train, val): n_val images held out of the training split, fixed by the seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


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
        r = eval_detection_voc(*preds, *gts, use_07_metric=use_07, pixel_inclusive=True)
        result[name], result['ap' if use_07 else 'ap_area'] = r['map'], r['ap']
    return result


class RunLog:
    """The run folder's JSON-lines metrics log (rank 0 only)."""

    def __init__(self, path, enabled):
        self.path, self.enabled = path, enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')


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


def resolve_run(cfg):
    """The run folder and the checkpoint to resume from (None for a new run)."""
    if cfg.resume is None:
        name = cfg.run_name or f'{cfg.dataset}-{time.strftime("%Y%m%d-%H%M%S")}'
        return Path(cfg.out_dir) / name, None
    path = Path(cfg.resume)
    ckpt = path / 'last.pt' if path.is_dir() else path
    return ckpt.parent, ckpt


def train(**kwargs):
    """Trains a detector; every option is a Config field (see utils/config.py)."""
    cfg = Config.from_kwargs(**kwargs)
    run_dir, resume_path = resolve_run(cfg)
    state = None
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        # The saved run's options, with those given now on top (e.g. more --epochs).
        cfg = Config.from_kwargs(**{**state['config'], **kwargs})
    rank, world_size, device = setup_distributed(cfg)
    main = rank == 0
    torch.manual_seed(cfg.seed)

    train_bboxes, eval_bboxes = bbox_datasets(cfg, 'trainval',
                                              state and tuple(state['class_names']))
    class_names = tuple(train_bboxes.class_names)
    _, test_bboxes = bbox_datasets(cfg, 'test', class_names)
    train_idx, val_idx = split_validation(len(train_bboxes), cfg.n_val_images, cfg.seed)
    train_set = TrainDataset(Subset(train_bboxes, train_idx), cfg.min_size, cfg.max_size,
                             cfg.normalization, seed=cfg.seed)
    val_set = TestDataset(Subset(eval_bboxes, val_idx))
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, collate_fn=collate_train,
                        num_workers=cfg.num_workers, pin_memory=device.type == 'cuda')

    model = build_model(cfg, len(class_names)).to(device)
    vis = Visualizer(cfg.env, cfg.visdom_server, cfg.visdom_port, enabled=cfg.visdom and main)
    trainer = FasterRCNNTrainer(model, cfg, vis, device, rank, world_size)
    start_epoch, best_map = 0, -1.0
    if state is not None:
        trainer.load_state_dict(state)
        start_epoch, best_map = state['epoch'] + 1, state['best_map']
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / 'config.json')
        print(f'run folder: {run_dir}; {len(train_idx)} training images, {len(val_idx)} held '
              f'out for validation, classes: {", ".join(class_names)}')
    log = RunLog(run_dir / 'metrics.jsonl', main)

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
                val = evaluate(model, val_set, cfg.batch_size) if len(val_set) else {'map': 0.0}
                log.write(step=trainer.step, epoch=epoch, split='val', map=val['map'])
                vis.plot('val_map', val['map'], epoch + 1)
                print(f'epoch {epoch + 1}: validation mAP {val["map"]:.4f}')
                ckpt = {**trainer.state_dict(), 'epoch': epoch, 'config': cfg.to_dict(),
                        'class_names': list(class_names),
                        'best_map': max(best_map, val['map'])}
                save_checkpoint(ckpt, run_dir / 'last.pt')
                # Best is chosen on images held out of training, never on the test set.
                if val['map'] > best_map or not len(val_set):
                    best_map = val['map']
                    save_checkpoint(ckpt, run_dir / 'best.pt')
            if world_size > 1:
                dist.barrier()  # the others wait while rank 0 evaluates and saves
    except NonFiniteLossError as e:
        sys.exit(f'error: {e}')

    if main:
        best = load_checkpoint(run_dir / 'best.pt', device)
        model.load_state_dict(best['model'])
        result = evaluate(model, TestDataset(test_bboxes), cfg.batch_size, cfg.test_n_images)
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
    _, test_bboxes = bbox_datasets(cfg, 'test', class_names)
    result = evaluate(model, TestDataset(test_bboxes), cfg.batch_size, cfg.test_n_images)
    print('VOC07 11-point metric:')
    print(format_ap_table(result['ap'], class_names, result['map']))
    print('VOC2010+ area metric:')
    print(format_ap_table(result['ap_area'], class_names, result['map_area']))


def detect(load_path, *images, out_dir='detections', preset='visualize', device='auto'):
    """Draws detected boxes on each image into out_dir and writes out_dir/detections.json."""
    import matplotlib.pyplot as plt

    if not images:
        raise ValueError('detect needs at least one image path')
    model, _, class_names = load_model(load_path, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in images:
        image = read_image(path)
        bboxes, labels, scores = (x[0].cpu() for x in model.predict([image], preset=preset))
        ax = vis_bbox(image, bboxes, labels, scores, class_names)
        ax.figure.savefig(out / f'{Path(path).stem}.png', bbox_inches='tight')
        plt.close(ax.figure)
        records.append({'image': str(path), 'detections': [
            {'bbox': b.tolist(), 'label': class_names[lab], 'score': float(s)}
            for b, lab, s in zip(bboxes, labels, scores)]})
    (out / 'detections.json').write_text(json.dumps(records, indent=2))
    print(f'{len(images)} images with boxes and detections.json written to {out}')


if __name__ == '__main__':
    fire.Fire({'train': train, 'eval': eval, 'detect': detect})
