"""model/ops/speed.py: the speed switch (what it changes, that it changes nothing else, that it
undoes), Winograd 3x3 convolutions (NNPACK) against torch's direct convolution, their
gradients, when WinogradConv2d takes them, and the layout choice."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.faster_rcnn import ModelOptions, build_faster_rcnn
from model.ops import speed
from model.ops.speed import Winograd3x3, WinogradConv2d, fastest_layout, speed_up, use_winograd

needs_nnpack = pytest.mark.skipif(not torch._nnpack_available(),
                                  reason='this torch build has no NNPACK')


def relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max()) if b.numel() else 0.0


@needs_nnpack
def test_winograd_of_a_hand_checkable_image():
    """An all-ones 3x3 kernel sums each pixel's 3x3 neighbourhood (zero padding)."""
    x = torch.arange(12.).view(1, 1, 3, 4)
    out = Winograd3x3.apply(x, torch.ones(1, 1, 3, 3), torch.tensor([0.5]))
    expected = torch.tensor([[[[10., 18, 24, 18], [27, 45, 54, 39], [26, 42, 48, 34]]]]) + 0.5
    assert torch.allclose(out, expected, atol=1e-4)


@needs_nnpack
@pytest.mark.parametrize('n, c_in, c_out, h, w', [
    (1, 3, 8, 1, 1), (2, 5, 7, 2, 3), (3, 16, 4, 9, 13), (1, 64, 32, 37, 50), (2, 32, 64, 20, 7)])
@pytest.mark.parametrize('bias', [True, False])
def test_winograd_equals_direct_convolution(n, c_in, c_out, h, w, bias):
    """Values and all three gradients, on odd sizes, single pixels and batches."""
    g = torch.Generator().manual_seed(n * 1000 + c_in + h)
    x = torch.randn(n, c_in, h, w, generator=g, requires_grad=True)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(c_out, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(n, c_out, h, w, generator=g)
    outputs = []
    for fn in (lambda: Winograd3x3.apply(x, weight, b), lambda: F.conv2d(x, weight, b, 1, 1)):
        out = fn()
        inputs = (x, weight) + ((b,) if bias else ())
        outputs.append((out, *torch.autograd.grad(out, inputs, grad)))
    for ours, reference in zip(*outputs):
        assert ours.shape == reference.shape
        assert relative_error(ours, reference) < 1e-4


@needs_nnpack
def test_winograd_gradients_only_where_needed():
    """A frozen kernel with an input that needs a gradient, and the reverse (VGG16's conv3_1,
    whose input comes from frozen layers): each gets the one gradient it needs."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 8, 12, 10, generator=g), torch.randn(6, 8, 3, 3, generator=g)
    frozen_input = x.clone().requires_grad_()
    Winograd3x3.apply(frozen_input, weight, None).sum().backward()
    expected = torch.autograd.grad(F.conv2d(frozen_input, weight, None, 1, 1).sum(),
                                   frozen_input)[0]
    assert relative_error(frozen_input.grad, expected) < 1e-4
    trained = weight.clone().requires_grad_()
    bias = torch.zeros(6, requires_grad=True)
    Winograd3x3.apply(x, trained, bias).square().sum().backward()
    expected = torch.autograd.grad(F.conv2d(x, trained, bias, 1, 1).square().sum(),
                                   (trained, bias))
    assert relative_error(trained.grad, expected[0]) < 1e-4
    assert relative_error(bias.grad, expected[1]) < 1e-4


@needs_nnpack
def test_winograd_is_deterministic():
    x, weight = torch.randn(1, 128, 40, 60), torch.randn(128, 128, 3, 3)
    first = Winograd3x3.apply(x, weight, None)
    assert all(torch.equal(first, Winograd3x3.apply(x, weight, None)) for _ in range(3))


def test_use_winograd_swaps_only_3x3_stride_1_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1),
                          nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, 1, 2, dilation=2),
                          nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.Conv2d(8, 4, 3, padding=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_winograd(model) is model
    assert [type(m) is WinogradConv2d for m in model] == [True, False, False, False, False, True]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize('available', [True, False])
def test_winograd_conv2d_runs_winograd_only_on_nchw_float32_outside_autocast(
        monkeypatch, available):
    if available and not torch._nnpack_available():
        pytest.skip('this torch build has no NNPACK')
    monkeypatch.setattr(speed, 'winograd_available', lambda: available)
    monkeypatch.setattr(speed, 'MIN_CELLS', 600)  # this layer's 20 x 30 ...
    monkeypatch.setattr(speed, 'MIN_WORK', 16 * 16 * 600)  # ... of 16 channels
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, '_nnpack_spatial_convolution',
                        lambda *args: calls.append(1) or nnpack(*args))
    torch.manual_seed(0)
    layer = use_winograd(nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1)))[0]
    x = torch.randn(2, 16, 20, 30)
    reference = F.conv2d(x, layer.weight, layer.bias, 1, 1)
    out = layer(x)
    assert len(calls) == int(available)
    assert relative_error(out, reference) < 1e-4
    # Direct convolution, bit for bit, whatever the machine: channels-last, float64, autocast.
    calls.clear()
    assert torch.equal(layer(x.contiguous(memory_format=torch.channels_last)),
                       F.conv2d(x.contiguous(memory_format=torch.channels_last), layer.weight,
                                layer.bias, 1, 1))
    double = layer.double()
    assert torch.equal(double(x.double()), F.conv2d(x.double(), double.weight, double.bias, 1, 1))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        layer = layer.float()
        assert layer(x).dtype == torch.bfloat16
    assert not calls


@needs_nnpack
def test_winograd_conv2d_runs_winograd_only_on_large_layers(monkeypatch):
    """MIN_CELLS output cells and MIN_WORK = C_in * C_out * H * W, with VGG16's sizes."""
    monkeypatch.setattr(speed, 'winograd_available', lambda: True)
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, '_nnpack_spatial_convolution',
                        lambda *args: calls.append(args[0].shape) or nnpack(*args))
    with torch.no_grad():
        for c_in, c_out, h, w in ((512, 512, 37, 50), (256, 512, 75, 100),  # conv5_1, conv4_1
                                  (512, 512, 32, 44), (64, 128, 75, 100), (3, 64, 600, 800)):
            layer = use_winograd(nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1)))[0]
            layer(torch.zeros(1, c_in, h, w))
    assert calls == [(1, 512, 37, 50), (1, 256, 75, 100)]  # too few cells, work, channels


def test_winograd_conv2d_compiles_as_a_direct_convolution(monkeypatch):
    """torch.compile traces shapes with fake tensors, which NNPACK's op cannot take: compiled,
    the layer is torch's convolution (the compiler's own, not Winograd)."""
    monkeypatch.setattr(speed, 'winograd_available', lambda: True)
    monkeypatch.setattr(speed, 'MIN_CELLS', 0)
    monkeypatch.setattr(speed, 'MIN_WORK', 0)
    torch.manual_seed(0)
    layer = use_winograd(nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU()))
    x = torch.randn(1, 8, 12, 16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='eager', fullgraph=True)
    expected = F.conv2d(x, layer[0].weight, layer[0].bias, 1, 1).relu()
    torch.testing.assert_close(compiled(x), expected)


@pytest.mark.parametrize('winograd', [True, False])
def test_fastest_layout(monkeypatch, winograd):
    """CUDA: channels-last. AVX-512 CPUs: channels-last for oneDNN's bfloat16 kernels under
    autocast, NCHW for Winograd in float32 where it is available. Other CPUs: NCHW."""
    monkeypatch.setattr(speed, 'winograd_available', lambda: winograd)
    for amp in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            assert fastest_layout('cuda') == torch.channels_last  # a name suffices
            for capability, layout in (
                    ('AVX512', torch.channels_last if amp or not winograd
                     else torch.contiguous_format),
                    ('AVX2', torch.contiguous_format), ('DEFAULT', torch.contiguous_format)):
                monkeypatch.setattr(speed, 'cpu_capability', lambda capability=capability:
                                    capability)
                assert fastest_layout('cpu') == layout, (capability, amp)
                assert fastest_layout(torch.device('cpu')) == layout


def test_winograd_available_on_x86_cpus_with_nnpack(monkeypatch):
    for capability, expected in (('AVX2', torch._nnpack_available()),
                                 ('AVX512', torch._nnpack_available()),
                                 ('DEFAULT', False), ('NO AVX', False), ('SVE256', False)):
        monkeypatch.setattr(speed, 'cpu_capability', lambda capability=capability: capability)
        assert speed.winograd_available.__wrapped__() == expected, capability


@needs_nnpack
def test_winograd_available_initialises_nnpack():
    """NNPACK's convolutions fail until it is initialised; winograd_available does that, and
    WinogradConv2d asks it before its first Winograd3x3 (a fresh process shows it)."""
    code = ('import torch; from torch import nn; from model.ops import speed\n'
            'torch.manual_seed(0)\n'
            'speed.MIN_CELLS = speed.MIN_WORK = 0\n'
            'speed.cpu_capability = lambda: "AVX2"\n'
            'layer = speed.use_winograd(nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1)))[0]\n'
            'x = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(0))\n'
            'assert torch.allclose(layer(x), nn.functional.conv2d(x, layer.weight, layer.bias,'
            ' 1, 1), rtol=1e-4, atol=1e-4)\n')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).parents[1])


def plain(model):
    """Whether a model is as build_faster_rcnn returns it: no WinogradConv2d, no hooks."""
    return (not any(type(m) is WinogradConv2d for m in model.modules())
            and not any(m._forward_pre_hooks for m in model.modules()))


@pytest.mark.parametrize('extractor, wide', [('vgg16', True), ('small', False)])
def test_speed_up_switches_on_and_off_with_the_same_state_dict(extractor, wide):
    """Winograd on every 3x3 stride-1 conv; the layout hook on wide models only; undone to
    the plain model; applied twice, once."""
    torch.manual_seed(0)
    model = build_faster_rcnn(3, ModelOptions(extractor))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert plain(model)
    assert speed_up(model) is model and speed_up(model) is model
    n_3x3 = sum(type(m) is nn.Conv2d or type(m) is WinogradConv2d for m in model.modules()
                if getattr(m, 'kernel_size', None) == (3, 3) and m.stride == (1, 1))
    assert sum(type(m) is WinogradConv2d for m in model.modules()) == n_3x3 > 0
    assert len(model._forward_pre_hooks) == int(wide)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert speed_up(model, enabled=False) is model and plain(model)


@torch.no_grad()
def test_speed_up_leaves_the_outputs_as_they_were():
    """On this machine, whatever it runs (Winograd and the layout where they pay): VGG16's
    detections within 1e-4 relative of the plain model's."""
    torch.manual_seed(0)
    model = build_faster_rcnn(3, ModelOptions('vgg16', min_size=320, max_size=480)).eval()
    images = [torch.rand(3, 320, 400, generator=torch.Generator().manual_seed(1)) * 255]
    expected = model.predict(images, score_thresh=0.0)
    fast = speed_up(model).predict(images, score_thresh=0.0)
    for ours, reference in zip(fast, expected, strict=True):
        torch.testing.assert_close(ours[0], reference[0], rtol=1e-4, atol=1e-4)


def test_mixed_precision_warns_where_it_is_slower_than_float32(monkeypatch):
    assert speed.fast_mixed_precision('cuda')  # no device needed: float16 on any CUDA GPU
    assert speed.fast_mixed_precision('cpu') in (True, False)
    monkeypatch.setattr(speed, 'fast_mixed_precision', lambda device: False)
    with pytest.warns(UserWarning, match='emulated.*use --amp=false'):
        with speed.mixed_precision('cpu', True):
            assert torch.get_autocast_dtype('cpu') == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with speed.mixed_precision('cpu', False):
            assert not torch.is_autocast_enabled('cpu')
    monkeypatch.setattr(speed, 'fast_mixed_precision', lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with speed.mixed_precision('cpu', True):
            assert torch.is_autocast_enabled('cpu')


@pytest.mark.slow
def test_keep_freed_memory_stops_page_faults_on_reused_blocks():
    """glibc by default maps blocks over 32 MB fresh: every 64 MB tensor page-faults anew.
    After keep_freed_memory, once the heap has grown to hold them (the first two may take new
    pages), later 64 MB tensors reuse freed pages: the last three of six fault 10x less."""
    code = '\n'.join([
        'import resource, sys, torch', 'from model.ops.speed import keep_freed_memory',
        "if sys.argv[1] == 'keep':", '    keep_freed_memory()',
        'for i in range(6):',
        '    if i == 3:', '        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt',
        '    torch.ones(64 << 18)',  # 64 MB
        'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)'])
    faults = {mode: int(subprocess.run([sys.executable, '-c', code, mode], check=True,
                                       capture_output=True, text=True,
                                       cwd=Path(__file__).parents[1]).stdout)
              for mode in ('default', 'keep')}
    assert faults['keep'] * 10 < faults['default']
