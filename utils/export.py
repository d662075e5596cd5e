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
reruns FasterRCNN.predict's steps for one image with every size a tensor: traced Python ints
would be frozen at the example image's values. Two steps are rewritten for ONNX: the resize
is two interpolation matrices (ONNX's antialiased Resize filters differently from torch's),
and NMS takes its threshold as an input (torchvision's ONNX NMS freezes it).
"""
import json
import os
import warnings

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.ops import clip_boxes_to_image

from model.boxes import enumerate_shifted_anchors, loc2bbox
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


def batched_nms(boxes, scores, groups, thresh, size):
    """NMS within each group at once: groups are moved apart by their index times the image's
    longer side + 1 (boxes are clipped to the image of size (H, W)), as
    torchvision.ops.batched_nms does."""
    offsets = groups.to(boxes.dtype) * (size.max().to(boxes.dtype) + 1)
    return _NMS.apply(boxes + offsets[:, None], scores, thresh)


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
    """FasterRCNN.predict for one image, with the thresholds as inputs (see the module
    docstring); traced by export_onnx, and runnable as it is (tests compare it to predict)."""

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
        features = model.extractor(normalize(image, transform.normalization)[None])
        pyramid = [features] if isinstance(features, torch.Tensor) else features
        rois = self.proposals(pyramid, new_size, scale)
        roi_cls_locs, roi_scores = model.head(features, rois, torch.zeros_like(rois[:, 0]))
        # the class-wise boxes and probabilities, as FasterRCNN._postprocess
        loc = roi_cls_locs.unflatten(1, (-1, 4))[:, 1:] * model.loc_normalize_std
        bbox = loc2bbox(rois[:, None].expand_as(loc).reshape(-1, 4), loc.reshape(-1, 4))
        prob = F.softmax(roi_scores, dim=1)[:, 1:].reshape(-1)
        keep = (prob > score_thresh).nonzero()[:, 0]
        bbox, prob, label = bbox[keep], prob[keep], keep % (roi_scores.shape[1] - 1)
        bbox = clip_boxes_to_image(bbox, new_size) * (size / new_size).float().flip(0).repeat(2)
        kept = batched_nms(bbox, prob, label, nms_thresh, size)[:max_per_image]
        return bbox[kept], label[kept], prob[kept]

    def proposals(self, features, size, scale):
        """The RPN's proposals (R, 4) at test time, as RegionProposalNetwork and
        ProposalCreator make them: the best n_test_pre_nms anchors of each level, decoded,
        clipped, small ones dropped, NMS over each level, the best n_test_post_nms."""
        rpn, creator = self.model.rpn, self.model.rpn.proposal_creator
        picked = []  # per level: boxes, scores, level
        for level, (feature, base, stride) in enumerate(zip(features, rpn.anchor_base,
                                                            rpn.strides)):
            hidden = F.relu(rpn.conv1(feature))
            loc = rpn.loc(hidden).permute(0, 2, 3, 1).reshape(-1, 4)
            score = F.softmax(rpn.score(hidden).permute(0, 2, 3, 1).reshape(-1, 2), dim=1)[:, 1]
            top = score.topk(torch.clamp(torch.as_tensor(score.shape[0]),
                                         max=creator.n_test_pre_nms)).indices
            anchor = enumerate_shifted_anchors(base, stride, *feature.shape[2:])
            picked.append((clip_boxes_to_image(loc2bbox(anchor[top], loc[top]), size),
                           score[top], torch.full_like(top, level)))
        boxes, scores, levels = (torch.cat(column) for column in zip(*picked))
        side = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = ((side >= creator.min_size * scale) & (side > 0)).nonzero()[:, 0]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        kept = batched_nms(boxes, scores, levels, torch.tensor(creator.nms_thresh), size)
        return boxes[kept[:creator.n_test_post_nms]]


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
