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
(backbones/fpn.py). What changes is at the end of rpn.py (the RPN on every level, one anchor
size per level, proposals chosen per level) and of roi_head.py (each RoI pooled from the level
of its size); targets, losses and this file are the same for both.

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
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import clip_boxes_to_image

from model.backbones import FEAT_STRIDE, build_backbone
from model.boxes import loc2bbox
from model.losses import roi_losses, rpn_losses
from model.ops import RoIAlign, RoIPool, batched_non_maximum_suppression
from model.ops.conv import fastest_layout, use_winograd
from model.roi_head import PyramidRoIAlign, RoIHead
from model.rpn import ProposalCreator, PyramidProposalCreator, PyramidRPN, RegionProposalNetwork
from model.targets import AnchorTargetCreator, ProposalTargetCreator
from model.transform import ImageTransform, resize_bbox

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
        memory_format: the layout the images are given to the extractor in, which the
            convolutions and the features follow (the RPN and RoI code index them the same in
            any layout); None: the device's fastest at each forward, ops.conv.fastest_layout
            (channels-last on CUDA and, under autocast, on AVX-512 CPUs; NCHW elsewhere).
            build_faster_rcnn takes the backbone's choice (NCHW for the small toy backbones).
        winograd: run the large 3x3 stride-1 convolutions as Winograd F(6x6, 3x3) where that
            is faster (ops.conv: NCHW float32 on x86 CPUs; VGG16's convs in 1.7 s instead of
            3.1 s on a 2-core AVX2 CPU, 0.62 s instead of 1.38 s on an AVX-512 one), as direct
            convolutions elsewhere.
    """

    def __init__(self, extractor, rpn, head, transform=None, anchor_target_creator=None,
                 proposal_target_creator=None, rpn_sigma=3.0, roi_sigma=1.0,
                 eval_score_thresh=0.05, eval_nms_thresh=0.3, backend='auto',
                 memory_format=None, winograd=True):
        super().__init__()
        self.extractor, self.rpn, self.head = extractor, rpn, head
        self.transform = transform or ImageTransform()
        self.anchor_target_creator = anchor_target_creator or AnchorTargetCreator()
        self.proposal_target_creator = proposal_target_creator or ProposalTargetCreator()
        self.rpn_sigma, self.roi_sigma = rpn_sigma, roi_sigma
        evaluate = dict(score_thresh=eval_score_thresh, nms_thresh=eval_nms_thresh)
        self.presets = {'evaluate': evaluate, 'visualize': VISUALIZE}
        self.backend = backend  # for predict's NMS; the RPN and head hold their own
        # predict decodes the head's locs with the std its targets were divided by
        std = self.proposal_target_creator.loc_normalize_std
        self.register_buffer('loc_normalize_std', torch.tensor(std), persistent=False)
        self.memory_format = memory_format
        if winograd:
            use_winograd(self)

    @property
    def n_class(self):
        return self.head.n_class

    def forward(self, images, img_sizes, scales, gt_bboxes=None, gt_labels=None,
                generator=None):
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
        layout = self.memory_format or fastest_layout(images.device)
        features = self.extractor(images.contiguous(memory_format=layout))
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
        rpn_targets, roi_targets = [], []
        for i, (gt_bbox, gt_label) in enumerate(zip(gt_bboxes, gt_labels, strict=True)):
            rpn_targets.append(self.anchor_target_creator(gt_bbox, anchor, img_sizes[i],
                                                          generator))
            roi, loc, label = self.proposal_target_creator(rois[roi_indices == i], gt_bbox,
                                                           gt_label, generator)
            roi_targets.append((roi, torch.full_like(label, i), loc, label))
        gt_rpn_locs, gt_rpn_labels = (torch.cat(column) for column in zip(*rpn_targets))
        return gt_rpn_locs, gt_rpn_labels, *(torch.cat(column) for column in zip(*roi_targets))

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
                     score_thresh, nms_thresh, max_per_image):
        """Per-class boxes and probabilities -> thresholded, class-wise NMS, per-image lists."""
        n_roi, n_class = roi_scores.shape
        n_fg = n_class - 1
        loc = roi_cls_locs.view(n_roi, n_class, 4)[:, 1:] * self.loc_normalize_std  # (R, C-1, 4)
        bbox = loc2bbox(rois[:, None].expand_as(loc).reshape(-1, 4), loc.reshape(-1, 4))
        prob = F.softmax(roi_scores, dim=1)[:, 1:].reshape(-1)  # (R*(C-1),), background dropped
        label = torch.arange(n_fg, device=prob.device).repeat(n_roi)  # (R*(C-1),)
        image = roi_indices.repeat_interleave(n_fg)  # (R*(C-1),)

        keep = prob > score_thresh
        bbox, prob, label, image = bbox[keep], prob[keep], label[keep], image[keep]
        for i, (input_size, orig_size) in enumerate(zip(input_sizes, orig_sizes)):
            mine = image == i
            bbox[mine] = resize_bbox(clip_boxes_to_image(bbox[mine], input_size), input_size,
                                     orig_size)
        # Class-wise NMS for all images in one call: each (image, class) pair is its own group.
        kept = batched_non_maximum_suppression(bbox, prob, image * n_fg + label, nms_thresh,
                                               backend=self.backend)  # highest score first
        bboxes, labels, scores = [], [], []
        for i in range(len(input_sizes)):
            mine = kept[image[kept] == i][:max_per_image]
            bboxes.append(bbox[mine])
            labels.append(label[mine])
            scores.append(prob[mine])
        return bboxes, labels, scores

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, with a clear error when the class counts differ."""
        key = 'head.score.weight'
        if key in state_dict and state_dict[key].shape[0] != self.n_class:
            raise ValueError(f'the weights are for {state_dict[key].shape[0] - 1} classes, '
                             f'the model has {self.n_class - 1}')
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_faster_rcnn(
        n_fg_class, extractor='vgg16', weights=None, *, anchor_scales=(8, 16, 32),
        anchor_ratios=(0.5, 1, 2), min_size=600, max_size=1000, normalization='torchvision',
        backend='auto', rpn_nms_thresh=0.7, n_train_pre_nms=12000, n_train_post_nms=2000,
        n_test_pre_nms=6000, n_test_post_nms=300, rpn_min_size=16, rpn_n_sample=256,
        rpn_pos_iou_thresh=0.7, rpn_neg_iou_thresh=0.3, rpn_pos_ratio=0.5, roi_n_sample=128,
        roi_pos_ratio=0.25, roi_pos_iou_thresh=0.5, roi_neg_iou_thresh_hi=0.5,
        roi_neg_iou_thresh_lo=0.0, rpn_sigma=3.0, roi_sigma=1.0, eval_score_thresh=0.05,
        eval_nms_thresh=0.3, memory_format=None, winograd=True):
    """The whole detector for ``n_fg_class`` foreground classes, with the paper's defaults.

    extractor: a backbone name (backbones.BACKBONES); weights: its pre-trained weights, a file
    or 'imagenet' (see backbones/base.py), None for random ones.
    Every keyword but memory_format and winograd (see FasterRCNN; memory_format None: the
    backbone's) is the Config field of the same name (utils/config.py says what each does), so
    that a checkpoint can store them and rebuild the model without the Config.
    """
    backbone = build_backbone(extractor, weights)
    counts = (rpn_nms_thresh, n_train_pre_nms, n_train_post_nms, n_test_pre_nms,
              n_test_post_nms, rpn_min_size, backend)
    size = backbone.roi_size
    if len(backbone.strides) > 1:  # a feature pyramid: P2..P6 for the RPN, P2..P5 for RoIs
        rpn = PyramidRPN(backbone.channels, backbone.channels, anchor_ratios, anchor_scales,
                         backbone.strides, PyramidProposalCreator(*counts))
        pool = PyramidRoIAlign(size, backbone.strides[:-1], backend=backend)
    else:
        rpn = RegionProposalNetwork(backbone.channels, backbone.channels, anchor_ratios,
                                    anchor_scales, FEAT_STRIDE, ProposalCreator(*counts))
        pool = (RoIPool(size, size, 1 / FEAT_STRIDE, backend) if backbone.roi_op == 'pool' else
                RoIAlign(size, 1 / FEAT_STRIDE, sampling_ratio=0, aligned=True, backend=backend))
    head = RoIHead(n_fg_class + 1, pool, backbone.classifier, backbone.features)
    return FasterRCNN(
        backbone.extractor, rpn, head, ImageTransform(min_size, max_size, normalization),
        AnchorTargetCreator(rpn_n_sample, rpn_pos_iou_thresh, rpn_neg_iou_thresh, rpn_pos_ratio),
        ProposalTargetCreator(roi_n_sample, roi_pos_ratio, roi_pos_iou_thresh,
                              roi_neg_iou_thresh_hi, roi_neg_iou_thresh_lo),
        rpn_sigma, roi_sigma, eval_score_thresh, eval_nms_thresh, backend,
        memory_format or backbone.memory_format, winograd)
