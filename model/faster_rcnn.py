"""Faster R-CNN: one module from image to boxes, and from image and boxes to the four losses.

Paper: Ren et al. 2015, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal
Networks", figure 2: a backbone computes features once; the Region Proposal Network (RPN)
proposes boxes on them; the RoI head pools each proposal's features, classifies it and refines
its box. Training adds the figure's other half: targets for the RPN's anchors and for a
sample of proposals, and a loss for each of the four outputs (eq. 1).

Read the stages in this order: transform.py (resize, normalise), backbones/, boxes.py
(anchors, eq. 2), rpn.py, roi_head.py (with ops/ for NMS and RoI pooling), then targets.py and
losses.py (training), and this file, which composes them.

Feature Pyramid Network (Lin et al. 2017): the same detector on a list of feature maps P2..P6
(backbones/fpn.py). The RPN slides over every level with one anchor size per level (a C4
backbone is a pyramid of one level), and each RoI is pooled from the level of its size
(PyramidRoIAlign at the end of roi_head.py); targets, losses and this file are the same.

Notation: N images, K anchors per image (H * W * A), R proposals over the batch, S sampled
RoIs, C classes with background at 0 (n_class), n_fg_class = C - 1.

Glossary (the names used throughout model/):
    anchor         (K, 4) reference boxes at every feature-map location (boxes.py)
    loc            a box as (dx, dy, dw, dh) relative to a reference box, eq. 2 (the paper's t)
    rpn_locs       (N, K, 4) the RPN's predicted loc of each anchor
    rpn_scores     (N, K, 2) the RPN's objectness logits (background, foreground)
    rois           (R, 4) proposals: anchors moved by rpn_locs, clipped, after NMS; the RoI
                   head's input at test time. "proposal" and "RoI" name the same boxes.
    roi_indices    (R,) the image each RoI belongs to
    sample_rois    (S, 4) the RoIs sampled for training the head (targets.py), gt boxes among
                   them; sample_indices (S,) their images
    gt_*           ground truth: gt_bboxes / gt_labels given, gt_rpn_locs / gt_rpn_labels and
                   gt_roi_locs / gt_roi_labels the targets built from them
    roi_cls_locs   (R, C * 4) the head's loc of each RoI for every class (divided by loc std)
    roi_scores     (R, C) the head's class logits
Labels: predict returns 0..n_fg_class-1, the datasets' labels; inside the head 0 is background
and dataset class k is k + 1.
"""
import dataclasses
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from model.backbones import FEAT_STRIDE, build_backbone
from model.boxes import generate_anchor_base, loc2bbox
from model.losses import roi_losses, rpn_losses
from model.ops import RoIAlign, RoIPool, batched_non_maximum_suppression
from model.roi_head import PyramidRoIAlign, RoIHead
from model.rpn import ProposalCreator, RegionProposalNetwork
from model.targets import AnchorTargetCreator, ProposalTargetCreator
from model.transform import ImageTransform

LOSS_NAMES = ('rpn_loc_loss', 'rpn_cls_loss', 'roi_loc_loss', 'roi_cls_loss')
# predict's 'visualize' thresholds: only confident boxes. 'evaluate' is the paper's test
# setting, FasterRCNN's eval_score_thresh and eval_nms_thresh.
VISUALIZE = dict(score_thresh=0.7, nms_thresh=0.3)
MAX_PER_IMAGE = 100  # detections kept per image, as the Caffe code's VOC evaluation keeps


class FasterRCNN(nn.Module):
    """Backbone, RPN and RoI head composed into one detector, with its training targets.

    Args:
        extractor: images (N, 3, H, W) -> features (N, C_feat, H / 16, W / 16).
        rpn: a RegionProposalNetwork.
        head: an RoIHead; its ``n_class`` counts the background.
        transform: the ImageTransform predict applies to original images.
        anchor_target_creator, proposal_target_creator: the training targets (targets.py).
        rpn_sigma, roi_sigma: the smooth L1 sigmas of the two box losses (losses.py).
        eval_score_thresh, eval_nms_thresh: predict's 'evaluate' thresholds.
        backend: 'auto' | 'cupy' | 'torchvision', for the NMS in predict.
    """

    def __init__(self, extractor, rpn, head, transform=None, anchor_target_creator=None,
                 proposal_target_creator=None, rpn_sigma=3.0, roi_sigma=1.0,
                 eval_score_thresh=0.05, eval_nms_thresh=0.3, backend='auto'):
        super().__init__()
        self.extractor, self.rpn, self.head = extractor, rpn, head
        self.n_class = head.n_class  # classes with the background
        self.transform = transform or ImageTransform()
        self.anchor_target_creator = anchor_target_creator or AnchorTargetCreator()
        self.proposal_target_creator = proposal_target_creator or ProposalTargetCreator()
        # backend: for predict's NMS; the RPN and the head hold their own
        self.rpn_sigma, self.roi_sigma, self.backend = rpn_sigma, roi_sigma, backend
        evaluate = dict(score_thresh=eval_score_thresh, nms_thresh=eval_nms_thresh)
        self.presets = {'evaluate': evaluate, 'visualize': VISUALIZE}
        # predict decodes the head's locs with the std its targets were divided by
        std = self.proposal_target_creator.loc_normalize_std
        self.register_buffer('loc_normalize_std', torch.tensor(std), persistent=False)

    def forward(self, images, img_sizes, scales, gt_bboxes=None, gt_labels=None, generator=None):
        """The figure: features, proposals, and the head's scores and locs for each proposal;
        with ground truth, the four losses instead.

        Args:
            images: (N, 3, H, W) normalised, padded images.
            img_sizes: N (height, width) true input sizes; scales: N resize factors.
            gt_bboxes, gt_labels: N tensors (G_i, 4) in input pixels and (G_i,) in
                0..n_fg_class-1, on the images' device; None at test time.
            generator: drives the sampling of the training targets.

        Returns:
            Without ground truth: roi_cls_locs (R, C * 4), roi_scores (R, C), rois (R, 4),
            roi_indices (R,). With it: a dict of the four float32 losses (LOSS_NAMES) and
            their sum, 'total_loss'.
        """
        features = self.extractor(images)  # (N, C_feat, H / 16, W / 16), or a pyramid's list
        rpn_locs, rpn_scores, rois, roi_indices, anchor = self.rpn(features, img_sizes, scales)
        if gt_bboxes is None:
            roi_cls_locs, roi_scores = self.head(features, rois, roi_indices)
            return roi_cls_locs, roi_scores, rois, roi_indices

        gt_rpn_locs, gt_rpn_labels, sample_rois, sample_indices, gt_roi_locs, gt_roi_labels = (
            self.targets(anchor, rois, roi_indices, img_sizes, gt_bboxes, gt_labels, generator))
        roi_cls_locs, roi_scores = self.head(features, sample_rois, sample_indices)
        # The four losses of eq. 1, in LOSS_NAMES order; the RPN's over all N * K anchors.
        losses = dict(zip(LOSS_NAMES, (
            *rpn_losses(rpn_locs.reshape(-1, 4), rpn_scores.reshape(-1, 2), gt_rpn_locs,
                        gt_rpn_labels, self.rpn_sigma),
            *roi_losses(roi_cls_locs, roi_scores, gt_roi_locs, gt_roi_labels, self.roi_sigma))))
        losses['total_loss'] = sum(losses.values())
        return losses

    def targets(self, anchor, rois, roi_indices, img_sizes, gt_bboxes, gt_labels, generator):
        """Training targets of the batch: for the RPN, every anchor of every image, (N*K, 4)
        locs and (N*K,) labels; for the head, S sampled RoIs (S, 4), their images (S,), locs
        (S, 4) and labels (S,). See targets.py."""
        targets = []  # per image: the six targets in the order returned
        for i, (gt_bbox, gt_label) in enumerate(zip(gt_bboxes, gt_labels, strict=True)):
            rpn_loc, rpn_label = self.anchor_target_creator(gt_bbox, anchor, img_sizes[i],
                                                            generator)
            roi, loc, label = self.proposal_target_creator(rois[roi_indices == i], gt_bbox,
                                                           gt_label, generator)
            targets.append((rpn_loc, rpn_label, roi, torch.full_like(label, i), loc, label))
        return tuple(torch.cat(column) for column in zip(*targets))

    @torch.no_grad()
    def predict(self, images, sizes=None, preset='evaluate', **overrides):
        """Detects objects in images at their original size.

        Args:
            images: a list of (3, H_i, W_i) float32 RGB 0..255 tensors, or an (N, 3, H, W)
                batch of such images zero-padded, with ``sizes`` giving each one's (H_i, W_i).
            preset: 'evaluate' (the paper's test thresholds) or 'visualize' (confident boxes
                only); ``overrides`` replaces its score_thresh, nms_thresh or max_per_image.

        Returns:
            Three lists over images: bboxes (K, 4) float32 x_min y_min x_max y_max in original
            pixels, labels (K,) int64 in 0..C-2, scores (K,) float32, highest score first.
        """
        params = {'max_per_image': MAX_PER_IMAGE, **self.presets[preset], **overrides}
        if sizes is not None:
            images = [img[:, :h, :w] for img, (h, w) in zip(images, sizes)]
        device = next(self.parameters()).device
        images = [img.to(device=device, dtype=torch.float32) for img in images]
        was_training = self.training
        self.eval()  # predict leaves the module as it found it
        try:
            batch, input_sizes, scales = self.transform(images)
            roi_cls_locs, roi_scores, rois, roi_indices = self(batch, input_sizes, scales)
        finally:
            self.train(was_training)
        orig_sizes = [tuple(img.shape[1:]) for img in images]
        return self._postprocess(roi_cls_locs.float(), roi_scores.float(), rois, roi_indices,
                                 input_sizes, orig_sizes, **params)

    def _postprocess(self, roi_cls_locs, roi_scores, rois, roi_indices, input_sizes, orig_sizes,
                     score_thresh, nms_thresh, max_per_image, nms=None):
        """Per-class boxes and probabilities -> thresholded, clipped to the input image and
        scaled to the original, class-wise NMS: predict's per-image lists.

        input_sizes, orig_sizes: N (H, W) pairs, or (N, 2) tensors (the ONNX export's, which
        a trace keeps dynamic). nms: (bbox (K, 4), score (K,), group (K,), thresh) -> (K',)
        the indices NMS keeps within each group, highest score first; None takes
        batched_non_maximum_suppression on the model's backend (the export passes one whose
        threshold is a graph input).
        """
        n_fg = roi_scores.shape[1] - 1  # C - 1
        loc = roi_cls_locs.unflatten(1, (-1, 4))[:, 1:] * self.loc_normalize_std  # (R, C-1, 4)
        bbox = loc2bbox(rois[:, None].expand_as(loc).reshape(-1, 4), loc.reshape(-1, 4))
        prob = F.softmax(roi_scores, dim=1)[:, 1:].reshape(-1)  # (R*(C-1),), background dropped

        keep = (prob > score_thresh).nonzero()[:, 0]  # (K,) each RoI * (C-1) + its class
        bbox, prob, label, image = bbox[keep], prob[keep], keep % n_fg, roi_indices[keep // n_fg]
        # Each box clipped to its image's input size, then scaled to the original's pixels.
        in_size, out_size = (torch.as_tensor(sizes, dtype=torch.float64, device=bbox.device)
                             .flip(1).repeat(1, 2) for sizes in (input_sizes, orig_sizes))
        bbox = bbox.clamp(min=0).minimum(in_size.float()[image])  # in_size: (N, 4) W H W H
        bbox = bbox * (out_size / in_size).float()[image]  # the ratio in float64, as resize_bbox
        nms = nms or partial(batched_non_maximum_suppression, backend=self.backend)
        # Class-wise NMS for all images in one call: each (image, class) pair is its own group.
        kept = nms(bbox, prob, image * n_fg + label, nms_thresh)  # highest score first
        per_image = [kept[image[kept] == i][:max_per_image] for i in range(len(input_sizes))]
        return tuple([values[mine] for mine in per_image] for values in (bbox, label, prob))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, with a clear error when the class counts differ."""
        key = 'head.score.weight'
        if key in state_dict and state_dict[key].shape[0] != self.n_class:
            raise ValueError(f'the weights are for {state_dict[key].shape[0] - 1} classes, '
                             f'the model has {self.n_class - 1}')
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@dataclasses.dataclass
class ModelOptions:
    """What shapes a detector: build_faster_rcnn's options, which a checkpoint stores so that
    the model can be rebuilt from the file. None takes the extractor's default, else the
    paper's (EXTRACTOR_DEFAULTS, PAPER_DEFAULTS).

    Attributes:
        extractor: the backbone: vgg16 (the paper's), small (a few convs, for the toy data),
            resnet50, resnet101, mobilenet_v3 (C4), resnet50_fpn, resnet101_fpn, small_fpn
            (feature pyramid)
        min_size: short side of the input after resizing (paper: 600)
        max_size: long side of the input at most (paper: 1000)
        normalization: caffe (BGR, 0..255, pixel means subtracted) for the caffe VGG16,
            torchvision (RGB, ImageNet mean and std) for torchvision's weights
        anchor_scales: anchor sides are stride * scale * sqrt(ratio) (paper: 8 16 32)
        anchor_ratios: anchor heights / widths
        backend: NMS and RoI pooling: auto (CuPy kernels on CUDA where CuPy works, else
            torchvision.ops), cupy or torchvision
        rpn_n_sample: anchors sampled per image for the RPN's losses
        rpn_pos_iou_thresh: an anchor with this IoU with a gt box is positive
        rpn_neg_iou_thresh: an anchor whose best IoU is under this is negative
        rpn_pos_ratio: at most this fraction of the sampled anchors is positive
        rpn_nms_thresh: the IoU over which NMS drops a proposal
        n_train_pre_nms: proposals kept before NMS in training, per level (paper: 12000)
        n_train_post_nms: proposals kept after NMS in training (paper: 2000)
        n_test_pre_nms: proposals kept before NMS at test time, per level (paper: 6000)
        n_test_post_nms: proposals kept after NMS at test time (paper: 300)
        rpn_min_size: proposals under this many pixels (original scale) are dropped (paper: 16)
        roi_n_sample: RoIs sampled per image for the head's losses (paper: 128)
        roi_pos_ratio: at most this fraction of the sampled RoIs is positive
        roi_pos_iou_thresh: a RoI with this IoU with a gt box is positive
        roi_neg_iou_thresh_hi: a RoI whose best IoU is under this is background ...
        roi_neg_iou_thresh_lo: ... if it is at least this
        rpn_sigma: smooth L1 sigma of the RPN's box loss (its targets are finer)
        roi_sigma: smooth L1 sigma of the head's box loss
        eval_score_thresh: detections scoring above this are kept (evaluation, eval)
        eval_nms_thresh: class-wise NMS of the detections (paper: 0.3)
    """
    extractor: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    normalization: str | None = None
    anchor_scales: tuple[float, ...] | None = None
    anchor_ratios: tuple[float, ...] = (0.5, 1, 2)
    backend: str = 'auto'
    rpn_n_sample: int = 256
    rpn_pos_iou_thresh: float = 0.7
    rpn_neg_iou_thresh: float = 0.3
    rpn_pos_ratio: float = 0.5
    rpn_nms_thresh: float = 0.7
    n_train_pre_nms: int | None = None
    n_train_post_nms: int | None = None
    n_test_pre_nms: int | None = None
    n_test_post_nms: int | None = None
    rpn_min_size: int | None = None
    roi_n_sample: int | None = None
    roi_pos_ratio: float = 0.25
    roi_pos_iou_thresh: float = 0.5
    roi_neg_iou_thresh_hi: float = 0.5
    roi_neg_iou_thresh_lo: float = 0.0
    rpn_sigma: float = 3.0
    roi_sigma: float = 1.0
    eval_score_thresh: float = 0.05
    eval_nms_thresh: float | None = None

    def __post_init__(self):
        self.extractor = self.extractor or PAPER_DEFAULTS['extractor']
        for name, value in {**PAPER_DEFAULTS, **EXTRACTOR_DEFAULTS.get(self.extractor, {})}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)


PAPER_DEFAULTS = dict(extractor='vgg16', min_size=600, max_size=1000, normalization='torchvision',
                      anchor_scales=(8, 16, 32), n_train_pre_nms=12000, n_train_post_nms=2000,
                      n_test_pre_nms=6000, n_test_post_nms=300, rpn_min_size=16,
                      roi_n_sample=128, eval_nms_thresh=0.3)
# With a pyramid, torchvision's fasterrcnn_resnet50_fpn (Detectron's and mmdetection's alike):
# the n_*_pre_nms best proposals of each level, 512 RoIs per image, detections NMS at 0.5, no
# min proposal size, one anchor size per level (32 px on P2 to 512 on P6), COCO's image sizes.
PYRAMID_DEFAULTS = dict(anchor_scales=(8,), n_train_pre_nms=2000, n_train_post_nms=2000,
                        n_test_pre_nms=1000, n_test_post_nms=1000, rpn_min_size=0,
                        roi_n_sample=512, eval_nms_thresh=0.5)
EXTRACTOR_DEFAULTS = {
    'resnet50_fpn': dict(PYRAMID_DEFAULTS, min_size=800, max_size=1333),
    'resnet101_fpn': dict(PYRAMID_DEFAULTS, min_size=800, max_size=1333),
    # anchors of 16 px on P2 to 256 on P6, and the paper's RoI counts: a few objects per image
    'small_fpn': dict(PYRAMID_DEFAULTS, anchor_scales=(4,), roi_n_sample=128, n_test_post_nms=300),
}


def build_faster_rcnn(n_fg_class, options=None, weights=None):
    """The whole detector for ``n_fg_class`` foreground classes: a plain nn.Module.

    options: a ModelOptions (None: the paper's VGG16); weights: the backbone's pre-trained
    weights, a file or 'imagenet' (see backbones/base.py), None for random ones.
    """
    opt = options or ModelOptions()
    backbone = build_backbone(opt.extractor, weights)
    if len(backbone.strides) > 1:  # a feature pyramid: P2..P6 for the RPN, P2..P5 for RoIs
        # Anchors centred on their cell's corner, sides rounded to whole pixels, as in
        # torchvision and Detectron: ResNet's strided convs centre cell x on input pixel
        # x * stride (VGG16's 2x2 pools put it half a stride further: the C4 anchors' offset).
        bases = [(generate_anchor_base(s, opt.anchor_ratios, opt.anchor_scales) - s / 2).round()
                 for s in backbone.strides]
        pool = PyramidRoIAlign(backbone.roi_size, backbone.strides[:-1], backend=opt.backend)
    else:
        bases = [generate_anchor_base(FEAT_STRIDE, opt.anchor_ratios, opt.anchor_scales)]
        # RoI max pooling, or RoIAlign with its defaults: aligned, adaptive sampling
        pool = (RoIPool(backbone.roi_size, backbone.roi_size, 1 / FEAT_STRIDE, opt.backend)
                if backbone.roi_op == 'pool' else
                RoIAlign(backbone.roi_size, 1 / FEAT_STRIDE, backend=opt.backend))
    proposals = ProposalCreator(opt.rpn_nms_thresh, opt.n_train_pre_nms, opt.n_train_post_nms,
                                opt.n_test_pre_nms, opt.n_test_post_nms, opt.rpn_min_size,
                                opt.backend)
    rpn = RegionProposalNetwork(backbone.channels, backbone.channels, bases, backbone.strides,
                                proposals)
    head = RoIHead(n_fg_class + 1, pool, backbone.classifier, backbone.features)
    return FasterRCNN(
        backbone.extractor, rpn, head,
        ImageTransform(opt.min_size, opt.max_size, opt.normalization),
        AnchorTargetCreator(opt.rpn_n_sample, opt.rpn_pos_iou_thresh, opt.rpn_neg_iou_thresh,
                            opt.rpn_pos_ratio),
        ProposalTargetCreator(opt.roi_n_sample, opt.roi_pos_ratio, opt.roi_pos_iou_thresh,
                              opt.roi_neg_iou_thresh_hi, opt.roi_neg_iou_thresh_lo),
        opt.rpn_sigma, opt.roi_sigma, opt.eval_score_thresh, opt.eval_nms_thresh, opt.backend)
