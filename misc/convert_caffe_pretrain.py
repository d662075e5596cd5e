"""Converts the caffe VGG16 weights into the file ``--caffe-pretrain`` loads.

The paper's VGG16 was trained in Caffe: it expects BGR images in 0..255 minus the pixel means,
and it gives Faster R-CNN about 1-2 mAP more than torchvision's VGG16. The widely used PyTorch
copy of it has torchvision's key layout (features.*, classifier.*). This script checks every
name and shape our extractor (conv1_1..conv5_3) and head (fc6, fc7) need, drops fc8, and saves
the rest:

    python misc/convert_caffe_pretrain.py                       # downloads the file
    python misc/convert_caffe_pretrain.py --source=vgg16-00b39a1b.pth --out=weights/vgg16_caffe.pth
"""
import os
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.backbones.base import download, read_torch_file  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.run import run_command  # noqa: E402

CAFFE_VGG16_URL = 'https://s3-us-west-2.amazonaws.com/jcjohns-models/vgg16-00b39a1b.pth'
# The layers we keep: every conv of features, fc6 (classifier.0) and fc7 (classifier.3).
KEPT_PREFIXES = ('features.', 'classifier.0.', 'classifier.3.')


def expected_shapes():
    """Name -> shape of every tensor the converted file must hold."""
    state = torchvision.models.vgg16(weights=None).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith(KEPT_PREFIXES)}


def convert_state(state, source='the source'):
    """Checks a VGG16 state dict name by name and shape by shape; returns the kept tensors."""
    if not isinstance(state, dict):
        raise ValueError(f'{source} does not hold a state dict (got {type(state).__name__})')
    out = {}
    for name, shape in expected_shapes().items():
        if name not in state:
            raise ValueError(f'{source} has no {name}: not a VGG16 state dict')
        if tuple(state[name].shape) != shape:
            raise ValueError(f'{source}: {name} has shape {tuple(state[name].shape)}, '
                             f'VGG16 needs {shape}')
        out[name] = state[name].float().contiguous()
    return out


def main(source=CAFFE_VGG16_URL, out='weights/vgg16_caffe.pth'):
    """Reads ``source`` (a URL or a local path), checks it and writes ``out``."""
    if source.startswith(('http://', 'https://')):
        try:
            state = download('the caffe VGG16 weights', source,
                             lambda: torch.hub.load_state_dict_from_url(
                                 source, map_location='cpu', weights_only=True))
        except OSError as e:
            raise ValueError(f'{e}; download the file where there is a network and give it '
                             'with --source=FILE') from e
    else:
        state = read_torch_file(source, '--source file')
    converted = convert_state(state, source)
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    save_checkpoint(converted, out)
    print(f'wrote {len(converted)} tensors to {out}; train with --caffe-pretrain '
          f'--caffe-pretrain-path={out}')


if __name__ == '__main__':
    run_command(main)
