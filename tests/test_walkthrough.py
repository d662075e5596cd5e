"""walkthrough.ipynb runs on a trained toy checkpoint and shows every stage; and
misc/architecture_figure.py draws the architecture figure from the same checkpoint."""
import math
import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LOSS_NAMES = ('rpn_loc_loss', 'rpn_cls_loss', 'roi_loc_loss', 'roi_cls_loss')


def numbers(pattern, text):
    """The ints of pattern's groups in its one match in text."""
    match = re.search(pattern, text)
    assert match, f'{pattern!r} not in the notebook output:\n{text}'
    return [int(group) for group in match.groups()]


@pytest.mark.slow
def test_walkthrough_notebook_runs(trained_run, toy_root, monkeypatch):
    import nbclient
    import nbformat
    monkeypatch.setenv('FRCNN_CHECKPOINT', str(trained_run / 'best.pt'))
    monkeypatch.setenv('FRCNN_DATA', str(toy_root))
    monkeypatch.delenv('FRCNN_INDEX', raising=False)
    # the inline backend, as in Jupyter: every plt.show() leaves a PNG in the outputs
    monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
    nb = nbformat.read(ROOT / 'walkthrough.ipynb', as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': str(ROOT)}}).execute()
    outputs = [output for cell in nb.cells for output in cell.get('outputs', [])]
    text = ''.join(output.get('text', '') for output in outputs)

    assert sum('image/png' in output.get('data', {}) for output in outputs) == 9  # (a) to (i)
    input_h, input_w = numbers(r'-> input \((\d+), (\d+)\) \(H, W\)', text)
    height, width, n_anchor, n_all = numbers(
        r'anchors: K = H x W x A = (\d+) x (\d+) x (\d+) = (\d+)', text)
    assert (height, width) == (math.ceil(input_h / 16), math.ceil(input_w / 16))
    assert n_anchor == 9 and n_all == height * width * n_anchor
    n_before, = numbers(r'proposals before NMS: (\d+) of the', text)
    n_after, n_post_nms = numbers(r'after NMS: (\d+) \(IoU 0.7, n_test_post_nms = (\d+)\)', text)
    assert 0 < n_after <= min(n_before, n_post_nms) and n_before <= n_all
    n_pos, n_neg, n_ignored = numbers(r'anchor targets: (\d+) positive, (\d+) negative, '
                                      r'(\d+) ignored', text)
    assert n_pos >= 1 and n_pos + n_neg == 256 and n_pos + n_neg + n_ignored == n_all
    n_roi, n_fg, n_bg = numbers(r'sampled RoIs: S = (\d+), (\d+) foreground, (\d+) background',
                                text)
    assert n_roi <= 128 and n_fg >= 1 and n_fg + n_bg == n_roi
    for name in LOSS_NAMES:
        value, = re.findall(rf'^{name} +(\S+)$', text, flags=re.MULTILINE)
        assert math.isfinite(float(value)), (name, value)


def test_architecture_figure(trained_run, toy_root, tmp_path):
    from misc.architecture_figure import DPI, FIGSIZE, main
    image = sorted((toy_root / 'JPEGImages').glob('*.jpg'))[0]
    out = Path(main(checkpoint=str(trained_run / 'best.pt'), image=str(image),
                    out=str(tmp_path / 'docs' / 'architecture.png')))
    assert out.stat().st_size < 400_000
    with Image.open(out) as png:
        png.load()  # decodes every pixel
        assert png.format == 'PNG'
        assert png.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
