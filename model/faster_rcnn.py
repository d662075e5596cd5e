"""Faster R-CNN: one module from image to boxes (Ren et al. 2015, figure 2).

Shape shorthand:
    N  images               R  proposals (RoIs) over the batch
    C  classes with background at 0; n_fg_class = C - 1 foreground classes
    K  kept detections of one image
Labels returned by ``predict`` are foreground labels 0..C-2; inside the head, 0 is background.
"""
import torch
from torch import nn
from torch.nn import functional as F

from data.util import normalize, resize_bbox, resize_image
from model.utils.bbox_tools import clip_bbox, loc2bbox
from model.utils.nms import batched_non_maximum_suppression

# Thresholds of predict: 'evaluate' is the paper's test setting (score > 0.05, NMS 0.3, VOC
# evaluation keeps at most 100 per image); 'visualize' shows only confident boxes.
PRESETS = {
    'evaluate': dict(score_thresh=0.05, nms_thresh=0.3, max_per_image=100),
    'visualize': dict(score_thresh=0.7, nms_thresh=0.3, max_per_image=100),
}


def pad_images(images):
    """Stacks (3, H_i, W_i) images into (N, 3, H_max, W_max), zero-padded at bottom and right."""
    h_max = max(img.shape[1] for img in images)
    w_max = max(img.shape[2] for img in images)
    batch = images[0].new_zeros((len(images), 3, h_max, w_max))
    for i, img in enumerate(images):
        batch[i, :, :img.shape[1], :img.shape[2]] = img
    return batch


class FasterRCNN(nn.Module):
    """Extractor, RPN and RoI head composed into one detector.

    Args:
        extractor: images (N, 3, H, W) -> features (N, C_feat, H/16, W/16).
        rpn: a RegionProposalNetwork.
        head: an RoIHead; its ``n_class`` counts the background.
        min_size, max_size, normalization: the preprocessing ``predict`` applies, the same
            functions the training data goes through (data.util).
        loc_normalize_std: the std the head's loc targets were divided by.
        backend: 'auto' | 'cupy' | 'torchvision', for the NMS in predict.
    """

    def __init__(self, extractor, rpn, head, min_size=600, max_size=1000,
                 normalization='torchvision', loc_normalize_std=(0.1, 0.1, 0.2, 0.2),
                 backend='auto'):
        super().__init__()
        self.backend = backend  # for predict's NMS; the RPN and head hold their own
        self.extractor, self.rpn, self.head = extractor, rpn, head
        self.min_size, self.max_size, self.normalization = min_size, max_size, normalization
        self.register_buffer('loc_normalize_std', torch.tensor(loc_normalize_std),
                             persistent=False)

    @property
    def n_class(self):
        return self.head.n_class

    def forward(self, images, img_sizes, scales):
        """Scores and box offsets for every proposal (the test-time path of the figure).

        Args:
            images: (N, 3, H, W) normalised, padded images.
            img_sizes: N (height, width) true sizes; scales: N resize factors.

        Returns:
            roi_cls_locs (R, C * 4), roi_scores (R, C), rois (R, 4), roi_indices (R,).
        """
        features = self.extractor(images)
        _, _, rois, roi_indices, _ = self.rpn(features, img_sizes, scales)
        roi_cls_locs, roi_scores = self.head(features, rois, roi_indices)
        return roi_cls_locs, roi_scores, rois, roi_indices

    def preprocess(self, images):
        """Resizes and normalises original images as the training data was.

        Returns (N, 3, H, W) batch, N (height, width) input sizes, N scales.
        """
        resized, scales = zip(*(resize_image(img, self.min_size, self.max_size)
                                for img in images))
        sizes = [tuple(img.shape[1:]) for img in resized]
        batch = normalize(pad_images(resized), self.normalization)
        return batch, sizes, list(scales)

    @torch.no_grad()
    def predict(self, images, sizes=None, preset='evaluate', **overrides):
        """Detects objects in images at their original size.

        Args:
            images: a list of (3, H_i, W_i) float32 RGB 0..255 tensors, or an (N, 3, H, W)
                batch of such images zero-padded, with ``sizes`` giving each one's (H_i, W_i).
            preset: 'evaluate' or 'visualize' (see PRESETS); ``overrides`` replaces any of its
                score_thresh, nms_thresh, max_per_image.

        Returns:
            Three lists over images: bboxes (K, 4) float32 x_min y_min x_max y_max in original
            pixels, labels (K,) int64 in 0..C-2, scores (K,) float32, highest score first.
        """
        params = {**PRESETS[preset], **overrides}
        if sizes is not None:
            images = [img[:, :h, :w] for img, (h, w) in zip(images, sizes)]
        device = next(self.parameters()).device
        images = [img.to(device=device, dtype=torch.float32) for img in images]
        was_training = self.training
        self.eval()  # predict leaves the module as it found it
        try:
            batch, input_sizes, scales = self.preprocess(images)
            roi_cls_locs, roi_scores, rois, roi_indices = self(batch, input_sizes, scales)
        finally:
            self.train(was_training)
        orig_sizes = [tuple(img.shape[1:]) for img in images]
        return self._postprocess(roi_cls_locs.float(), roi_scores.float(), rois, roi_indices,
                                 input_sizes, orig_sizes, **params)

    def _postprocess(self, roi_cls_locs, roi_scores, rois, roi_indices, input_sizes, orig_sizes,
                     score_thresh, nms_thresh, max_per_image):
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
            bbox[mine] = resize_bbox(clip_bbox(bbox[mine], input_size), input_size, orig_size)
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
