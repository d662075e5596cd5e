"""One figure of the Faster R-CNN architecture, drawn from a trained model on one image.

Six panels in pipeline order, each titled with the code that computes it (Ren et al. 2015,
figure 2): ImageTransform -> extractor -> RegionProposalNetwork -> ProposalCreator ->
RoIHead.pool -> RoIHead and predict. The original port shipped such a figure; this one is drawn
from the model itself, so it cannot drift from the code.

    python misc/architecture_figure.py        # newest runs/*/best.pt, first toy test image
    python misc/architecture_figure.py --checkpoint=runs/toy/best.pt --image=a.jpg --out=b.png

The small stage and drawing functions are shared with walkthrough.ipynb, which takes one image
through every stage, training targets and losses included. Images are (3, H, W) RGB 0..255;
boxes (R, 4) x_min y_min x_max y_max in pixels of the image they are drawn on.
"""
import copy
import os
import sys
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import ConnectionPatch, Rectangle
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.dataset import build_bbox_dataset  # noqa: E402
from data.util import read_image  # noqa: E402
from model.transform import denormalize  # noqa: E402
from utils.checkpoint import load_detector  # noqa: E402
from utils.run import run_command  # noqa: E402
from utils.vis_tool import vis_bbox  # noqa: E402

FIGSIZE, DPI = (12, 8), 80  # inches; the PNG is 960 x 640 pixels
N_POOLED = 3  # RoIs whose pooled grids the figure shows
N_TOP = 10  # proposals drawn thick, the best-scored


# ---- stages: small steps on top of the model's API -------------------------------------------

def newest_checkpoint():
    """The newest runs/*/best.pt of this repository, what the quick start writes."""
    checkpoints = sorted(ROOT.glob('runs/*/best.pt'), key=os.path.getmtime)
    if not checkpoints:
        raise FileNotFoundError('no runs/*/best.pt: run the quick start '
                                '(python train.py train --dataset=toy --device=cpu) or pass '
                                'a checkpoint')
    return checkpoints[-1]


def first_sample_with_objects(dataset):
    """Index of the first sample of a bbox dataset with at least one object that is not
    difficult (the ones training uses)."""
    for i in range(len(dataset)):
        _, _, difficult = dataset.get_annotation(i)
        if (~difficult).any():
            return i
    raise ValueError('no sample of the dataset has an object')


def input_image(model, batch, size):
    """The network's input (1, 3, H', W') as an RGB 0..255 image (3, H, W): the original
    resized, with the normalisation undone and the padding cut off."""
    height, width = size
    return denormalize(batch[0], model.transform.normalization)[:, :height, :width]


def anchors_at(anchor, feature_size, y, x):
    """(A, 4) the anchors of feature-map location (y, x), from all K = H * W * A anchors, which
    are ordered by location (y, then x), then by anchor."""
    height, width = feature_size
    return anchor.view(height, width, -1, 4)[y, x]  # (A, 4)


def objectness_map(rpn_scores, feature_size):
    """(H, W) the highest foreground probability among the A anchors of each location, from
    one image's rpn_scores (1, K, 2) logits (background, foreground)."""
    height, width = feature_size
    fg_prob = F.softmax(rpn_scores[0], dim=1)[:, 1]  # (K,) the paper's p_i
    return fg_prob.view(height, width, -1).amax(dim=2)  # (H, W)


def proposals_before_nms(proposal_creator, loc, fg_prob, anchor, img_size, scale):
    """(K', 4) the boxes that go into ProposalCreator's NMS at test time, highest score
    first: the n_test_pre_nms best-scored anchors, decoded by their loc, clipped, kept if at
    least min_size. ProposalCreator's own code, with an NMS at IoU 1, which removes nothing."""
    no_nms = copy.copy(proposal_creator)
    no_nms.nms_thresh, no_nms.n_test_post_nms = 1.0, proposal_creator.n_test_pre_nms
    return no_nms(loc, fg_prob, anchor, img_size, scale, training=False)


def pool_rois(model, features, rois):
    """(R, C, 7, 7) RoI max pooling (7 the model's roi_size) of rois (R, 4) on image 0 of
    features (N, C, H, W), as RoIHead.forward pools them (Fast R-CNN sec. 2.1)."""
    indices_and_rois = torch.cat([rois.new_zeros(len(rois), 1), rois], dim=1)  # (R, 5)
    return model.head.pool(features.float(), indices_and_rois.float())


@torch.no_grad()
def stages(model, image):
    """Every stage of model's test-time pipeline on one image (3, H, W) RGB 0..255, as a dict;
    boxes in input pixels but the detections, which are in the original image's."""
    batch, sizes, scales = model.transform([image])
    features = model.extractor(batch)  # (1, C, H / 16, W / 16)
    _, rpn_scores, rois, _, anchor = model.rpn(features, sizes, scales)
    objectness = objectness_map(rpn_scores, features.shape[2:])  # (H, W)
    y, x = divmod(int(objectness.argmax()), objectness.shape[1])
    anchors = anchors_at(anchor, features.shape[2:], y, x)  # (A, 4) at the objectness peak
    bboxes, labels, scores = model.predict([image], preset='visualize')
    return dict(image=image, input=input_image(model, batch, sizes[0]), scale=scales[0],
                features=features[0], objectness=objectness, anchors=anchors, rois=rois,
                pooled=pool_rois(model, features, rois[:N_POOLED]),
                bboxes=bboxes[0], labels=labels[0], scores=scores[0],
                score_thresh=model.presets['visualize']['score_thresh'])


# ---- drawing ----------------------------------------------------------------------------------

def class_color(label):
    """The colour of class label (0..n_fg-1), the one vis_bbox draws its boxes in."""
    return matplotlib.colormaps['tab20'](int(label) % 20)


def show(ax, image, title, faded=False):
    """image (3, H, W) RGB 0..255 on ax, in pixel coordinates, without ticks; faded draws it
    grey and pale, under coloured boxes or maps."""
    height, width = image.shape[1:]
    if faded:
        image = 64 + image.mean(dim=0, keepdim=True).expand(3, -1, -1) * 0.75  # (3, H, W)
    ax.imshow(image.permute(1, 2, 0).clamp(0, 255).byte().cpu().numpy(),
              extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_boxes(ax, bbox, color, label=None, linewidth=1.0, alpha=1.0, linestyle='-'):
    """Rectangles for bbox (R, 4); label names them once in the legend."""
    for i, (x_min, y_min, x_max, y_max) in enumerate(bbox.tolist()):
        ax.add_patch(Rectangle((x_min, y_min), x_max - x_min, y_max - y_min, fill=False,
                               edgecolor=color, linewidth=linewidth, alpha=alpha,
                               linestyle=linestyle, label=label if i == 0 else None))


def draw_map(ax, values, feat_stride, alpha=1.0, cmap='viridis'):
    """A feature-map sized (H, W) map over the input image: cell (y, x) covers input pixels
    [x * stride, (x + 1) * stride) x [y * stride, (y + 1) * stride). alpha: a float, or an
    (H, W) tensor of opacities, one per cell."""
    height, width = values.shape
    if torch.is_tensor(alpha):
        alpha = alpha.cpu().numpy()
    return ax.imshow(values.cpu().numpy(), extent=(0, width * feat_stride, height * feat_stride, 0),
                     alpha=alpha, cmap=cmap, interpolation='nearest')


def draw_classes(ax, bbox, label, class_names, linewidth=2.0, linestyle='-'):
    """Boxes (R, 4) of classes label (R,) in 0..n_fg-1: one colour and legend entry per class."""
    for k in sorted(set(label.tolist())):
        draw_boxes(ax, bbox[label == k], class_color(k), class_names[k], linewidth,
                   linestyle=linestyle)


def draw_anchors(ax, anchors, fit=False):
    """Anchors (A, 4) of one location, one colour per aspect ratio h / w, with a legend; fit
    widens the view to show them whole (large anchors reach past the image)."""
    ratios = ((anchors[:, 3] - anchors[:, 1]) / (anchors[:, 2] - anchors[:, 0])).tolist()
    palette = dict(zip(sorted({round(r, 2) for r in ratios}),
                       ('tab:orange', 'lime', 'tab:cyan', 'tab:pink', 'tab:olive')))
    for box, ratio in zip(anchors, ratios):
        draw_boxes(ax, box[None], palette.get(round(ratio, 2), 'lime'), linewidth=1.5)
    ax.legend(handles=[Line2D([], [], color=color, label=f'anchors h/w = {ratio:g}')
                       for ratio, color in palette.items()], loc='lower left', fontsize=7)
    if fit:
        (x_lo, y_lo), (x_hi, y_hi) = anchors[:, :2].amin(dim=0), anchors[:, 2:].amax(dim=0)
        x_min, x_max = ax.get_xlim()
        y_max, y_min = ax.get_ylim()
        ax.set_xlim(min(x_min, x_lo) - 4, max(x_max, x_hi) + 4)
        ax.set_ylim(max(y_max, y_hi) + 4, min(y_min, y_lo) - 4)


def _input_panel(ax, result):
    height, width = result['input'].shape[1:]
    orig_height, orig_width = result['image'].shape[1:]
    show(ax, result['input'], f'1  ImageTransform\nresize x{result["scale"]:.2f}, normalise\n'
                              f'{orig_height} x {orig_width} -> {height} x {width} pixels')


def _features_panel(ax, result, feat_stride):
    n_channel, height, width = result['features'].shape
    show(ax, result['input'], f'2  extractor (backbone)\n{n_channel} x {height} x {width} '
                              'features\n(mean over channels)')
    draw_map(ax, result['features'].mean(dim=0), feat_stride)


def _rpn_panel(fig, ax, result, feat_stride):
    show(ax, result['input'], '3  RegionProposalNetwork\nobjectness (max over anchors)\n'
                              f'and the {len(result["anchors"])} anchors of its peak', faded=True)
    objectness = result['objectness']  # (H, W), opaque where high
    heat = draw_map(ax, objectness, feat_stride, alpha=0.2 + 0.7 * objectness, cmap='jet')
    heat.set_clim(0, 1)
    draw_anchors(ax, result['anchors'])
    colorbar = fig.colorbar(heat, cax=ax.inset_axes((0.62, 0.9, 0.34, 0.05)),
                            orientation='horizontal', ticks=(0, 1))
    colorbar.ax.set_title('fg prob', fontsize=8, pad=2)
    colorbar.ax.tick_params(labelsize=7, pad=1)


def _proposals_panel(ax, result):
    rois = result['rois']
    show(ax, result['input'], f'4  ProposalCreator\ndecode (eq. 2), clip, NMS\n'
                              f'{len(rois)} proposals', faded=True)
    draw_boxes(ax, rois[N_TOP:], 'gold', f'other {max(len(rois) - N_TOP, 0)}', 0.5, 0.35)
    draw_boxes(ax, rois[:N_TOP], 'red', f'best {min(N_TOP, len(rois))}', 1.5)
    ax.legend(loc='lower left', fontsize=7)


def _pooling_panel(ax, result):
    pooled = result['pooled']  # (N_POOLED, C, 7, 7)
    grid = pooled.shape[-1]
    show(ax, result['input'], f'5  RoIHead.pool\nthe best {len(pooled)} RoIs max-pooled\n'
                              f'to {grid} x {grid} x {pooled.shape[1]}', faded=True)
    colors = ('tab:red', 'tab:green', 'tab:blue')
    for i, (box, cells) in enumerate(zip(result['rois'], pooled)):
        draw_boxes(ax, box[None], colors[i], f'RoI {i}', 1.8)
        inset = ax.inset_axes((0.02 + 0.33 * i, 0.02, 0.25, 0.25))
        inset.imshow(cells.mean(dim=0).cpu().numpy(), cmap='viridis', interpolation='nearest')
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
            spine.set_edgecolor(colors[i])
            spine.set_linewidth(2)
    ax.legend(loc='upper right', fontsize=7, title='mean of channels', title_fontsize=7)


def _detections_panel(ax, result, class_names):
    vis_bbox(result['image'].cpu(), result['bboxes'].cpu(), result['labels'].cpu(),
             result['scores'].cpu(), class_names, ax=ax)
    ax.set_title(f'6  RoIHead, predict\nclass scores, boxes, NMS\n{len(result["bboxes"])} '
                 f'detections (score >= {result["score_thresh"]})', pad=14)  # above captions
    ax.set_xticks([])
    ax.set_yticks([])
    present = sorted(set(result['labels'].tolist()))
    if present:
        ax.legend(handles=[Line2D([], [], color=class_color(k), label=class_names[k])
                           for k in present], loc='lower left', fontsize=7)


def _arrow(fig, ax_from, ax_to, xy_from, xy_to, connectionstyle='arc3'):
    fig.add_artist(ConnectionPatch(xy_from, xy_to, 'axes fraction', 'axes fraction',
                                   axesA=ax_from, axesB=ax_to, arrowstyle='-|>', color='0.35',
                                   linewidth=2, mutation_scale=16,
                                   connectionstyle=connectionstyle))


def draw_figure(result, class_names, feat_stride=16):
    """The architecture figure (a bare matplotlib Figure, FIGSIZE at DPI) of a stages() result.

    Two rows of three panels, read like a snake: 1 2 3 left to right, then down to 4 and
    4 5 6 right to left, so that the detections (6) sit under the input (1).
    """
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    axes = fig.subplots(2, 3)
    fig.subplots_adjust(left=0.02, right=0.93, top=0.8, bottom=0.02, wspace=0.18, hspace=0.4)
    (ax1, ax2, ax3), (ax6, ax5, ax4) = axes
    _input_panel(ax1, result)
    _features_panel(ax2, result, feat_stride)
    _rpn_panel(fig, ax3, result, feat_stride)
    _proposals_panel(ax4, result)
    _pooling_panel(ax5, result)
    _detections_panel(ax6, result, class_names)
    for ax_from, ax_to in ((ax1, ax2), (ax2, ax3)):
        _arrow(fig, ax_from, ax_to, (1.0, 0.5), (0.0, 0.5))
    _arrow(fig, ax3, ax4, (1.0, 0.5), (1.0, 0.5), 'bar,fraction=-0.12')
    for ax_from, ax_to in ((ax4, ax5), (ax5, ax6)):
        _arrow(fig, ax_from, ax_to, (0.0, 0.5), (1.0, 0.5))
    fig.suptitle('Faster R-CNN (Ren et al. 2015, fig. 2) in frcnn, stage by stage:\n'
                 'FasterRCNN.predict on one image; each panel names the code that computes it',
                 fontsize=13)
    return fig


def main(checkpoint=None, image=None, out='docs/architecture.png'):
    """Draw the architecture figure of a trained checkpoint on one image into out (PNG).

    checkpoint: None takes the newest runs/*/best.pt. image: an image file; None takes the
    first test image with an object of the (cached, default) toy dataset.
    """
    model, class_names = load_detector(checkpoint or newest_checkpoint())
    if image is None:
        dataset = build_bbox_dataset('toy', None, 'test', class_names=class_names)
        image = dataset.image_path(first_sample_with_objects(dataset))
    fig = draw_figure(stages(model, read_image(image)), class_names, model.rpn.strides[0])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return str(out)


if __name__ == '__main__':
    run_command(main)
