"""ONNX export (utils/export.py, train.py export / --onnx): the exported file in ONNX Runtime
gives predict's detections, on images of many sizes from one file."""
import json
import re
import sys

import pytest
import torch
from torchvision.ops import box_iou

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

from data.voc_dataset import VOCBboxDataset  # noqa: E402
from model.faster_rcnn import ModelOptions, build_faster_rcnn  # noqa: E402
from train import main  # noqa: E402
from utils.export import OnnxDetector, export_onnx, require_onnx  # noqa: E402


def unmatched(expected, got):
    """How many detections of one image's (boxes, labels, scores) `expected` have no partner
    in `got` with the same label, IoU >= 0.999 and a score within 1e-4, each partner used once,
    plus those of `got` left over."""
    (boxes, labels, scores), (boxes2, labels2, scores2) = expected, got
    if not len(boxes) or not len(boxes2):
        return len(boxes) + len(boxes2)
    ok = ((box_iou(boxes, boxes2) >= 0.999) & (labels[:, None] == labels2[None])
          & ((scores[:, None] - scores2[None]).abs() <= 1e-4))
    taken = set()
    for row in ok:
        partner = next((j for j in row.nonzero()[:, 0].tolist() if j not in taken), None)
        if partner is not None:
            taken.add(partner)
    return len(boxes) - len(taken) + len(boxes2) - len(taken)


@pytest.mark.slow
@pytest.mark.parametrize('extractor', ['small', 'vgg16', 'resnet50', 'resnet50_fpn'])
def test_onnx_runtime_gives_predicts_detections_on_20_image_sizes(extractor, toy_root, tmp_path):
    """Random weights, the score layers drawn wider than their init (RPN 30x, head 100x), on 20
    toy test images of different sizes with pixel noise of +-30 added, through one exported
    file; then the 'visualize' preset from the same file, its thresholds being inputs.

    Why the noise and the wider layers: a random detector scores everything, and the toy
    images' flat backgrounds give it hundreds of RoIs with the same features, whose scores
    then tie to within float rounding (1e-6); ONNX Runtime's convolutions round differently
    from torch's, which breaks such ties the other way and moves the NMS after them. A
    trained detector scores background under the threshold (the quick start test below runs
    the plain toy images). Inputs are resized from 224..320 px to 240..320 for the big
    backbones, and their heads take 100 proposals instead of 300 (1000 with FPN), ResNet-50's
    10 (its C4 head runs layer4 on each): fewer keep them quick."""
    torch.manual_seed(0)
    options = dict(min_size=256, max_size=400, anchor_scales=(2, 4, 8)) if (
        extractor == 'small') else dict(min_size=240, max_size=320, n_test_post_nms=(
            10 if extractor == 'resnet50' else 100))
    model = build_faster_rcnn(3, ModelOptions(extractor=extractor, **options)).eval()
    torch.nn.init.normal_(model.rpn.score.weight, 0, 0.3)
    torch.nn.init.normal_(model.head.score.weight, 0, 1.0)
    torch.nn.init.normal_(model.head.cls_loc.weight, 0, 0.03)
    path = tmp_path / 'model.onnx'
    export_onnx(model, path, class_names=['a', 'b', 'c'])
    onnx.checker.check_model(onnx.load(str(path)))
    noise = torch.Generator().manual_seed(0)
    images = [(image + torch.rand(image.shape, generator=noise) * 60 - 30).clamp(0, 255)
              for image, _, _, _ in (VOCBboxDataset(toy_root, 'test')[i] for i in range(20))]
    assert len({tuple(image.shape) for image in images}) >= 15
    runtime = OnnxDetector(path)
    assert runtime.meta['class_names'] == ['a', 'b', 'c']
    for preset, n_images, given in (('evaluate', 20, {}), ('visualize', 4, {'score_thresh': 0.2})):
        # one image at a time: a batch pads each image to the largest, which moves its scores
        expected = [[out[0] for out in model.predict([image], preset=preset, **given)]
                    for image in images[:n_images]]
        got = zip(*runtime.predict(images[:n_images], preset=preset, **given))
        assert sum(len(boxes) for boxes, _, _ in expected) > 2 * n_images
        assert [unmatched(e, g) for e, g in zip(expected, got)] == [0] * n_images


def ap_table(text):
    return [line for line in text.splitlines() if line.startswith(('circle', 'square',
                                                                  'triangle', 'mAP'))]


@pytest.mark.slow
def test_quick_start_checkpoint_same_test_map_and_detections_through_onnx(
        quickstart_run, toy_cache, tmp_path, monkeypatch, capsys):
    """The README's commands: export the quick start's best.pt, then eval and detect with
    --onnx print the same AP table and write the same detections as with --load-path."""
    monkeypatch.setenv('FRCNN_CACHE', str(toy_cache))  # its toy data
    checkpoint, path = quickstart_run / 'best.pt', tmp_path / 'model.onnx'
    main(['export', f'--load-path={checkpoint}', f'--out={path}'])
    capsys.readouterr()
    tables = []
    for model in (f'--load-path={checkpoint}', f'--onnx={path}'):
        main(['eval', model])
        tables.append(ap_table(capsys.readouterr().out))
    assert len(tables[0]) == 8 and tables[0][3].split()[1] == tables[1][3].split()[1]
    assert [line[:-1] for line in tables[0]] == [line[:-1] for line in tables[1]]  # 3 digits

    images = sorted(toy_cache.rglob('*.jpg'))[:6]
    records = []
    for model in (f'--load-path={checkpoint}', f'--onnx={path}'):
        out = tmp_path / model[2:6]
        main(['detect', model, *map(str, images), f'--out-dir={out}', '--preset=evaluate'])
        records.append(json.loads((out / 'detections.json').read_text()))
        assert len(list(out.glob('*.png'))) == 6
    for ours, theirs in zip(*records):
        columns = [(torch.tensor([d['bbox'] for d in r['detections']]).reshape(-1, 4),
                    torch.tensor([ord(d['label'][0]) for d in r['detections']]),
                    torch.tensor([d['score'] for d in r['detections']])) for r in (ours, theirs)]
        assert unmatched(*columns) == 0
    assert sum(len(record['detections']) for record in records[0]) > 10


def test_without_onnxruntime_export_says_what_to_install(monkeypatch, trained_run, tmp_path):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails
    with pytest.raises(ValueError, match=r'pip install -r requirements-onnx\.txt'):
        require_onnx()
    with pytest.raises(SystemExit) as stop:
        main(['export', f'--load-path={trained_run / "best.pt"}', f'--out={tmp_path / "m.onnx"}'])
    assert str(stop.value).startswith('error: ONNX export and --onnx need onnx and onnxruntime')
    assert not (tmp_path / 'm.onnx').exists()


def test_onnx_refuses_options_baked_into_the_file(trained_run, tmp_path):
    """Options the graph fixed at export are refused by name; thresholds are inputs, kept."""
    path = tmp_path / 'model.onnx'
    main(['export', f'--load-path={trained_run / "best.pt"}', f'--out={path}'])
    for option in ('--min-size=300', '--backend=torchvision', '--amp=true'):
        with pytest.raises(SystemExit, match=f'{option.split("=")[0]} does not apply to '):
            main(['eval', f'--onnx={path}', option])
    with pytest.raises(SystemExit, match='either --load-path=CHECKPOINT or --onnx=FILE'):
        main(['eval', f'--onnx={path}', f'--load-path={trained_run / "best.pt"}'])


def test_benchmark_prints_both_times(capsys):
    """misc/benchmark_onnx.py on a tiny image: one row per side, in ms, and their ratio."""
    from misc.benchmark_onnx import main as benchmark
    benchmark(height=96, width=128, repeat=2, warmup=0, extractor='small', n_class=2)
    out = capsys.readouterr().out
    rows = re.findall(r'^\| (ours \(PyTorch\)|ONNX Runtime) \| (\d+) \[(\d+)-(\d+)\] \|', out,
                      re.M)
    assert [row[0] for row in rows] == ['ours (PyTorch)', 'ONNX Runtime']
    assert all(int(low) <= int(median) <= int(high) for _, median, low, high in rows)
    assert re.search(r'^ONNX Runtime / ours: \d+\.\d\d ', out, re.M)
