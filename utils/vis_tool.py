"""Drawing detections with matplotlib, and training plots in visdom.

Images are (3, H, W) RGB in 0..255 (numpy arrays or torch tensors); boxes are (R, 4) x_min y_min
x_max y_max in the image's continuous pixel coordinates; labels are 0..n_fg-1.
"""
import contextlib
import logging
import socket
import warnings
from urllib.parse import urlparse

import matplotlib.pyplot as plt
import numpy as np
import torch
import visdom
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# A power of two, so W / _DPI * _DPI is exactly W and bbox_image's canvas is exactly W x H.
_DPI = 128


def vis_bbox(img, bbox, label=None, score=None, class_names=None, ax=None):
    """Draw an image with its boxes and "name: score" captions.

    Args:
        img: (3, H, W) RGB, 0..255.
        bbox: (R, 4) boxes.
        label: (R,) class ids 0..n_fg-1, or None.
        score: (R,) confidences, or None.
        class_names: names indexed by label; None prints the label id.
        ax: matplotlib Axes to draw on; None makes a new pyplot figure.

    Returns:
        The Axes. Data coordinates are our pixel coordinates: the image spans [0, W] x [0, H].
    """
    img, bbox = _numpy(img), _numpy(bbox).reshape(-1, 4)
    label = None if label is None else _numpy(label).astype(int)
    score = None if score is None else _numpy(score)
    ax = ax or plt.figure().add_subplot(1, 1, 1)
    height, width = img.shape[1:]
    # extent: pixel i covers [i, i + 1], so a box (0, 0, W, H) frames the whole image.
    ax.imshow(img.transpose(1, 2, 0).clip(0, 255).astype(np.uint8), extent=(0, width, height, 0))
    for i, (x_min, y_min, x_max, y_max) in enumerate(bbox):
        color = 'red' if label is None else plt.get_cmap('tab20')(label[i] % 20)
        ax.add_patch(plt.Rectangle((x_min, y_min), x_max - x_min, y_max - y_min,
                               fill=False, edgecolor=color, linewidth=2))
        caption = []
        if label is not None:
            caption.append(str(label[i]) if class_names is None else class_names[label[i]])
        if score is not None:
            caption.append(f'{score[i]:.2f}')
        if caption:
            ax.text(x_min, y_min, ': '.join(caption), style='italic', va='bottom',
                    bbox={'facecolor': 'white', 'alpha': 0.5, 'pad': 0})
    ax.set(xlim=(0, width), ylim=(height, 0))
    return ax


def bbox_image(img, bbox, label=None, score=None, class_names=None):
    """vis_bbox rendered offscreen at the image's size: (3, H, W) uint8 RGB, e.g. for visdom."""
    height, width = _numpy(img).shape[1:]
    # A bare Figure with an Agg canvas: no pyplot state, works under any backend, nothing to close.
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = vis_bbox(img, bbox, label, score, class_names, ax=figure.add_axes((0, 0, 1, 1)))
    ax.set_axis_off()
    FigureCanvasAgg(figure).draw()  # the canvas becomes figure.canvas
    rgba = np.asarray(figure.canvas.buffer_rgba())  # (H, W, 4)
    return np.ascontiguousarray(rgba[:, :, :3].transpose(2, 0, 1))  # (3, H, W)


class Visualizer:
    """Training plots in a visdom environment; a silent no-op where there is no server.

    Where no visdom server answers at construction, one warning says so and every method does
    nothing. Where the server stops answering later, the first failing call warns once and plots
    are off from then on: a plot never stops training.
    """

    def __init__(self, env='frcnn', server='http://127.0.0.1', port=8097, enabled=True):
        self._client = None
        self._windows = set()  # windows created in this run; later writes append
        if not enabled:
            return
        # visdom's client logs setup chatter (through the deprecated logger.warn) and prints
        # tracebacks when no server is there; a plain socket connect first and a quiet client
        # keep that to our one line. Suppressed: nothing listens there (OSError), or something
        # answers that is not visdom.
        host = urlparse(server).hostname or server
        with contextlib.suppress(Exception):
            socket.create_connection((host, port), timeout=1.0).close()
            logging.getLogger('visdom').setLevel(logging.ERROR)
            with warnings.catch_warnings(action='ignore', category=DeprecationWarning):
                client = _Client(server=server, port=port, env=env, raise_exceptions=True,
                                 use_incoming_socket=False)
            self._client = client if client.check_connection() else None
        if self._client is None:
            warnings.warn(f'visdom server not reachable at {server}:{port}; plots are off '
                          f'(start one with: python -m visdom.server -port {port})', stacklevel=2)

    @property
    def connected(self):
        """True while plots are being sent."""
        return self._client is not None

    def plot(self, name, y, x):
        """Append the point (x, y) to the line plot `name` (a new plot on its first call)."""
        self._call('line', Y=np.array([float(y)]), X=np.array([float(x)]), win=name,
                   opts={'title': name}, update='append' if name in self._windows else None)
        self._windows.add(name)

    def img(self, name, img):
        """Show a (3, H, W) uint8 RGB image in the window `name`."""
        self._call('image', _numpy(img), win=name, opts={'title': name})

    def _call(self, method, *args, **kwargs):
        if self._client is None:
            return
        try:
            getattr(self._client, method)(*args, **kwargs)
        except Exception as error:
            warnings.warn(f'visdom call failed ({error}); plots are off from now on', stacklevel=3)
            self._client = None


class _Client(visdom.Visdom):
    """visdom.Visdom with a timeout on every request, and errors raised instead of printed."""

    def _handle_post(self, url, data=None):
        # visdom's documented hook for its HTTP posts. After 5 s without an answer the
        # Visualizer gives up on a hung server: training must go on.
        return self.session.post(url, data=data, timeout=5.0).text

    def win_exists(self, win, env=None):
        # visdom's version prints on a connection error; ours lets Visualizer._call see it.
        return {'true': True, 'false': False}.get(self._win_exists_wrap(win, env))


def _numpy(values):
    return values.numpy(force=True) if isinstance(values, torch.Tensor) else np.asarray(values)
