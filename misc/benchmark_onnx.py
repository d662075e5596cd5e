"""Inference time of the exported ONNX file in ONNX Runtime beside ours in PyTorch, on the CPU.

The detector (VGG16 by default, random weights, 20 classes) is built as `train.py eval` runs
it (the speed switch on), exported with utils.export, and both predict on the same image in
turns (ours, ONNX Runtime, ours, ...), so that load from other processes hits both alike.
Both run the whole of predict: resize, network, proposals, NMS, per-class boxes. The image is
min-size x max-size px, so that the resize keeps its size.

    python misc/benchmark_onnx.py                        # VGG16, 600x800, 5 runs
    python misc/benchmark_onnx.py --extractor=resnet50_fpn --repeat=10
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.faster_rcnn import ModelOptions, build_faster_rcnn  # noqa: E402
from model.ops.speed import keep_freed_memory, speed_up  # noqa: E402
from utils.export import OnnxDetector, export_onnx, require_onnx  # noqa: E402
from utils.run import run_command  # noqa: E402


def main(height=600, width=800, repeat=5, warmup=1, extractor='vgg16', n_class=20, seed=0):
    """Prints the median [min-max] milliseconds per image of both, and their ratio."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f'repeat must be >= 1 and warmup >= 0, got {repeat} and {warmup}')
    require_onnx()
    keep_freed_memory()  # as train.py runs ours
    torch.manual_seed(seed)
    options = ModelOptions(extractor, min_size=min(height, width), max_size=max(height, width))
    model = build_faster_rcnn(n_class, options).eval()
    image = torch.rand(3, height, width) * 255
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'model.onnx'
        start = time.perf_counter()
        export_onnx(model, path, class_names=[str(k) for k in range(n_class)])
        print(f'export: {time.perf_counter() - start:.1f} s, {path.stat().st_size / 2**20:.0f} MiB')
        runtime = OnnxDetector(path)
    speed_up(model)
    steps = {'ours (PyTorch)': lambda: model.predict([image]),
             'ONNX Runtime': lambda: runtime.predict([image])}
    times = {name: [] for name in steps}
    for run in range(warmup + repeat):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if run >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    print(f'{extractor}, 1 x {height}x{width} on the CPU, {torch.get_num_threads()} threads, '
          f'median [min-max] ms of {repeat} runs, torch {torch.__version__}, '
          f'onnxruntime {require_onnx()[1].__version__}')
    print('\n| predict | ms | images/s |\n|---|---|---|')
    for name, values in times.items():
        median = statistics.median(values)
        print(f'| {name} | {median:.0f} [{min(values):.0f}-{max(values):.0f}] '
              f'| {1e3 / median:.2f} |')
    ratio = statistics.median(o / t for o, t in zip(*times.values()))
    print(f'\nONNX Runtime / ours: {1 / ratio:.2f} (median of the per-pair ratios)')


if __name__ == '__main__':
    run_command(main)
