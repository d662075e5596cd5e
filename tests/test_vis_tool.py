import json
import socket
import subprocess
import sys
import time
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from utils.vis_tool import Visualizer, bbox_image, vis_bbox

matplotlib.use('Agg')  # headless, whatever the environment says

BBOX = np.array([[2, 3, 12, 20], [5.5, 0, 30, 9.5]], np.float32)


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_vis_bbox_draws_one_rectangle_per_box():
    ax = Figure().add_subplot(1, 1, 1)
    img = torch.full((3, 24, 32), 128.0)
    returned = vis_bbox(img, torch.from_numpy(BBOX), label=np.array([0, 1]),
                        score=np.array([0.9, 0.25]), class_names=('cat', 'dog'), ax=ax)
    assert returned is ax
    rectangles = [patch for patch in ax.patches if isinstance(patch, Rectangle)]
    assert len(rectangles) == 2
    for rectangle, (x_min, y_min, x_max, y_max) in zip(rectangles, BBOX, strict=True):
        assert rectangle.get_xy() == pytest.approx((x_min, y_min))
        assert rectangle.get_width() == pytest.approx(x_max - x_min)
        assert rectangle.get_height() == pytest.approx(y_max - y_min)
    assert [text.get_text() for text in ax.texts] == ['cat: 0.90', 'dog: 0.25']
    # Pixel coordinates: the image spans [0, W] x [0, H], y pointing down.
    assert ax.images[0].get_extent() == [0, 32, 24, 0]
    assert ax.get_xlim() == (0, 32) and ax.get_ylim() == (24, 0)


def test_vis_bbox_captions_and_new_figure():
    ax = vis_bbox(np.zeros((3, 10, 10)), BBOX, label=[1, 0])  # no names: label ids
    try:
        assert [text.get_text() for text in ax.texts] == ['1', '0']
    finally:
        plt.close(ax.figure)
    ax = Figure().add_subplot(1, 1, 1)
    vis_bbox(np.zeros((3, 10, 10)), np.zeros((0, 4)), ax=ax)
    assert len(ax.patches) == 0 and len(ax.texts) == 0


@pytest.mark.parametrize('height, width', [(24, 32), (37, 29), (375, 500)])
def test_bbox_image_shape_and_content(height, width):
    img = np.zeros((3, height, width), np.float32)
    img[:, :, : width // 2] = 255  # left half white
    out = bbox_image(img, np.zeros((0, 4)))
    assert out.shape == (3, height, width) and out.dtype == np.uint8
    # Without boxes the image comes back pixel for pixel (drawn at scale 1, no resampling).
    np.testing.assert_array_equal(out, img.astype(np.uint8))
    # A box along the border of the right half: red on its edge, the middle unchanged.
    box = np.array([[width // 2, 0, width, height]], np.float32)
    out = bbox_image(torch.from_numpy(img), box, label=[0], score=[0.5], class_names=['cat'])
    assert out.shape == (3, height, width) and out.dtype == np.uint8
    edge = out[:, height // 2, width - 1]
    assert edge[2] > 100  # tab20 blue for label 0, on black
    np.testing.assert_array_equal(out[:, height * 3 // 4, width * 3 // 4 - 1], [0, 0, 0])


def test_bbox_image_uses_no_pyplot_figures():
    before = plt.get_fignums()
    bbox_image(np.zeros((3, 16, 16)), BBOX)
    assert plt.get_fignums() == before


def _assert_silent_noop(visualizer, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        visualizer.plot('loss', 1.0, 0)
        visualizer.plot('b', torch.tensor(2.0), 1)
        visualizer.img('image', np.zeros((3, 8, 8), np.uint8))
    assert not visualizer.connected
    assert capsys.readouterr() == ('', '')


def test_visualizer_without_server_warns_once_and_does_nothing(capsys):
    port = _free_port()
    with pytest.warns(UserWarning) as record:
        visualizer = Visualizer(env='frcnn_test', port=port)
    assert len(record) == 1
    assert str(record[0].message).startswith(
        f'visdom server not reachable at http://127.0.0.1:{port}; plots are off')
    _assert_silent_noop(visualizer, capsys)


def test_visualizer_disabled_is_silent(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        visualizer = Visualizer(enabled=False)
    _assert_silent_noop(visualizer, capsys)


def test_visualizer_with_real_server(tmp_path, capsys):
    port = _free_port()
    # `python -m visdom.server` first downloads its web assets (fails offline); run_server.main()
    # serves without them, and the plotting API needs none.
    argv = ['visdom', '-port', str(port), '--hostname', '127.0.0.1', '-bind_local',
            '-env_path', str(tmp_path), '-logging_level', 'WARNING']
    code = f'import sys; from visdom.server import run_server; sys.argv = {argv}; run_server.main()'
    server = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None, 'visdom server exited'
                assert time.monotonic() < deadline, 'visdom server did not start in 30 s'
                time.sleep(0.1)

        with warnings.catch_warnings():
            warnings.simplefilter('error')
            visualizer = Visualizer(env='frcnn_test', port=port)
            assert visualizer.connected
            for x, y in enumerate([1.0, 0.5, 0.25]):
                visualizer.plot('loss', y, x)
            visualizer.plot('loss', 0.125, 3)
            visualizer.plot('map', 0.3, 3)
            visualizer.img('image', bbox_image(np.zeros((3, 16, 16)), BBOX))

        def window(win):
            return json.loads(visualizer._client.get_window_data(win=win, env='frcnn_test'))

        line = window('loss')['content']['data'][0]
        assert line['x'] == [0, 1, 2, 3] and line['y'] == [1.0, 0.5, 0.25, 0.125]
        assert window('map')['content']['data'][0]['y'] == [0.3]
        assert window('image')['type'] == 'image'
    finally:
        server.terminate()
        server.wait(timeout=10)

    # The server is gone: the next call warns once, later calls are silent no-ops.
    with pytest.warns(UserWarning, match='plots are off from now on') as record:
        visualizer.plot('loss', 0.1, 4)
    assert len(record) == 1
    _assert_silent_noop(visualizer, capsys)
