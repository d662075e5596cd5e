"""What every backbone gives the detector, and how its pre-trained weights are loaded."""
import os
from typing import NamedTuple

import torch
import torchvision
from torch import nn

FEAT_STRIDE = 16  # a C4 backbone's features are 1/16 of the input, as VGG16's conv5_3


class Backbone(NamedTuple):
    """extractor: (N, 3, H, W) -> (N, channels, H / 16, W / 16), the features RPN and head share;
    a feature pyramid's gives a list of maps instead, one per stride in strides.
    classifier: (R, channels * roi_size**2) pooled RoIs, flattened -> (R, features).
    roi_op: 'pool' (RoI max pooling, Fast R-CNN) or 'align' (RoIAlign, Mask R-CNN sec. 3)."""
    extractor: nn.Module
    classifier: nn.Module
    channels: int
    features: int
    roi_op: str = 'pool'
    roi_size: int = 7
    strides: tuple = (FEAT_STRIDE,)


def read_torch_file(path, what='checkpoint', error=ValueError):
    """What torch.save wrote to path, loaded as data only (weights_only: tensors and plain
    values, never code). `error` names the file when it is missing or cannot be loaded."""
    if not os.path.isfile(path):
        raise error(f'no {what} at {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding Python objects
        # torch's weights_only message: advice, what it met, more advice
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = ([line for line in lines[1:] if not line.startswith(('Please', 'Check'))]
                  or lines or [type(e).__name__])[0].rstrip('.')
        if 'GLOBAL' in detail:
            raise error(f'{path} holds Python objects a {what} may not hold ({detail}); it '
                        'is loaded as data only') from e
        raise error(f'{path} is not a readable {what}: not a file torch.save wrote whole '
                    f'({detail})') from e


def download(what, url, fetch):
    """fetch() (a download of `what` from url); offline, an OSError that names both."""
    try:
        return fetch()
    except OSError as e:  # no network: urllib's URLError, whose reason says why
        raise OSError(f'cannot download {what} from {url} ({getattr(e, "reason", e)})') from e


def load_pretrained(model, weights, name, skip=()):
    """Loads ImageNet weights into torchvision's model `name` ('vgg16', 'resnet50', ...), name
    by name and shape by shape; keys starting with `skip` (the ImageNet classifier) are unused.

    weights: a file holding torchvision's state dict of that model, or 'imagenet' for
    torchvision's published weights (downloaded once into torch.hub's cache).
    """
    if weights == 'imagenet':
        published = torchvision.models.get_model_weights(name)['IMAGENET1K_V1']
        state = download(f"torchvision's ImageNet {name} weights", published.url,
                         published.get_state_dict)
    else:
        state = read_torch_file(weights, f'{name} weights file')
    needed = {key: value.shape for key, value in model.state_dict().items()
              if not key.startswith(skip) and not key.endswith('num_batches_tracked')}
    missing = sorted(set(needed) - set(state)) if isinstance(state, dict) else ['everything']
    if missing:
        raise ValueError(f'{weights} is not a {name} state dict: missing {missing[0]} '
                         f'(and {len(missing) - 1} more)')
    for key, shape in needed.items():
        if state[key].shape != shape:
            raise ValueError(f'{weights}: {key} has shape {tuple(state[key].shape)}, {name} '
                             f'needs {tuple(shape)}')
    model.load_state_dict({key: state[key] for key in needed}, strict=False)
