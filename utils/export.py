"""ONNX export: the detector as predict runs it, one graph from an image to its detections,
and the runner that predicts with such a file through ONNX Runtime.

The graph's inputs: image (3, H, W) float32 RGB 0..255 of any size (H and W are dynamic: one
file serves every size; cast a uint8 image to float32), score_thresh and nms_thresh (float32
scalars) and max_per_image (an int64 scalar): predict's thresholds, so that one file serves
both presets. Its outputs: boxes (K, 4) float32 x_min y_min x_max y_max in the image's pixels,
labels (K,) int64 and scores (K,) float32, highest score first. Inside it: the resize,
normalisation, extractor, RPN, proposals (ONNX NonMaxSuppression), RoI pooling (MaxRoiPool or
RoiAlign), the head and the class-wise NMS. The file's metadata holds, as JSON, the class
names, the run's options, the COCO category ids and the 'evaluate' preset's thresholds.

The graph is traced (torch.onnx.export's TorchScript exporter) from DetectorGraph, which
runs the model's own forward and _postprocess, as predict does, on one image with every size
a tensor: traced Python ints would be frozen at the example image's values. Two steps are
its own: the resize is two interpolation matrices (ONNX's antialiased Resize filters
differently from torch's), and the detections' NMS takes its threshold as an input
(torchvision's ONNX NMS, which the proposals' fixed-threshold NMS traces to, freezes it).
"""
import json
import os
import warnings

import numpy as np
import torch
import torchvision
from torch import nn

from model.faster_rcnn import MAX_PER_IMAGE, VISUALIZE
from model.ops.speed import speed_up
from model.transform import normalize
from utils.checkpoint import load_checkpoint, load_detector

OPSET = 18
INPUTS, OUTPUTS = ('image', 'score_thresh', 'nms_thresh', 'max_per_image'), ('boxes', 'labels',
                                                                           'scores')
# The options the graph holds fixed: changing one needs another export.
EXPORTED = ('min_size', 'max_size', 'backend', 'n_test_pre_nms', 'n_test_post_nms', 'amp',
            'device', 'compile')


class _NMS(torch.autograd.Function):
    """torchvision.ops.nms, exported as ONNX NonMaxSuppression with the threshold an input."""

    @staticmethod
    def forward(ctx, boxes, scores, thresh):
        return torchvision.ops.nms(boxes, scores, float(thresh))

    @staticmethod
    def symbolic(g, boxes, scores, thresh):
        def const(*values):
            return g.op('Constant', value_t=torch.tensor(values))
        # one batch, one class: boxes (1, R, 4), scores (1, 1, R); thresh a 1-element input
        boxes, scores = g.op('Unsqueeze', boxes, const(0)), g.op('Unsqueeze', scores, const(0, 1))
        selected = g.op('NonMaxSuppression', boxes, scores, const(1 << 30),
                        g.op('Reshape', thresh, const(1)))  # (K, 3): batch, class, box
        return g.op('Squeeze', g.op('Gather', selected, const(2), axis_i=1), const(1))


def batched_nms(boxes, scores, groups, thresh):
    """NMS within each group at once, as torchvision.ops.batched_nms does it: groups are moved
    apart by their index times the largest coordinate + 1 (the boxes are clipped, >= 0)."""
    largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()  # 0 if there are none
    return _NMS.apply(boxes + (groups.to(boxes.dtype) * (largest + 1))[:, None], scores, thresh)


def resize_matrix(in_size, out_size):
    """(out_size, in_size) float32 matrix that resizes one axis as torch's bilinear
    interpolation with antialias does: a triangle filter whose half-width is max(1, in / out)
    input pixels, centred on each output pixel's centre, normalised to sum 1."""
    scale = in_size / out_size
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # (out,)
    distance = torch.arange(in_size, dtype=torch.float64) + 0.5 - centre[:, None]  # (out, in)
    weight = (1 - (distance / scale.clamp(min=1)).abs()).clamp(min=0)
    return (weight / weight.sum(1, keepdim=True)).float()


class DetectorGraph(nn.Module):
    """FasterRCNN.predict for one image, with the sizes tensors and the thresholds inputs (see
    the module docstring); traced by export_onnx, and runnable as it is."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, image, score_thresh, nms_thresh, max_per_image):
        model, transform = self.model, self.model.transform
        size = torch.stack([torch.as_tensor(s) for s in image.shape[1:]]).double()  # (H, W)
        scale = torch.minimum(transform.min_size / size.min(), transform.max_size / size.max())
        new_size = (size * scale).round()
        image = resize_matrix(size[0], new_size[0]) @ image @ resize_matrix(size[1],
                                                                            new_size[1]).T
        batch = normalize(image, transform.normalization)[None]  # (1, 3, H', W')
        roi_cls_locs, roi_scores, rois, roi_indices = model(batch, new_size[None], scale[None])
        bboxes, labels, scores = model._postprocess(
            roi_cls_locs, roi_scores, rois, roi_indices, new_size[None], size[None],
            score_thresh, nms_thresh, max_per_image, nms=batched_nms)
        return bboxes[0], labels[0], scores[0]  # of the one image


def require_onnx():
    """onnx and onnxruntime, or a ValueError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ValueError('ONNX export and --onnx need onnx and onnxruntime (pip install -r '
                         'requirements-onnx.txt)') from e
    return onnx, onnxruntime


def export_checkpoint(load_path, out):
    """export_onnx of a checkpoint's detector, with its class names, config and category ids."""
    state = load_checkpoint(load_path, required=('model', 'class_names', 'config'))
    export_onnx(load_detector(state)[0], out, class_names=state['class_names'],
                config=state['config'], category_ids=state.get('category_ids'))


def export_onnx(model, path, example_size=(480, 640), **meta):
    """Writes the detector (moved to the CPU in float32, the speed switch off) to the ONNX file
    path (see the module docstring) and checks it with onnx.checker. meta: what the file's
    metadata keeps, as JSON (the checkpoint's class_names, config and category_ids), beside
    the 'evaluate' preset's thresholds."""
    onnx, _ = require_onnx()
    graph = DetectorGraph(speed_up(model.float().cpu(), False))  # plain modules: traceable
    example = (torch.rand(3, *example_size) * 255, torch.tensor(0.05), torch.tensor(0.3),
               torch.tensor(MAX_PER_IMAGE))  # any values: the graph takes them as inputs
    dynamic = {'image': {1: 'height', 2: 'width'}, **{k: {0: 'detections'} for k in OUTPUTS}}
    with warnings.catch_warnings():  # the tracer's, on the shape checks it keeps as they are
        warnings.simplefilter('ignore')
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=dynamic)
    proto = onnx.load(str(path))
    meta['evaluate'] = graph.model.presets['evaluate']
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


class OnnxDetector:
    """An exported file in ONNX Runtime on the CPU, with FasterRCNN.predict's interface (what
    evaluate and detect call). meta: the file's metadata (see export_onnx)."""

    def __init__(self, path):
        _, ort = require_onnx()
        if not os.path.isfile(path):
            raise ValueError(f'no ONNX file at {path}')
        try:
            self.session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
            self.meta = {k: json.loads(v) for k, v in
                         self.session.get_modelmeta().custom_metadata_map.items()}
            self.n_class = len(self.meta['class_names']) + 1
            self.presets = {'evaluate': self.meta['evaluate'], 'visualize': VISUALIZE}
        except Exception as e:  # onnxruntime's own error types, or metadata missing
            raise ValueError(f'{path} is not a detector that train.py export wrote '
                             f'({type(e).__name__}: {str(e).strip().splitlines()[0]})') from e

    def predict(self, images, preset='evaluate', **overrides):
        """As FasterRCNN.predict on a list of images (float32 on the CPU)."""
        params = {'max_per_image': MAX_PER_IMAGE, **self.presets[preset], **overrides}
        inputs = {k: np.array(params[k], 'int64' if k == 'max_per_image' else 'float32')
                  for k in INPUTS[1:]}
        outputs = [self.session.run(None, {'image': img.float().cpu().numpy(), **inputs})
                   for img in images]
        return tuple([torch.from_numpy(out[k]) for out in outputs] for k in range(3))
