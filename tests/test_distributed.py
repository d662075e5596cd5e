"""Data-parallel training (torchrun, DDP over gloo on CPU) and mixed precision (bfloat16 on CPU).

The CLI runs go through `torchrun --nproc_per_node=2 --standalone train.py train` with --amp
(bfloat16) and --lr-scaling=linear; gradient averaging is checked in-process, in float32,
against a single-process run with the same total batch.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing as mp
from torch import nn

from data.dataset import collate_train
from trainer import FasterRCNNTrainer, build_model
from utils.checkpoint import load_checkpoint
from utils.config import Config

ROOT = Path(__file__).resolve().parents[1]

# Target creation that keeps every candidate: all inside anchors are labelled (the negative
# threshold equals the positive one), every anchor becomes a proposal (no size filter, NMS at
# IoU 1 suppresses nothing, no top-n cut) and every proposal is a positive or a negative RoI.
# Sampling is then deterministic, and two images of one size give the same number of samples.
KEEP_ALL = dict(rpn_n_sample=100_000, rpn_neg_iou_thresh=0.7, rpn_min_size=0, rpn_nms_thresh=1.0,
                n_train_pre_nms=100_000, n_train_post_nms=100_000, roi_n_sample=100_000)


def tiny_config(**overrides):
    return Config(extractor='small', min_size=64, max_size=96, lr=0.01, **KEEP_ALL, **overrides)


def two_samples():
    """Two different (image, bbox, label, scale) training samples of the same size, 2 objects."""
    generator = torch.Generator().manual_seed(0)
    targets = (([[4., 6, 40, 50], [50, 10, 90, 60]], [0, 2]),
               ([[20., 4, 70, 40], [2, 30, 40, 62]], [1, 1]))
    return [(torch.randn(3, 64, 96, generator=generator), torch.tensor(bbox), torch.tensor(label),
             1.0) for bbox, label in targets]


def model_without_batchnorm(cfg, state=None):
    """BatchNorm would see one image per process but two in the reference: take it out."""
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    for i, layer in enumerate(model.extractor):
        if isinstance(layer, nn.BatchNorm2d):
            model.extractor[i] = nn.Identity()
    if state is not None:
        model.load_state_dict(state)
    return model


def named(name):
    """An assert_close message that says which tensor differs, and how."""
    return lambda message: f'{name}: {message}'


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def one_ddp_step(rank, init_method, state, samples, out_dir):
    """Process `rank` of 2: one step on its own image; saves its gradients and weights."""
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=init_method, rank=rank, world_size=2)
    model = model_without_batchnorm(tiny_config(), state)
    trainer = FasterRCNNTrainer(model, tiny_config(), rank=rank, world_size=2)
    trainer.train_step(collate_train([samples[rank]]))
    torch.save((gradients(model), model.state_dict()), Path(out_dir) / f'rank{rank}.pt')
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_equals_one_process_with_the_whole_batch(tmp_path):
    samples = two_samples()
    model = model_without_batchnorm(tiny_config())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = FasterRCNNTrainer(model, tiny_config())
    n_rois, creator = [], model.proposal_target_creator

    def counting_creator(*args):
        sample = creator(*args)
        n_rois.append(len(sample[2]))
        return sample

    model.proposal_target_creator = counting_creator
    trainer.train_step(collate_train(samples))
    # The batch's losses are means over both images' samples; DDP averages per-image means.
    # The two agree because both images have the same number of samples (RPN: same size).
    assert n_rois[0] == n_rois[1] > 100

    mp.spawn(one_ddp_step, (f'file://{tmp_path}/init', initial, samples, str(tmp_path)),
             nprocs=2)
    (grads, weights), (_, weights1) = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    # The updates are small (1e-7 for most weights), so compare the gradients themselves:
    # DDP leaves the average over the processes in .grad. Only the summation order differs.
    for name, reference in gradients(model).items():
        torch.testing.assert_close(grads[name], reference, rtol=1e-4,
                                   atol=1e-5 * float(reference.abs().max()), msg=named(name))
    for name, reference in model.state_dict().items():
        assert torch.equal(weights[name], weights1[name]), name  # the replicas stay in sync
        torch.testing.assert_close(weights[name], reference, msg=named(name))


def losses_and_grads(amp, steps=1):
    """Losses of each step and the gradient of the first, the small model on two_samples."""
    cfg = tiny_config(amp=amp)
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    dtypes = {}
    model.extractor.register_forward_hook(lambda m, i, out: dtypes.update(features=out.dtype))
    model.head.pool.register_forward_pre_hook(lambda m, args: dtypes.update(rois=args[1].dtype))
    model.head.pool.register_forward_hook(lambda m, i, out: dtypes.update(pool=out.dtype))
    trainer = FasterRCNNTrainer(model, cfg)
    batch = collate_train(two_samples())
    losses = []
    for step in range(steps):
        losses.append({k: v.detach() for k, v in trainer.train_step(batch).items()})
        if step == 0:
            grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master weights
    return losses, grad, dtypes


def test_bfloat16_autocast_on_cpu_stays_close_to_float32():
    full, full_grad, full_dtypes = losses_and_grads(amp=False)
    mixed, mixed_grad, mixed_dtypes = losses_and_grads(amp=True, steps=3)
    assert full_dtypes == {'features': torch.float32, 'rois': torch.float32, 'pool': torch.float32}
    # Convolutions run in bfloat16; the RoIs (and the proposals) stay in float32, and RoI pooling
    # computes in float32 and gives back the features' dtype.
    assert mixed_dtypes == {'features': torch.bfloat16, 'rois': torch.float32,
                            'pool': torch.bfloat16}
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation). Sampling
    # keeps every candidate (KEEP_ALL), but the proposals are decoded from bfloat16 RPN outputs,
    # so the RoIs and their regression targets move a little too: up to 2.7% on roi_loc_loss
    # here, 0.3% on the others. 5% is far below what a wrong cast or an overflow would do.
    for name, value in full[0].items():
        assert value.dtype == mixed[0][name].dtype == torch.float32
        torch.testing.assert_close(mixed[0][name], value, rtol=0.05, atol=1e-4, msg=named(name))
    # Gradients: about 10% relative error in norm here (cosine 0.997), but the same direction.
    assert float(nn.functional.cosine_similarity(mixed_grad, full_grad, dim=0)) > 0.98
    totals = [float(losses['total_loss']) for losses in mixed]
    assert all(torch.isfinite(v).all() for losses in mixed for v in losses.values())
    assert totals[2] < totals[0]  # three steps on the same batch lower its loss


def torchrun(*options, timeout=300):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
               '--standalone', str(ROOT / 'train.py'), 'train', *options]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def cli_options(toy_root, out_dir, run_name, epochs):
    options = dict(dataset='toy', voc_data_dir=toy_root, out_dir=out_dir, run_name=run_name,
                   epochs=epochs, n_val_images=2, test_n_images=4, num_workers=0, visdom=False,
                   min_size=128, max_size=160, plot_every=1, lr_scaling='linear', amp=True)
    return [f'--{k.replace("_", "-")}={v}' for k, v in options.items()]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def tiny_toy(tmp_path_factory):
    from data.toy import make_toy_dataset
    return make_toy_dataset(tmp_path_factory.mktemp('toy12'), n_trainval=12, n_test=4, seed=0)


@pytest.fixture(scope='module')
def straight_run(tiny_toy, tmp_path_factory):
    """Two processes, two epochs in one go: (run folder, stdout)."""
    out = tmp_path_factory.mktemp('ddp')
    stdout = torchrun(*cli_options(tiny_toy, out, 'straight', epochs=2))
    return out / 'straight', stdout


@pytest.mark.slow
def test_two_processes_write_one_run_folder(straight_run):
    run_dir, stdout = straight_run
    assert {p.name for p in run_dir.iterdir()} == {'config.json', 'metrics.jsonl', 'last.pt',
                                                    'best.pt'}
    assert stdout.count('run folder:') == 1 and stdout.count('test set, best checkpoint') == 1
    log = records(run_dir)
    # 10 training images over 2 processes: 5 steps an epoch, each logged once, by rank 0.
    assert [r['step'] for r in log if 'total_loss' in r] == list(range(1, 11))
    assert [r['epoch'] for r in log if r.get('split') == 'val'] == [0, 1]
    test = [r for r in log if r.get('split') == 'test']
    assert len(test) == 1 and 0 <= test[0]['map'] <= 1
    # --lr-scaling=linear: the toy lr 0.01 x (batch 1 x 2 processes).
    assert all(r['lr'] == pytest.approx(0.02) for r in log if 'lr' in r)
    last = load_checkpoint(run_dir / 'last.pt')
    assert last['epoch'] == 1 and last['step'] == 10


@pytest.mark.slow
def test_two_processes_resume_exactly(straight_run, tiny_toy, tmp_path):
    torchrun(*cli_options(tiny_toy, tmp_path, 'resumed', epochs=1))
    run_dir = tmp_path / 'resumed'
    assert {r['epoch'] for r in records(run_dir)} == {0}
    torchrun(f'--resume={run_dir}', '--epochs=2')
    log = records(run_dir)
    assert [r['step'] for r in log if 'total_loss' in r] == list(range(1, 11))
    assert [r['step'] for r in log if r['epoch'] == 1 and 'total_loss' in r] == [6, 7, 8, 9, 10]
    assert [r['epoch'] for r in log if r.get('split') == 'val'] == [0, 1]
    assert log[-1]['split'] == 'test' and 0 <= log[-1]['map'] <= 1
    resumed = load_checkpoint(run_dir / 'last.pt')
    straight = load_checkpoint(straight_run[0] / 'last.pt')
    assert resumed['step'] == straight['step'] == 10
    for name, value in straight['model'].items():
        assert torch.equal(resumed['model'][name], value), name
