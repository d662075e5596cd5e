"""The feature pyramid models: equal to torchvision's fasterrcnn_resnet50_fpn on its weights,
and the pieces the pyramid adds, against hand-computed values."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from misc.convert_torchvision_fpn import torchvision_to_ours
from model.backbones import build_backbone
from model.faster_rcnn import build_faster_rcnn
from model.roi_head import PyramidRoIAlign
from model.rpn import ProposalCreator
from utils.checkpoint import load_detector
from utils.config import Config

# Where the designs differ, the input avoids the difference (named in README too):
# - torchvision puts P6's anchors at a stride of (padded size) // (P6 size), not 64, which is
#   64 only when the padded image is a multiple of 64: 512 x 768 here;
# - torchvision resizes by a scale factor and floors the size, we round: scale 2 exactly here;
# - torchvision drops proposals under 1e-3 px and detections under 1e-2 px wide, we drop
#   empty ones (none of this size occurs here);
# - our RPN scores are softmax(0, logit), its sigmoid(logit): equal up to rounding.
HEIGHT, WIDTH, SCALE = 256, 384, 2


def pairing(a, b, atol):
    """The permutation that pairs each row of a with the row of b it equals within atol; both
    sides are in score order, which may differ where scores tie in float32."""
    distance = torch.cdist(a.double(), b.double(), p=float('inf'))  # (R, R)
    order = distance.argmin(dim=1)
    assert len(a) == len(b) and sorted(order.tolist()) == list(range(len(b)))
    assert distance.min(dim=1).values.max() <= atol
    assert (order - torch.arange(len(a))).abs().max() <= 2, 'more than neighbours swapped'
    return order


@pytest.fixture(scope='module')
def twins():
    """torchvision's R50-FPN with random weights (spread wider than its initialisation, so
    that scores rarely tie) and ours with its weights mapped by the converter."""
    torch.manual_seed(0)
    theirs = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4,
                                     min_size=HEIGHT * SCALE, max_size=WIDTH * SCALE).eval()
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, nn.BatchNorm2d):  # every statistic and affine term used
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.3, 0.6)
                module.bias.uniform_(-0.1, 0.1)
        theirs.rpn.head.cls_logits.weight.normal_(0, 0.3)
        theirs.rpn.head.bbox_pred.weight.normal_(0, 0.03)
        theirs.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.3)
    cfg = Config(extractor='resnet50_fpn', min_size=HEIGHT * SCALE, max_size=WIDTH * SCALE)
    # the plain model: direct convolutions, as torchvision's
    ours = build_faster_rcnn(3, cfg.model_options()).eval()
    ours.load_state_dict(torchvision_to_ours(theirs.state_dict()))
    image = torch.randint(0, 256, (3, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(1))
    return ours, theirs, image.float()


@pytest.mark.slow
@torch.no_grad()
def test_equal_to_torchvision_fasterrcnn_resnet50_fpn(twins):
    ours, theirs, image = twins
    images, _ = theirs.transform([image / 255])  # torchvision takes 0..1 images
    batch, sizes, scales = ours.transform([image])
    assert sizes == images.image_sizes == [(HEIGHT * SCALE, WIDTH * SCALE)] and scales == [SCALE]
    torch.testing.assert_close(batch, images.tensors, rtol=0, atol=1e-4)

    features = ours.extractor(batch)  # P2..P6
    expected = theirs.backbone(images.tensors)
    assert len(features) == len(expected) == 5
    for mine, theirs_level in zip(features, expected.values()):
        torch.testing.assert_close(mine, theirs_level, rtol=1e-4, atol=1e-4)

    *_, rois, roi_indices, _ = ours.rpn(features, sizes, scales)
    proposals = theirs.rpn(images, expected)[0][0]
    assert len(rois) == len(proposals) == 1000  # n_test_post_nms, the defaults agree
    proposals = proposals[pairing(rois, proposals, atol=1e-3)]  # same boxes, ties aside

    # RoIs pooled from the level eq. 1 picks, RoIAlign 7 x 7, two fc, the predictor
    pooled = ours.head.pool(features, torch.cat([roi_indices[:, None].float(), rois], dim=1))
    expected_pooled = theirs.roi_heads.box_roi_pool(expected, [proposals], images.image_sizes)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-4, atol=1e-4)
    roi_cls_locs, roi_scores = ours.head(features, rois, roi_indices)
    scores, locs = theirs.roi_heads.box_predictor(theirs.roi_heads.box_head(expected_pooled))
    torch.testing.assert_close(roi_scores, scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(roi_cls_locs, locs, rtol=1e-4, atol=1e-4)

    # predict end to end: score > 0.05, class-wise NMS at 0.5, 100 per image, original pixels
    bboxes, labels, probs = ours.predict([image])
    detections = theirs([image / 255])[0]
    assert len(bboxes[0]) == len(detections['boxes']) == 100
    order = pairing(bboxes[0], detections['boxes'], atol=1e-3)
    assert torch.equal(labels[0] + 1, detections['labels'][order])  # 0 is their background
    torch.testing.assert_close(probs[0], detections['scores'][order], rtol=1e-4, atol=1e-5)


def test_the_pyramid_pads_to_a_multiple_of_32_with_zeros():
    torch.manual_seed(0)
    extractor = build_backbone('small_fpn').extractor.eval()
    x = torch.randn(1, 3, 70, 100)
    padded = torch.zeros(1, 3, 96, 128)
    padded[..., :70, :100] = x
    with torch.no_grad():
        for level, expected, stride in zip(extractor(x), extractor(padded), (4, 8, 16, 32, 64)):
            assert level.shape[-2:] == (-(-96 // stride), -(-128 // stride))
            torch.testing.assert_close(level, expected)


def test_rois_are_pooled_from_the_level_of_their_size():
    """Eq. 1, k = floor(4 + log2(sqrt(w h) / 224)) clamped to 2..5, checked by making each
    level's features the constant k."""
    pool = PyramidRoIAlign(7, (4, 8, 16, 32))
    features = [torch.full((1, 2, 64, 64), float(k)) for k in (2, 3, 4, 5)]
    sides = [224, 223, 112, 111, 448, 447, 56, 10, 2000]
    expected = [4, 3, 3, 2, 5, 4, 2, 2, 5]
    rois = torch.tensor([[0, 0, 0, s, s] for s in sides], dtype=torch.float32)
    pooled = pool(features, rois)
    assert pooled.shape == (len(sides), 2, 7, 7)
    assert pooled[:, 0, 0, 0].tolist() == expected
    # a 448 x 112 RoI has the area of a 224 x 224 one: P4
    assert pool(features, torch.tensor([[0.0, 0, 0, 448, 112]]))[0, 0, 0, 0] == 4


def test_proposals_take_the_best_of_each_level_and_nms_within_it():
    creator = ProposalCreator(nms_thresh=0.5, n_test_pre_nms=2, n_test_post_nms=10,
                                     min_size=0)
    box = [10.0, 10, 50, 50]
    # level 0: three anchors, the two best overlap; level 1: a copy of level 0's best, and
    # one with the lowest score of all
    anchor = torch.tensor([box, [12.0, 10, 52, 50], [60.0, 60, 90, 90], box, [0.0, 0, 20, 20]])
    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1])
    roi = creator(torch.zeros(5, 4), score, anchor, (100, 100), n_per_level=[3, 2])
    # level 0 keeps its 2 best, of which NMS keeps the first; level 1's copy of it survives,
    # NMS does not cross levels; the 0.7 box is not among level 0's 2 best
    assert roi.tolist() == [box, box, [0.0, 0, 20, 20]]
    # an anchor moved out of the image is clipped to an empty box and dropped
    loc = torch.zeros(5, 4)
    loc[4] = torch.tensor([-10.0, 0, 0, 0])
    roi = creator(loc, score, anchor, (100, 100), n_per_level=[3, 2])
    assert roi.tolist() == [box, box]


@pytest.mark.filterwarnings('ignore:Detected call of')
def test_defaults_are_torchvisions_and_cocos():
    cfg = Config(extractor='resnet50_fpn')
    assert (cfg.min_size, cfg.max_size, cfg.anchor_scales) == (800, 1333, (8,))
    assert (cfg.n_test_pre_nms, cfg.n_test_post_nms, cfg.roi_n_sample) == (1000, 1000, 512)
    assert (cfg.lr, cfg.lr_scaling, cfg.eval_nms_thresh) == (0.00125, 'linear', 0.5)
    model = build_faster_rcnn(3, cfg.model_options())
    sides = (model.rpn.anchor_base[:, :, 2] - model.rpn.anchor_base[:, :, 0]).tolist()
    assert [level[1] for level in sides] == [32, 64, 128, 256, 512]  # ratio 1 on P2..P6
    assert Config(extractor='vgg16').n_test_post_nms == 300  # the paper's, unchanged


@torch.no_grad()
def test_converted_torchvision_weights_load_as_a_checkpoint(twins, tmp_path):
    from misc.convert_torchvision_fpn import main
    ours, theirs, image = twins
    state = theirs.state_dict()
    torch.save(state, tmp_path / 'tv.pth')
    main(source=str(tmp_path / 'tv.pth'), out=str(tmp_path / 'ours.pt'), class_names='a,b,c')
    model, class_names = load_detector(str(tmp_path / 'ours.pt'), min_size=HEIGHT * SCALE)
    assert class_names == ('a', 'b', 'c') and type(model.extractor) is type(ours.extractor)
    # the weights of the twin that computes what torchvision computes (above)
    expected = ours.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert model.transform.min_size == HEIGHT * SCALE
    # older torchvision files name the FPN and RPN convs without the Sequential
    old = {k.replace('rpn.head.conv.0.0.', 'rpn.head.conv.')
           .replace('_blocks.0.0.', '_blocks.0.'): v for k, v in state.items()}
    assert torchvision_to_ours(old).keys() == torchvision_to_ours(state).keys()
    with pytest.raises(ValueError, match='has roi_heads.mask_head.x, which is not part of it'):
        torchvision_to_ours({**state, 'roi_heads.mask_head.x': torch.zeros(1)})
    with pytest.raises(ValueError, match='has 3 classes; give their names'):
        main(source=str(tmp_path / 'tv.pth'), out=str(tmp_path / 'x.pt'), class_names='a,b')


def test_small_fpn_has_no_pretrained_weights():
    with pytest.raises(ValueError, match='--extractor=small_fpn has none; drop one'):
        Config(extractor='small_fpn', pretrained='imagenet')
