"""Speed and memory of our Faster R-CNN side by side with torchvision's FasterRCNN.

With a feature pyramid (--extractor=resnet50_fpn or resnet101_fpn), torchvision's side is its
own R-FPN as fasterrcnn_resnet50_fpn builds it for fine-tuning (frozen BatchNorm, conv1 and
layer1 fixed), with random weights that misc/convert_torchvision_fpn.py copies into ours: the
two compute the same (tests/test_fpn.py). Both keep the input's size and pad it to a multiple
of 32.

With a C4 backbone, torchvision's model is configured to our design and shares our weights:
the same
backbone (a copy of our extractor, conv1-conv2 frozen), RPN conv and heads (its one-logit
objectness is our fg - bg logit, so its sigmoid is our softmax), 9 anchors at stride 16, RoI
max pooling 7x7 at 1/16, fc6 + fc7 and the box predictor, and the paper's proposal counts,
sampling and thresholds. Inputs keep their size on both sides (no resize, no padding).

The two models alternate in one process (ours, torchvision, ours, ...), so load from other
processes hits both alike; the ratio is the median of the per-pair ratios.

    python misc/benchmark.py                          # CPU, 600x800, batch 1, 5 runs
    python misc/benchmark.py --device=cuda --amp --repeat=20 --out=bench.json
"""
import copy
import ctypes
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from misc.convert_torchvision_fpn import torchvision_to_ours  # noqa: E402
from model.backbones import FEAT_STRIDE  # noqa: E402
from model.faster_rcnn import MAX_PER_IMAGE, build_faster_rcnn  # noqa: E402
from model.ops import RoIAlign  # noqa: E402
from model.ops.speed import (  # noqa: E402
    WinogradConv2d,
    cpu_capability,
    fastest_layout,
    is_wide,
    keep_freed_memory,
    speed_up,
    use_winograd,
    winograd_available,
)
from model.transform import normalize  # noqa: E402
from trainer import make_optimizer  # noqa: E402
from utils.config import Config  # noqa: E402
from utils.run import run_command  # noqa: E402

# Our stages in pipeline order; a dotted name is part of the stage before the dot.
STAGES = ('preprocess', 'backbone', 'rpn', 'rpn.proposals', 'anchor_targets', 'proposal_targets',
          'head', 'head.roi_pool', 'postprocess', 'forward', 'backward', 'optimizer_step', 'total')
# The variants race runs with train.py's allocator setting (speed.keep_freed_memory).
KEPT_MEMORY = ('ours', 'torchvision_our_settings')
# The paper's solver (trainer.make_optimizer's groups): lr, momentum, weight decay.
SGD = dict(name='sgd', lr=1e-3, momentum=0.9, weight_decay=5e-4)


class RoIPoolOneLevel(nn.Module):
    """torchvision's box_roi_pool interface over one feature map, with our head's pooling:
    Fast R-CNN's max pooling, or RoIAlign (aligned, adaptive sampling) for the C4 backbones.
    torchvision's MultiScaleRoIAlign would use aligned=False.

    forward(features {'0': (N, C, H, W)}, proposals N x (R_i, 4) in input pixels, image_shapes)
    -> (R, C, output_size, output_size).
    """

    def __init__(self, output_size, spatial_scale, align=False):
        super().__init__()
        self.output_size, self.spatial_scale, self.align = output_size, spatial_scale, align

    def forward(self, features, proposals, image_shapes):
        # In float32 under autocast, as our head pools (the CPU kernel has no bfloat16 either).
        x, boxes = features['0'].float(), [p.float() for p in proposals]
        if self.align:
            return torchvision.ops.roi_align(x, boxes, self.output_size, self.spatial_scale,
                                             sampling_ratio=0, aligned=True)
        return torchvision.ops.roi_pool(x, boxes, self.output_size, self.spatial_scale)


def with_our_convs(model, layout):
    """model (torchvision's) running its convolutions as ours do: in our layout (its conv
    weights in channels-last make its convolutions run so) and as Winograd where ours are.
    layout: the one ours runs in."""
    if layout == torch.channels_last:
        return model.to(memory_format=torch.channels_last)
    return use_winograd(model)


def convolutions(ours, layout, device):
    """How our model runs its convolutions on device in layout, in words."""
    if layout == torch.channels_last:
        return 'channels-last'
    winograd = winograd_available() and device.type == 'cpu' and any(
        type(m) is WinogradConv2d for m in ours.modules())
    return 'NCHW, 3x3 as Winograd' if winograd else 'NCHW'


def torchvision_twin(ours, height, width):
    """torchvision's FasterRCNN with our design and a copy of our weights (see module doc).

    ours: our FasterRCNN; its target creators give the sampling settings.
    """
    anchor_targets, roi_targets = ours.anchor_target_creator, ours.proposal_target_creator
    # torch's direct convolutions, as torchvision's users run them; frozen layers stay frozen
    backbone = use_winograd(copy.deepcopy(ours.extractor), enabled=False)
    backbone.out_channels = ours.rpn.conv1.out_channels
    rpn_head = RPNHead(backbone.out_channels, ours.rpn.anchor_base.shape[1])  # A
    rpn_head.conv[0][0].load_state_dict(ours.rpn.conv1.state_dict())
    rpn_head.bbox_pred.load_state_dict(ours.rpn.loc.state_dict())
    with torch.no_grad():  # our score channels are (bg, fg) per anchor: sigmoid(fg - bg)
        rpn_head.cls_logits.weight.copy_(ours.rpn.score.weight[1::2] - ours.rpn.score.weight[::2])
        rpn_head.cls_logits.bias.copy_(ours.rpn.score.bias[1::2] - ours.rpn.score.bias[::2])
    predictor = FastRCNNPredictor(ours.head.score.in_features, ours.n_class)
    predictor.cls_score.load_state_dict(ours.head.score.state_dict())
    predictor.bbox_pred.load_state_dict(ours.head.cls_loc.state_dict())
    proposals, evaluate = ours.rpn.proposal_creator, ours.presets['evaluate']
    anchor_sizes = tuple(FEAT_STRIDE * s for s in (8, 16, 32))  # build_faster_rcnn's defaults
    model = TorchvisionFasterRCNN(
        backbone, min_size=min(height, width), max_size=max(height, width),  # scale 1
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],  # 'torchvision'
        size_divisible=1,  # no padding to multiples of 32: the same feature map as ours
        rpn_anchor_generator=AnchorGenerator((anchor_sizes,), ((0.5, 1.0, 2.0),)),
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=proposals.n_train_pre_nms,
        rpn_post_nms_top_n_train=proposals.n_train_post_nms,
        rpn_pre_nms_top_n_test=proposals.n_test_pre_nms,
        rpn_post_nms_top_n_test=proposals.n_test_post_nms, rpn_nms_thresh=proposals.nms_thresh,
        rpn_fg_iou_thresh=anchor_targets.pos_iou_thresh,
        rpn_bg_iou_thresh=anchor_targets.neg_iou_thresh,
        rpn_batch_size_per_image=anchor_targets.n_sample,
        rpn_positive_fraction=anchor_targets.pos_ratio,
        box_head=nn.Sequential(nn.Flatten(),
                               use_winograd(copy.deepcopy(ours.head.classifier), False)),
        box_predictor=predictor, box_score_thresh=evaluate['score_thresh'],
        box_nms_thresh=evaluate['nms_thresh'], box_detections_per_img=MAX_PER_IMAGE,
        box_fg_iou_thresh=roi_targets.pos_iou_thresh,
        box_bg_iou_thresh=roi_targets.neg_iou_thresh_hi,
        box_batch_size_per_image=roi_targets.n_sample,
        box_positive_fraction=roi_targets.pos_ratio,
        bbox_reg_weights=tuple(1 / s for s in ours.loc_normalize_std.tolist()))
    # The constructor accepts only MultiScaleRoIAlign and fixes the RPN's min size at 1e-3 px.
    align = isinstance(ours.head.pool, RoIAlign)
    size = ours.head.pool.output_size if align else ours.head.pool.outh
    model.roi_heads.box_roi_pool = RoIPoolOneLevel(size, 1 / FEAT_STRIDE, align)
    model.rpn.min_size = proposals.min_size
    return model


def torchvision_fpn_twin(ours, depth, height, width):
    """torchvision's ResNet-FPN FasterRCNN for fine-tuning, random weights, copied into ours."""
    backbone = resnet_fpn_backbone(backbone_name=f'resnet{depth}', weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    model = TorchvisionFasterRCNN(backbone, num_classes=ours.n_class, min_size=min(height, width),
                                  max_size=max(height, width))  # scale 1, as ours
    ours.load_state_dict(torchvision_to_ours(model.state_dict()))
    return model


def synthetic_batch(batch_size, height, width, n_fg_class, seed):
    """Random 0..255 RGB images (N, 3, H, W) and 3 gt boxes per image with labels 0..n_fg-1."""
    images = torch.rand(batch_size, 3, height, width,
                        generator=torch.Generator().manual_seed(seed)) * 255
    fractions = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.8], [0.55, 0.5, 0.95, 0.95]])
    bbox = fractions * torch.tensor([width, height, width, height])  # (3, 4) xyxy pixels
    label = torch.arange(3) % n_fg_class
    return images, [bbox.clone() for _ in range(batch_size)], [label] * batch_size


class StageClock:
    """Wall time of chosen calls, summed per stage name: explicit perf_counter, no profiler.

    ``wrap`` shadows a method or callable attribute on one object with a timed one (for a module,
    its ``forward``); ``restore`` undoes every wrap.
    """

    def __init__(self, sync):
        self.sync, self.ms, self._wrapped = sync, defaultdict(float), []

    @contextmanager
    def stage(self, name):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.ms[name] += (time.perf_counter() - start) * 1e3

    def wrap(self, name, owner, attr):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        self._wrapped.append((owner, attr, vars(owner).get(attr)))
        setattr(owner, attr, timed)

    def restore(self):
        for owner, attr, own_value in reversed(self._wrapped):
            if own_value is None:
                delattr(owner, attr)  # the class's method shows through again
            else:
                setattr(owner, attr, own_value)
        self._wrapped = []


def release_freed_memory():
    """Hands freed heap pages back to the OS (glibc), so RSS before a run is not inflated."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def use_allocator(keep):
    """glibc's malloc as train.py sets it (keep: freed memory kept for reuse) or as a plain
    Python process has it once its dynamic thresholds have settled (blocks over 32 MB mapped
    fresh, free memory over 64 MB at the heap's top returned)."""
    if keep:
        keep_freed_memory()
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)


@contextmanager
def peak_memory(device):
    """Yields a dict whose 'mb' is, after the block, the block's peak memory growth in MiB.

    CUDA: max_memory_allocated after reset_peak_memory_stats, minus the allocation before.
    CPU: resident set size sampled every 5 ms by a thread (psutil), peak minus the RSS before;
    None without psutil.
    """
    result = {'mb': None}
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result['mb'] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    try:
        import psutil
    except ImportError:
        yield result
        return
    release_freed_memory()
    process, done = psutil.Process(), threading.Event()
    before = peak = process.memory_info().rss

    def sample():
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
    result['mb'] = (max(peak, process.memory_info().rss) - before) / 2**20


def summary(values):
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def race(steps, repeat, warmup, device, sync):
    """Runs the steps (name -> callable) in turn, warm-up rounds first, then one more run of
    each for its peak memory alone (the memory sampler would disturb the timed runs). Steps
    named in KEPT_MEMORY run with train.py's allocator setting, the others with glibc's own.
    The allocator's state is the process's: each timed run follows an untimed run of the same
    step, so that it finds the memory as a loop of that step leaves it.

    Returns per step its summary of milliseconds, its per-run times and its peak memory in MiB
    (None where it cannot be measured).
    """
    for _ in range(warmup):
        for name, step in steps.items():
            use_allocator(name in KEPT_MEMORY)
            step()
    times, memory = defaultdict(list), {}
    for _ in range(repeat):
        for name, step in steps.items():
            use_allocator(name in KEPT_MEMORY)
            step()
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    for name, step in steps.items():
        use_allocator(name in KEPT_MEMORY)
        with peak_memory(device) as mem:
            step()
        memory[name] = mem['mb']
    use_allocator(True)
    return {name: {**summary(times[name]), 'runs': times[name], 'peak_mb': memory[name]}
            for name in steps}


def instrument(clock, model):
    """Wires the clock into the stages of our FasterRCNN."""
    for name, owner, attr in (
            ('preprocess', model, 'transform'), ('backbone', model.extractor, 'forward'),
            ('rpn', model.rpn, 'forward'), ('rpn.proposals', model.rpn, 'proposal_creator'),
            ('anchor_targets', model, 'anchor_target_creator'),
            ('proposal_targets', model, 'proposal_target_creator'),
            ('head', model.head, 'forward'), ('head.roi_pool', model.head.pool, 'forward'),
            ('postprocess', model, '_postprocess')):
        clock.wrap(name, owner, attr)


def breakdown(step, model, repeat, sync):
    """Median milliseconds per stage of ours over ``repeat`` runs of ``step(clock)``, 'total'
    being the whole step."""
    runs = defaultdict(list)
    for _ in range(repeat):
        clock = StageClock(sync)
        instrument(clock, model)
        try:
            with clock.stage('total'):
                step(clock)
        finally:
            clock.restore()
        for name, ms in clock.ms.items():
            runs[name].append(ms)
    return {name: statistics.median(runs[name]) for name in STAGES if name in runs}


def pair_ratio(timings, a, b):
    """The median over runs of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(timings[a]['runs'], timings[b]['runs']))


def side_by_side(timings):
    """race's result as flat {name}_{ms,min_ms,max_ms,peak_mb,runs_ms} per variant, and the
    ratios: 'ratio' ours / torchvision as its users run it; 'ratio_same_tricks' ours /
    torchvision with all our settings; what each setting alone does to torchvision's time:
    'layout_gain' (our convolutions: the device's layout, Winograd where ours runs it),
    'optimizer_gain' (fused SGD, in training) and
    'allocator_gain' (freed memory kept)."""
    previous = ('torchvision_our_convs_fused' if 'torchvision_our_convs_fused' in timings
                else 'torchvision_our_convs')
    out = {'ratio': pair_ratio(timings, 'ours', 'torchvision'),
           'ratio_same_tricks': pair_ratio(timings, 'ours', 'torchvision_our_settings'),
           'layout_gain': pair_ratio(timings, 'torchvision_our_convs', 'torchvision'),
           'allocator_gain': pair_ratio(timings, 'torchvision_our_settings', previous)}
    if previous != 'torchvision_our_convs':
        out['optimizer_gain'] = pair_ratio(timings, previous, 'torchvision_our_convs')
    for name, t in timings.items():
        out.update({f'{name}_ms': t['median'], f'{name}_min_ms': t['min'],
                    f'{name}_max_ms': t['max'], f'{name}_peak_mb': t['peak_mb'],
                    f'{name}_runs_ms': t['runs']})
    return out


def loader_speed(workers=(0, 1, 2), n_images=60, min_size=600, max_size=1000):
    """Training samples per second the DataLoader gives from a VOC-format folder of 500x375
    JPEGs (the toy generator's scenes, enlarged), with 0, 1 and 2 worker processes."""
    import tempfile

    import numpy as np
    from PIL import Image

    from data import toy
    from data.dataset import TrainDataset, build_bbox_dataset, collate_train
    speeds = {}
    with tempfile.TemporaryDirectory() as root:
        root, rng = Path(root), np.random.default_rng(0)
        for folder in ('Annotations', 'JPEGImages', 'ImageSets/Main'):
            (root / folder).mkdir(parents=True)
        (root / 'ImageSets/Main/trainval.txt').write_text(
            ''.join(f'{k:06d}\n' for k in range(n_images)))
        for k in range(n_images):
            image, objects = toy._sample(rng)
            (h, w), (new_h, new_w) = image.shape[:2], (375, 500)
            Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR).save(
                root / 'JPEGImages' / f'{k:06d}.jpg', quality=90)
            objects = [(label, [max(1, round(v * (new_w / w if i % 2 == 0 else new_h / h)))
                                for i, v in enumerate(box)], difficult)
                       for label, box, difficult in objects]
            (root / 'Annotations' / f'{k:06d}.xml').write_text(
                toy._xml(f'{k:06d}', new_h, new_w, objects))
        bbox_dataset = build_bbox_dataset('custom', str(root), 'trainval',
                                          class_names=toy.CLASS_NAMES)
        dataset = TrainDataset(bbox_dataset, min_size, max_size, 'torchvision')
        for n_workers in workers:
            loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=n_workers,
                                                 collate_fn=collate_train)
            batches = iter(loader)
            next(batches)  # worker start-up (once per epoch) aside
            start = time.perf_counter()
            n = sum(len(batch['images']) for batch in batches)
            speeds[n_workers] = n / (time.perf_counter() - start)
    return speeds


def run_benchmark(height=600, width=800, batch_size=1, repeat=5, warmup=1, device='cpu',
                  amp=False, n_class=20, seed=0, threads=None, extractor='vgg16',
                  loader_images=60):
    """Times both models and breaks ours down; returns the result as a JSON-ready dict."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16

    def autocast(cache_enabled=True):
        return (torch.autocast(device.type, dtype=amp_dtype, cache_enabled=cache_enabled) if amp
                else nullcontext())

    torch.manual_seed(seed)
    cfg = Config(dataset='voc07', extractor=extractor, min_size=min(height, width),
                 max_size=max(height, width))  # the extractor's defaults; predict keeps the size
    ours = speed_up(build_faster_rcnn(n_class, cfg.model_options()))  # as train.py runs it
    if extractor.endswith('_fpn'):
        if extractor == 'small_fpn':
            raise ValueError('--extractor=small_fpn has no torchvision counterpart to time')
        theirs = torchvision_fpn_twin(ours, int(extractor[6:-4]), height, width).to(device)
    else:
        theirs = torchvision_twin(ours, height, width).to(device)
    ours = ours.to(device)
    # As its users run it: NCHW, torch's direct convolutions (the twin copied our modules).
    images, bboxes, labels = synthetic_batch(batch_size, height, width, n_class, seed)
    images, bboxes, labels = (images.to(device), [b.to(device) for b in bboxes],
                              [lab.to(device) for lab in labels])
    image_list = list(images)  # predict takes original RGB 0..255 images
    normalization = ours.transform.normalization  # the stage clock wraps the transform
    unit_images = [img / 255 for img in images]  # torchvision detection takes 0..1 images
    sizes, scales = [(height, width)] * batch_size, [1.0] * batch_size
    targets = [{'boxes': b, 'labels': lab + 1} for b, lab in zip(bboxes, labels)]  # 0 = bg
    generator = torch.Generator(device=device).manual_seed(seed)
    # torchvision as its users run it: NCHW, torch.optim.SGD with its defaults (one for-loop
    # over the parameters on CPU); and with our convolutions, then also our fused optimizer.
    with autocast():  # the speed switch's choice: under --amp, channels-last on AVX-512 too
        layout = fastest_layout(device) if is_wide(ours) else torch.contiguous_format
    theirs_tuned = with_our_convs(copy.deepcopy(theirs), layout)
    theirs_optimizer, theirs_tuned_optimizer = (
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=SGD['lr'],
                        momentum=SGD['momentum'], weight_decay=SGD['weight_decay'])
        for m in (theirs, theirs_tuned))
    ours_optimizer, theirs_fused_optimizer = (make_optimizer(m, **SGD)
                                              for m in (ours, theirs_tuned))

    def ours_inference(clock=None):
        with autocast():
            ours.predict(image_list)

    @torch.no_grad()
    def theirs_inference(model=theirs, cache_casts=False):
        model.eval()
        with autocast(cache_casts):
            model(unit_images)

    def ours_train(clock=None):
        clock = clock or StageClock(lambda: None)
        ours.train()
        ours_optimizer.zero_grad(set_to_none=True)
        with clock.stage('forward'), autocast():
            losses = ours(normalize(images, normalization), sizes, scales, bboxes, labels,
                          generator)
        with clock.stage('backward'):
            losses['total_loss'].backward()
        with clock.stage('optimizer_step'):
            ours_optimizer.step()

    def theirs_train(model=theirs, optimizer=theirs_optimizer):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            total = sum(model(unit_images, targets).values())
        total.backward()
        optimizer.step()

    # Inference first: training steps change the weights. Under --amp, one autocast context
    # around all of it, as train.evaluate and detect hold one around their loops: our weights
    # (and torchvision's with our settings) are cast to bf16 once; torchvision as its users
    # run it casts them in every call, as a context per call does.
    with autocast():
        inference = race({'ours': ours_inference, 'torchvision': theirs_inference,
                          'torchvision_our_convs': partial(theirs_inference, theirs_tuned),
                          'torchvision_our_settings': partial(theirs_inference, theirs_tuned,
                                                              cache_casts=True)},
                         repeat, warmup, device, sync)
        inference_stages = breakdown(ours_inference, ours, repeat, sync)
    train = race({'ours': ours_train, 'torchvision': theirs_train,
                  'torchvision_our_convs': partial(theirs_train, theirs_tuned,
                                                   theirs_tuned_optimizer),
                  'torchvision_our_convs_fused': partial(theirs_train, theirs_tuned,
                                                         theirs_fused_optimizer),
                  'torchvision_our_settings': partial(theirs_train, theirs_tuned,
                                                      theirs_fused_optimizer)},
                 repeat, warmup, device, sync)
    train_stages = breakdown(ours_train, ours, repeat, sync)
    for timings in (inference, train):
        for t in timings.values():  # images per second of each variant
            t['images_per_s'] = 1e3 * batch_size / t['median']

    stages = inference_stages
    convs_and_fc = stages['backbone'] + stages['head'] - stages['head.roi_pool']
    return {
        'device': str(device),
        'cpu_capability': cpu_capability() if device.type == 'cpu' else None,
        'convolutions': convolutions(ours, layout, device),
        'inference': side_by_side(inference),
        'train': side_by_side(train),
        'breakdown': {
            'inference': inference_stages, 'train': train_stages,
            # the goal: everything but the backbone convolutions and the head's fc layers
            'inference_outside_backbone_and_fc': 1 - convs_and_fc / stages['total'],
        },
        'images_per_s': {step: {name: t['images_per_s'] for name, t in timings.items()}
                         for step, timings in (('inference', inference), ('train', train))},
        'loader_images_per_s': loader_speed(n_images=loader_images) if loader_images else None,
        'memory': ('CUDA: max_memory_allocated growth' if device.type == 'cuda' else
                   'CPU: peak RSS growth, sampled every 5 ms (psutil), largest over the runs'),
        'settings': dict(height=height, width=width, batch_size=batch_size, repeat=repeat,
                         warmup=warmup, amp=amp, n_class=n_class, seed=seed, extractor=extractor,
                         threads=torch.get_num_threads()),
        'torch': torch.__version__, 'torchvision': torchvision.__version__,
    }


def _mb(value):
    return 'n/a' if value is None else f'{value:.0f}'


def markdown(result):
    """The result as markdown tables: ours vs torchvision, our stages, the loader."""
    s = result['settings']
    lines = [f"{s.get('extractor', 'vgg16')}, "
             f"{s['batch_size']} x {s['height']}x{s['width']} on {result['device']}, "
             f"amp={s['amp']}, {s['threads']} threads, median [min-max] of {s['repeat']} runs",
             '',
             '| step | ours ms | torchvision ms (as its users run it) | ours / torchvision '
             '| torchvision ms (our settings) | ours / that | ours img/s '
             '| ours peak MiB | torchvision peak MiB |',
             '|---|---|---|---|---|---|---|---|---|']
    for key, label in (('inference', 'inference'), ('train', 'train step')):
        r = result[key]
        lines.append(
            f"| {label} | {r['ours_ms']:.0f} [{r['ours_min_ms']:.0f}-{r['ours_max_ms']:.0f}] "
            f"| {r['torchvision_ms']:.0f} [{r['torchvision_min_ms']:.0f}-"
            f"{r['torchvision_max_ms']:.0f}] | {r['ratio']:.2f} "
            f"| {r['torchvision_our_settings_ms']:.0f} "
            f"| {r['ratio_same_tricks']:.2f} | {result['images_per_s'][key]['ours']:.2f} "
            f"| {_mb(r['ours_peak_mb'])} | {_mb(r['torchvision_peak_mb'])} |")
    inference, train = result['inference'], result['train']
    lines += ['', "Our settings, one at a time, as factors on torchvision's time: our "
              f"convolutions ({result['convolutions']}) x{inference['layout_gain']:.2f} "
              f"(inference), x{train['layout_gain']:.2f} (train "
              f"step); the fused optimizer x{train['optimizer_gain']:.2f} (train step); freed "
              f"memory kept x{inference['allocator_gain']:.2f} (inference), "
              f"x{train['allocator_gain']:.2f} (train step)"
              + (', with bf16 weights cast once for all inference runs.' if
                 result['settings']['amp'] else '.'),
              '', f"Peak memory: {result['memory']}.", '',
              '| our stage (median ms) | inference | train step |', '|---|---|---|']
    inference, train = result['breakdown']['inference'], result['breakdown']['train']
    for name in (name for name in STAGES if name in inference or name in train):
        cells = [f'{d[name]:.1f}' if name in d else '' for d in (inference, train)]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    share = result['breakdown']['inference_outside_backbone_and_fc']
    lines += ['', f'Inference time outside the backbone convolutions and the head fc layers: '
              f'{share:.1%}']
    if result.get('loader_images_per_s'):
        lines += ['', '| DataLoader workers | 0 | 1 | 2 |', '|---|---|---|---|',
                  '| training samples/s (500x375 JPEG -> 600x800) | ' + ' | '.join(
                      f'{v:.1f}' for v in result['loader_images_per_s'].values()) + ' |']
    return '\n'.join(lines)


def main(height=600, width=800, batch_size=1, repeat=5, warmup=1, device='cpu', amp=False,
         n_class=20, out=None, seed=0, threads=None, extractor='vgg16', loader_images=60):
    """Prints the markdown tables; ``out``: also write the result as JSON to this file.
    loader_images: VOC-sized images for the DataLoader's samples/s, 0 to skip it."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f'repeat must be >= 1 and warmup >= 0, got {repeat} and {warmup}')
    result = run_benchmark(height, width, batch_size, repeat, warmup, device, amp, n_class,
                           seed, threads, extractor, loader_images)
    print(markdown(result))
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
    run_command(main)
