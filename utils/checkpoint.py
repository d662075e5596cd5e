"""Checkpoint files: the one format the trainer, the CLI, the demo and the caffe converter share.

A checkpoint is a dict of tensors and plain values, written to a temporary file, synced and
renamed (a kill mid-save leaves the previous file intact), and read with
``torch.load(weights_only=True)`` (a checkpoint is data, never code). A detector checkpoint
holds 'model' (the state dict), 'class_names' and 'model_options' (the fields of
model.faster_rcnn.ModelOptions), so load_detector rebuilds the model from the file alone; the
trainer adds its own state and 'config'.
"""
import errno
import os
import shutil
from pathlib import Path

import torch

from model.backbones.base import read_torch_file
from model.faster_rcnn import ModelOptions, build_faster_rcnn


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message names the file and why."""


def save_checkpoint(state, path):
    """Writes state to path through a temporary file and a rename.

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
    except (OSError, RuntimeError) as e:  # others, e.g. KeyboardInterrupt, need no explaining
        # torch.save reports the file's OSError as a bare C++ assert: look behind it
        full = any(getattr(x, 'errno', None) == errno.ENOSPC for x in (e, e.__context__))
        reason = 'no space left on device' if full or (
            isinstance(e, RuntimeError) and shutil.disk_usage(tmp.parent).free < 2**20) else e
        raise CheckpointError(f'cannot write checkpoint {path}: {reason}') from e
    finally:
        tmp.unlink(missing_ok=True)  # renamed away, or half written: the old file is intact


def load_checkpoint(path, required=('model', 'class_names')):
    """The dict saved at path, loaded as data; CheckpointError names the file if it is
    missing, unreadable, or lacks one of the `required` keys."""
    state = read_torch_file(path, 'checkpoint', CheckpointError)
    missing = set(required) - set(state) if isinstance(state, dict) else set(required)
    if missing:
        raise CheckpointError(f'{path} is not a frcnn checkpoint: it has no {sorted(missing)}')
    return state


def load_detector(checkpoint, device='cpu', **options):
    """(detector in eval mode on device, class names) from a checkpoint file, or from the dict
    load_checkpoint returned. options override the saved model_options (e.g.
    backend='torchvision', min_size=800)."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint, required=('model', 'class_names', 'model_options'))
    if 'model_options' not in checkpoint:
        raise CheckpointError('the checkpoint has no model_options: it was written before frcnn '
                              'stored them; train it again with this version')
    class_names = tuple(checkpoint['class_names'])
    options = ModelOptions(**{**checkpoint['model_options'], **options})
    model = build_faster_rcnn(len(class_names), options)
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval(), class_names
