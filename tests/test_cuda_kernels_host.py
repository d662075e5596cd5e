"""Our CUDA kernels (model/ops/nms.cu, roi_pool.cu, roi_align.cu), run on the CPU.

On a GPU the kernels run through CuPy (model/ops/backend.py compile_kernel prepends
`typedef float scalar_t;` or double and compiles with --fmad=false). CI has no GPU, so here g++
compiles the same, unmodified source for the host, on top of tests/cuda_host_shim.h, which
emulates the CUDA features the kernels use:

- the built-in threadIdx / blockIdx / blockDim / gridDim (unsigned, as in CUDA);
- a launch grid, block, shared_mem: blocks one after another, the threads of a block as
  concurrent std::threads;
- __shared__ arrays shared by the block's threads; dynamic `extern __shared__` memory, a
  buffer of exactly shared_mem bytes, filled with garbage and followed by a guard zone (the one
  textual change to the source: that declaration becomes a pointer to the buffer);
- __syncthreads() as a barrier over the block's threads (the launch fails if they do not all
  reach it equally often), atomicAdd as an atomic read-modify-write (counted, see below), and
  CUDA's min / max / round / floor / ceil;
- CUDA's limits on the launch configuration (block size, grid size, dynamic shared memory).

Why this is evidence for the GPU code path: the kernel source, the scalar types and the launch
geometry are those CuPy runs (the tests launch the kernels with the grid, block and shared
memory sizes of model/ops/nms.py, roi_pool.py and roi_align.py, and the test_*_cuda_path tests
run those modules' own CUDA branch with only CuPy's compile and launch swapped for the host
build);
-ffp-contract=off keeps every float / double operation rounded as with --fmad=false, so the
results must be bit-identical to torchvision's CPU ops, the oracle. The threads of a block run
concurrently, so a missing barrier corrupts shared memory as in a real launch. A lost update
of a plain += instead of atomicAdd is too rare on two cores to show, so the backward tests
count the atomicAdd calls instead. Not covered: what only the device has (warp scheduling,
memory ordering between blocks, registers and static shared memory per block, speed). NVRTC,
which CuPy compiles with, needs no GPU: test_kernels_compile_with_nvrtc compiles the sources
with it where it is installed.
"""
import ctypes
import glob
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

OPS_DIR = Path(__file__).resolve().parents[1] / 'model' / 'ops'
SHIM = Path(__file__).with_name('cuda_host_shim.h')
KERNELS = {'nms.cu': ('nms_mask', 'nms_reduce'),
           'roi_pool.cu': ('roi_pool_forward', 'roi_pool_backward'),
           'roi_align.cu': ('roi_align_forward', 'roi_align_backward')}
SCALARS = {torch.float32: 'float', torch.float64: 'double'}
CXX_FLAGS = ('-std=c++20', '-O1', '-shared', '-fPIC', '-pthread', '-ffp-contract=off',
             '-fvisibility=hidden', '-Wall')
# `extern __shared__ T name[];` -> `T* name = static_cast<T*>(host_cuda::dynamic_shared);`
EXTERN_SHARED = re.compile(r'extern\s+__shared__\s+([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;')
N_EXTERN_SHARED = {'nms.cu': 1, 'roi_pool.cu': 0, 'roi_align.cu': 0}
# launch status codes of the shim (host_cuda::Status)
DIVERGENT_SYNCTHREADS, SHARED_MEMORY_OVERFLOW, INVALID_CONFIGURATION = 1, 2, 3
STATUS = {DIVERGENT_SYNCTHREADS: 'the threads of a block called __syncthreads() unequally often',
          SHARED_MEMORY_OVERFLOW: 'a write past the end of the dynamic shared memory',
          INVALID_CONFIGURATION: 'a grid, block or shared memory size beyond CUDA\'s limits'}

# Kernels that check the shim itself (test_shim_self_check): what it must catch or guarantee.
SELF_TEST_SOURCE = r'''
extern "C" __global__ void self_test_barrier(int* out) {
  __shared__ int seen[256];
  seen[threadIdx.x] = blockIdx.x * 1000 + threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = seen[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void self_test_atomic(scalar_t* total, const int n) {
  for (int i = 0; i < n; ++i) atomicAdd(total, (scalar_t)1);
}
extern "C" __global__ void self_test_divergent_sync(int* out) {
  if (threadIdx.x % 2) __syncthreads();
  out[threadIdx.x] = 1;
}
extern "C" __global__ void self_test_shared_overflow(const int n) {
  extern __shared__ int scratch[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) scratch[i] = i;
}
'''
SELF_TEST_KERNELS = ('self_test_barrier', 'self_test_atomic', 'self_test_divergent_sync',
                     'self_test_shared_overflow')


def host_source(scalar, sources):
    """One C++ translation unit: the shim, the CUDA sources ({file name: text}) with scalar_t
    = `scalar`, and a launcher per kernel."""
    parts = [f'typedef {scalar} scalar_t;', f'#include "{SHIM}"']
    for name, text in sources.items():
        text, n_found = EXTERN_SHARED.subn(
            r'\1* \2 = static_cast<\1*>(host_cuda::dynamic_shared);', text)
        assert n_found == N_EXTERN_SHARED.get(name, n_found), (  # any number in self_test.cu
            f'{name}: expected {N_EXTERN_SHARED[name]} `extern __shared__ T name[];`, found '
            f'{n_found}; update EXTERN_SHARED / N_EXTERN_SHARED for the new declaration')
        parts += [f'#line 1 "{name}"', text]
    kernel_names = [k for names in KERNELS.values() for k in names] + list(SELF_TEST_KERNELS)
    parts += [f'HOST_CUDA_EXPORT({kernel})' for kernel in kernel_names]
    return '\n'.join(parts) + '\n'


def build_host_kernels(out_dir):
    """Compiles the kernels for float and double (in parallel) in out_dir; {dtype: CDLL}."""
    sources = {name: (OPS_DIR / name).read_text() for name in KERNELS}
    sources['self_test.cu'] = SELF_TEST_SOURCE
    jobs = {}
    for dtype, scalar in SCALARS.items():
        cpp, lib = out_dir / f'kernels_{scalar}.cpp', out_dir / f'kernels_{scalar}.so'
        cpp.write_text(host_source(scalar, sources))
        jobs[dtype] = lib, subprocess.Popen(['g++', *CXX_FLAGS, str(cpp), '-o', str(lib)],
                                            stderr=subprocess.PIPE, text=True)
    libs = {}
    for dtype, (lib, job) in jobs.items():
        errors = job.communicate()[1]
        assert job.returncode == 0, f'g++ failed for {SCALARS[dtype]}:\n{errors}'
        libs[dtype] = ctypes.CDLL(str(lib))
        libs[dtype].host_cuda_atomic_add_calls.restype = ctypes.c_longlong
    return libs


class HostKernel:
    """A kernel of the host build: what compile_kernel returns, for `launch`."""

    def __init__(self, lib, name):
        self.name, self.function, self.lib = name, getattr(lib, f'launch_{name}'), lib

    def atomic_add_calls(self):
        """The number of atomicAdd calls in this library since the last call of this method."""
        return self.lib.host_cuda_atomic_add_calls()


def launch_status(kernel, grid, block, args, shared_mem=0):
    """kernel<<<grid, block, shared_mem>>>(*args) on the host, like model.ops.backend.launch:
    contiguous tensors by pointer, Python ints as C int, floats as C double. 0 or a STATUS."""
    c_args = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            assert arg.is_contiguous() and arg.device.type == 'cpu'
            c_args.append(ctypes.c_void_p(arg.data_ptr()))
        else:
            c_args.append({int: ctypes.c_int, float: ctypes.c_double}[type(arg)](arg))
    arg_pointers = (ctypes.c_void_p * len(c_args))(
        *[ctypes.cast(ctypes.pointer(arg), ctypes.c_void_p) for arg in c_args])

    def dim3(dims):
        return (ctypes.c_uint * 3)(*dims, *(1,) * (3 - len(dims)))

    return kernel.function(dim3(grid), dim3(block), ctypes.c_size_t(shared_mem), arg_pointers)


def launch(kernel, grid, block, args, shared_mem=0):
    """launch_status that must succeed: a drop-in for model.ops.backend.launch."""
    status = launch_status(kernel, grid, block, args, shared_mem)
    assert status == 0, f'{kernel.name}: {STATUS.get(status, status)}'


@pytest.fixture(scope='session')
def host_kernels(tmp_path_factory):
    """host_kernels(name, dtype) -> HostKernel, from one build per test session."""
    if shutil.which('g++') is None:
        pytest.skip('needs g++ with C++20 to build the CUDA kernels for the host')
    libs = build_host_kernels(tmp_path_factory.mktemp('cuda_host'))
    return lambda name, dtype: HostKernel(libs[dtype], name)


# ----------------------------------------------------------------------------------- the shim

@pytest.mark.parametrize('dtype', SCALARS)
def test_shim_self_check(host_kernels, dtype):
    """The shim orders shared memory at barriers, adds atomically, and fails a launch on
    divergent __syncthreads(), on overflowing dynamic shared memory and beyond CUDA's limits."""
    out = torch.zeros(3 * 256, dtype=torch.int32)
    launch(host_kernels('self_test_barrier', dtype), (3,), (256,), (out,))
    t = torch.arange(256)
    expected = torch.arange(3)[:, None] * 1000 + (t + 1) % 256
    assert torch.equal(out.view(3, 256), expected.int())

    total = torch.zeros(1, dtype=dtype)
    launch(host_kernels('self_test_atomic', dtype), (2,), (256,), (total, 500))
    assert total.item() == 2 * 256 * 500

    out = torch.zeros(64, dtype=torch.int32)
    status = launch_status(host_kernels('self_test_divergent_sync', dtype), (1,), (64,), (out,))
    assert status == DIVERGENT_SYNCTHREADS
    overflow = host_kernels('self_test_shared_overflow', dtype)
    launch(overflow, (2,), (64,), (100,), shared_mem=100 * 4)
    status = launch_status(overflow, (2,), (64,), (101,), shared_mem=100 * 4)
    assert status == SHARED_MEMORY_OVERFLOW
    for grid, block, shared_mem in [((0,), (64,), 0), ((1,), (1025,), 0), ((1,), (64,), 49153)]:
        status = launch_status(overflow, grid, block, (0,), shared_mem)
        assert status == INVALID_CONFIGURATION


# ------------------------------------------------------------------------------------------ NMS

def random_boxes(n, seed, dtype):
    """(n, 4) proposal-like boxes (jittered copies of n / 20 objects, so IoUs spread over (0, 1)
    and many sit near any threshold) and unique scores. Every other box has whole coordinates,
    so that many IoUs are simple fractions such as 1/2 or 3/10: exactly on a threshold, where
    IoU == thresh must not suppress (3/10 in float32 rounds above 0.3, in float64 it does not)."""
    g = torch.Generator().manual_seed(seed)
    n_object = max(n // 20, 1)
    object_xy = torch.rand(n_object, 2, generator=g, dtype=torch.float64) * 60
    object_wh = 2 + torch.rand(n_object, 2, generator=g, dtype=torch.float64) * 20
    pick = torch.randint(0, n_object, (n,), generator=g)
    jitter = torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.15
    xy = object_xy[pick] + jitter[:, :2] * object_wh[pick]
    wh = object_wh[pick] * (1 + jitter[:, 2:]).clamp(min=0.2)
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[::2] = boxes[::2].round()
    score = torch.randperm(n, generator=g).to(dtype) / n
    return boxes.to(dtype), score


def run_nms_kernels(host_kernels, sorted_boxes, thresh, max_keep):
    """nms_mask then nms_reduce on boxes in priority order, launched as model/ops/nms.py
    _nms_cupy launches them. Returns keep (R,) bool and the mask words (R, col_blocks), which
    start as all ones (the kernels must not read the words they do not write)."""
    n, dtype = sorted_boxes.shape[0], sorted_boxes.dtype
    col_blocks = (n + 63) // 64
    mask = torch.full((n * col_blocks,), -1, dtype=torch.int64)
    keep = torch.zeros(n, dtype=torch.uint8)
    launch(host_kernels('nms_mask', dtype), (col_blocks, col_blocks), (64,),
              (sorted_boxes, n, float(thresh), mask))
    launch(host_kernels('nms_reduce', dtype), (1,), (256,), (mask, n, max_keep, keep),
              shared_mem=col_blocks * 8)
    return keep.bool(), mask.view(n, col_blocks)


def iou(boxes):
    """(R, R) IoU in boxes' dtype, elementwise in the order of operations of torchvision's CPU
    nms (continuous coordinates, no +1)."""
    a, b = boxes[:, None], boxes[None]
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area[:, None] + area[None] - inter)


@pytest.mark.parametrize('dtype', SCALARS)
@pytest.mark.parametrize('thresh', [0.3, 0.5, 0.7])
def test_nms_kernels_equal_torchvision(host_kernels, dtype, thresh):
    """700 boxes (11 column blocks, the last one partial): mask bit k of word (i, x) is set iff
    box j = 64 x + k > i overlaps box i by IoU > thresh; words left of the diagonal are not
    written; the kept boxes are exactly torchvision.ops.nms's, in the same order."""
    n = 700
    boxes, score = random_boxes(n, seed=int(thresh * 10), dtype=dtype)
    order = torch.sort(score, descending=True, stable=True).indices
    sorted_boxes = boxes[order].contiguous()
    keep, mask = run_nms_kernels(host_kernels, sorted_boxes, thresh, max_keep=n)

    col_blocks = mask.shape[1]
    written = torch.arange(col_blocks)[None] >= (torch.arange(n) // 64)[:, None]  # (R, blocks)
    assert (mask[~written] == -1).all()
    bits = ((mask[:, :, None] >> torch.arange(64)) & 1).bool()  # (R, blocks, 64)
    expected_bits = torch.zeros(n, col_blocks * 64, dtype=torch.bool)
    sorted_iou = iou(sorted_boxes)
    assert (sorted_iou == torch.tensor(thresh, dtype=dtype)).any()  # ties at thresh occur
    expected_bits[:, :n] = torch.triu(sorted_iou.double() > thresh, diagonal=1)  # double compare
    expected_bits = expected_bits.view(n, col_blocks, 64)
    assert torch.equal(bits[written], expected_bits[written])

    expected = torchvision.ops.nms(boxes, score, thresh)
    assert 10 < len(expected) < n - 100  # a real mix of kept and suppressed boxes
    assert order[keep].tolist() == expected.tolist()


@pytest.mark.parametrize('n', [1, 63, 64, 65, 128])
def test_nms_kernels_block_edges(host_kernels, n):
    """Box counts at and around the 64-box block size."""
    boxes, score = random_boxes(n, seed=n, dtype=torch.float32)
    order = torch.sort(score, descending=True, stable=True).indices
    keep, _ = run_nms_kernels(host_kernels, boxes[order].contiguous(), 0.5, max_keep=n)
    assert order[keep].tolist() == torchvision.ops.nms(boxes, score, 0.5).tolist()


@pytest.mark.parametrize('dtype', SCALARS)
def test_nms_kernels_max_keep(host_kernels, dtype):
    """max_keep stops the reduction after that many kept boxes: the first max_keep of the
    full result, and nothing after them is marked."""
    n = 300
    boxes, score = random_boxes(n, seed=7, dtype=dtype)
    order = torch.sort(score, descending=True, stable=True).indices
    expected = torchvision.ops.nms(boxes, score, 0.5).tolist()
    for max_keep in (0, 1, 10, len(expected) - 1, len(expected), n):
        keep, _ = run_nms_kernels(host_kernels, boxes[order].contiguous(), 0.5, max_keep)
        assert order[keep].tolist() == expected[:max_keep]


# ------------------------------------------------------------------------------------ RoI pool

N_IMAGES, CHANNELS, HEIGHT, WIDTH = 2, 3, 13, 17

# (batch index, x_min, y_min, x_max, y_max) in feature cells; the RoIs are these / spatial_scale
SPECIAL_ROIS = [
    (0, 2, 3, 9, 8),            # inside the map
    (0, 3, 4, 10, 9),           # overlaps the first: both pool some of the same cells
    (1, 0, 0, 16, 12),          # the whole map
    (0, 5, 5, 5, 5),            # empty (a point): 1 x 1, all bins pool the same cell
    (1, 9, 8, 3, 2),            # inverted: also forced to 1 x 1
    (0, 4.2, 3.3, 4.4, 3.6),    # smaller than a cell
    (1, 2.5, 3.5, 6.5, 7.5),    # halves: round half away from zero
    (0, -0.5, -1.5, 0.5, 1.5),  # negative halves
    (1, -3, -2, 4, 5),          # partly outside, top left
    (0, 14, 10, 22, 19),        # partly outside, bottom right
    (1, 20, 15, 26, 21),        # fully outside: every bin empty (0, argmax -1)
    (0, -9, -8, -2, -1),        # fully outside, negative
    (0, 1, 1, 30, 2),           # wide and flat, cut by the right edge
]


def roi_pool_inputs(dtype, spatial_scale, seed=0):
    """x (N, C, H, W) with ties (channel 0 on a coarse grid, a constant negative patch in
    channel 1: the first maximum in scan order must win, -FLT_MAX must start the search) and
    rois (R, 5) in input pixels: SPECIAL_ROIS and 40 random ones, many overlapping. RoIAlign
    uses them too: they sample inside, near and beyond every edge of the map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_IMAGES, CHANNELS, HEIGHT, WIDTH, generator=g, dtype=torch.float64)
    x[:, 0] = (x[:, 0] * 2).round()
    x[:, 1, 4:9, 5:12] = -1.5
    n_random = 40
    center = torch.rand(n_random, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [WIDTH + 4.0, HEIGHT + 4.0]) - 2
    size = torch.exp(torch.rand(n_random, 2, generator=g, dtype=torch.float64) * 4 - 1.5)
    batch = torch.randint(0, N_IMAGES, (n_random, 1), generator=g).double()
    random_rois = torch.cat([batch, center - size / 2, center + size / 2], dim=1)
    rois = torch.cat([torch.tensor(SPECIAL_ROIS, dtype=torch.float64), random_rois])
    rois[:, 1:] /= spatial_scale
    return x.to(dtype), rois.to(dtype)


def run_roi_pool_forward(host_kernels, x, rois, spatial_scale, pooled_h, pooled_w):
    """roi_pool_forward, launched as model/ops/roi_pool.py RoIPoolFunction.forward does;
    out and argmax start as NaN and -7 so that every element must be written."""
    out = torch.full((rois.shape[0], CHANNELS, pooled_h, pooled_w), float('nan'), dtype=x.dtype)
    argmax = torch.full(out.shape, -7, dtype=torch.int32)
    launch(host_kernels('roi_pool_forward', x.dtype), (-(-out.numel() // 256),), (256,), (
        x, rois, float(spatial_scale), CHANNELS, HEIGHT, WIDTH, pooled_h, pooled_w,
        out.numel(), out, argmax))
    return out, argmax


def run_roi_pool_backward(host_kernels, grad, argmax, rois):
    """roi_pool_backward, launched as RoIPoolFunction.backward does; grad_in (N, C, H, W)
    and the number of atomicAdd calls."""
    grad_in = torch.zeros(N_IMAGES, CHANNELS, HEIGHT, WIDTH, dtype=grad.dtype)
    pooled_size = argmax.shape[2] * argmax.shape[3]
    kernel = host_kernels('roi_pool_backward', grad.dtype)
    kernel.atomic_add_calls()  # reset the count
    launch(kernel, (-(-grad.numel() // 256),), (256,), (
        grad, argmax, rois, CHANNELS, HEIGHT, WIDTH, pooled_size, grad.numel(), grad_in))
    return grad_in, kernel.atomic_add_calls()


SPATIAL_SCALES = [1 / 16, 1 / 8, 1.0, 0.3]  # 0.3: not a power of two, rounded to scalar_t


@pytest.mark.parametrize('dtype', SCALARS)
@pytest.mark.parametrize('spatial_scale', SPATIAL_SCALES, ids=['1/16', '1/8', '1', '0.3'])
@pytest.mark.parametrize('pooled', [(7, 7), (3, 5)], ids=['7x7', '3x5'])
def test_roi_pool_forward_equals_torchvision(host_kernels, dtype, spatial_scale, pooled):
    """Output and argmax bit for bit equal to torch.ops.torchvision.roi_pool's."""
    x, rois = roi_pool_inputs(dtype, spatial_scale)
    out, argmax = run_roi_pool_forward(host_kernels, x, rois, spatial_scale, *pooled)
    expected_out, expected_argmax = torch.ops.torchvision.roi_pool(
        x, rois, spatial_scale, *pooled)
    assert torch.equal(argmax, expected_argmax)
    assert torch.equal(out, expected_out)
    assert (argmax == -1).any() and (argmax >= 0).any()  # empty and non-empty bins both ran


@pytest.mark.parametrize('dtype', SCALARS)
@pytest.mark.parametrize('spatial_scale', [1 / 16, 1.0], ids=['1/16', '1'])
def test_roi_pool_backward_equals_index_add(host_kernels, dtype, spatial_scale):
    """grad_in is grad_out added at each output's argmax (an index_add_; -1 adds nothing).
    Gradients are multiples of 1/4, so every order of the atomic additions gives the same sum:
    the comparison is exact. Every addition is an atomicAdd, and overlapping RoIs make many
    threads add to the same cell."""
    x, rois = roi_pool_inputs(dtype, spatial_scale)
    _, argmax = run_roi_pool_forward(host_kernels, x, rois, spatial_scale, 7, 7)
    g = torch.Generator().manual_seed(1)
    grad = (torch.randint(-16, 17, argmax.shape, generator=g) / 4).to(dtype)
    grad_in, atomic_add_calls = run_roi_pool_backward(host_kernels, grad, argmax, rois)

    n_roi = rois.shape[0]
    plane = rois[:, 0].long()[:, None] * CHANNELS + torch.arange(CHANNELS)  # (R, C)
    index = plane[:, :, None] * (HEIGHT * WIDTH) + argmax.view(n_roi, CHANNELS, -1)
    valid = argmax.view(n_roi, CHANNELS, -1) >= 0
    expected = torch.zeros(grad_in.numel(), dtype=dtype).index_add_(
        0, index[valid], grad.view(n_roi, CHANNELS, -1)[valid]).view(grad_in.shape)
    assert torch.equal(grad_in, expected)

    assert atomic_add_calls == valid.sum()
    # the atomicAdd path was exercised: cells that get gradient from several RoIs
    roi_of = torch.arange(n_roi)[:, None, None].expand_as(index)
    pairs = torch.unique(torch.stack([index[valid], roi_of[valid]]), dim=1)  # (cell, roi) pairs
    _, rois_per_cell = torch.unique(pairs[0], return_counts=True)
    assert (rois_per_cell >= 2).sum() >= 10 and rois_per_cell.max() >= 4


# ------------------------------------------------------------------------------------ RoIAlign

def run_roi_align(host_kernels, name, source, rois, spatial_scale, pooled, sampling_ratio,
                  aligned, target):
    """roi_align_forward (source x, target out) or roi_align_backward (source grad_out, target
    grad_in), launched as model/ops/roi_align.py launches them: one thread per element of the
    (R, C, PH, PW) output. Returns the number of atomicAdd calls."""
    total = rois.shape[0] * CHANNELS * pooled[0] * pooled[1]
    kernel = host_kernels(name, rois.dtype)
    kernel.atomic_add_calls()  # reset the count
    launch(kernel, (-(-total // 256),), (256,), (
        source, rois, float(spatial_scale), CHANNELS, HEIGHT, WIDTH, *pooled, sampling_ratio,
        int(aligned), total, target))
    return kernel.atomic_add_calls()


def roi_align_forward(host_kernels, x, rois, spatial_scale, pooled, sampling_ratio, aligned):
    """(R, C, PH, PW) output of the forward kernel; it starts as NaN, so every element must be
    written."""
    out = torch.full((rois.shape[0], CHANNELS, *pooled), float('nan'), dtype=x.dtype)
    run_roi_align(host_kernels, 'roi_align_forward', x, rois, spatial_scale, pooled,
                  sampling_ratio, aligned, out)
    return out


def torchvision_roi_align_backward(grad, rois, spatial_scale, sampling_ratio, aligned):
    """torchvision's CPU backward: grad_in (N, C, H, W) of grad_out (R, C, PH, PW)."""
    return torch.ops.torchvision._roi_align_backward(
        grad, rois, spatial_scale, *grad.shape[2:], N_IMAGES, CHANNELS, HEIGHT, WIDTH,
        sampling_ratio, aligned)


ALIGN_OPTIONS = [(0, True), (1, True), (2, True), (0, False), (2, False)]  # sampling, aligned


@pytest.mark.parametrize('dtype', SCALARS)
@pytest.mark.parametrize('spatial_scale', SPATIAL_SCALES, ids=['1/16', '1/8', '1', '0.3'])
@pytest.mark.parametrize('sampling_ratio, aligned', ALIGN_OPTIONS)
def test_roi_align_forward_equals_torchvision(host_kernels, dtype, spatial_scale, sampling_ratio,
                                             aligned):
    """Bit for bit torch.ops.torchvision.roi_align's on RoIs inside, partly and wholly outside
    the map, tiny, empty and inverted (with aligned, an inverted RoI has negative bins)."""
    x, rois = roi_pool_inputs(dtype, spatial_scale)
    for pooled in [(7, 7), (3, 5)]:
        out = roi_align_forward(host_kernels, x, rois, spatial_scale, pooled, sampling_ratio,
                                aligned)
        expected = torch.ops.torchvision.roi_align(x, rois, spatial_scale, *pooled,
                                                   sampling_ratio, aligned)
        assert torch.equal(out, expected)
        assert (expected == 0).all(dim=(1, 2, 3)).any()  # a RoI whose samples all miss the map


@pytest.mark.parametrize('dtype', SCALARS)
def test_roi_align_forward_inverted_on_one_axis(host_kernels, dtype):
    """Aligned with adaptive sampling, a RoI inverted along one axis only has a grid of
    ceil(negative) x positive samples: torchvision 0.29's CPU op fails on it (a std::vector of
    negative size), so there is no oracle; our kernel samples nothing and gives 0."""
    x, _ = roi_pool_inputs(dtype, 1.0)
    rois = torch.tensor([[0, 9.0, 2, 3, 8], [1, 3.0, 8, 9, 2]], dtype=dtype)
    out = roi_align_forward(host_kernels, x, rois, 1.0, (2, 2), 0, True)
    assert torch.equal(out, torch.zeros_like(out))


def half_cell_rois(dtype, spatial_scale):
    """roi_pool_inputs's x and rois with the RoI corners moved to the nearest half cell."""
    x, rois = roi_pool_inputs(torch.float64, spatial_scale)
    rois[:, 1:] = (rois[:, 1:] * spatial_scale * 2).round() / 2 / spatial_scale
    return x.to(dtype), rois.to(dtype)


@pytest.mark.parametrize('dtype', SCALARS)
@pytest.mark.parametrize('spatial_scale', [1 / 16, 1.0], ids=['1/16', '1'])
@pytest.mark.parametrize('sampling_ratio, aligned', [(1, True), (2, True), (2, False)])
def test_roi_align_backward_equals_torchvision(host_kernels, dtype, spatial_scale,
                                               sampling_ratio, aligned):
    """Bit for bit torchvision's CPU backward, whatever the order of the atomic additions:
    with RoI corners on half cells (spatial_scale a power of 2: exact), 4 or 2 bins per side
    and 1 or 2 samples per bin, every sample lies on a multiple of 1/32 cell, so every weight
    is a multiple of 2^-10, and with integer gradients in [-8, 8] every term grad * weight /
    count a multiple of 2^-12. Each partial sum at a cell is then a multiple of 2^-12 below
    sum |term| < 2^12 in magnitude (asserted): 24 bits, exact in float32, in any order.
    Every addition is an atomicAdd: 4 per sample inside the map (counted with a map of ones,
    whose output is (samples inside) / count exactly), and cells get several of them."""
    x, rois = half_cell_rois(dtype, spatial_scale)
    for pooled in [(4, 4), (2, 4)]:
        g = torch.Generator().manual_seed(pooled[0])
        grad = torch.randint(-8, 9, (rois.shape[0], CHANNELS, *pooled), generator=g).to(dtype)
        grad_in = torch.zeros(N_IMAGES, CHANNELS, HEIGHT, WIDTH, dtype=dtype)
        atomic_add_calls = run_roi_align(host_kernels, 'roi_align_backward', grad, rois,
                                         spatial_scale, pooled, sampling_ratio, aligned, grad_in)
        expected = torchvision_roi_align_backward(grad, rois, spatial_scale, sampling_ratio,
                                                  aligned)
        assert torch.equal(grad_in, expected)

        sum_abs = torchvision_roi_align_backward(grad.abs(), rois, spatial_scale,
                                                 sampling_ratio, aligned)
        assert sum_abs.max() < 2 ** 12
        inside = torch.ops.torchvision.roi_align(
            torch.ones(x.shape, dtype=torch.float64), rois.double(), spatial_scale, *pooled,
            sampling_ratio, aligned) * sampling_ratio ** 2  # (R, C, PH, PW) samples inside
        assert atomic_add_calls == 4 * inside.sum() > 2 * grad_in.numel()
        assert (inside < sampling_ratio ** 2).any() and (inside > 0).any()


@pytest.mark.parametrize('dtype', SCALARS)
@pytest.mark.parametrize('spatial_scale', [0.3, 1 / 16], ids=['0.3', '1/16'])
@pytest.mark.parametrize('aligned', [True, False])
def test_roi_align_backward_close_to_torchvision(host_kernels, dtype, spatial_scale, aligned):
    """Any RoIs, adaptive sampling, random gradients: the same terms as torchvision's, added
    in another order, so only the rounding of the sums differs. A sum of n terms is off the
    exact sum by at most about (n - 1) u sum |term| (u = eps / 2; Higham, Accuracy and
    Stability, sec. 4.2), so the two differ by at most n eps sum |term|, with n <= all the
    atomicAdd calls and sum |term| at a cell the backward of |grad| (weights are >= 0)."""
    _, rois = roi_pool_inputs(dtype, spatial_scale)
    grad = torch.randn(rois.shape[0], CHANNELS, 7, 7, generator=torch.Generator().manual_seed(4),
                       dtype=dtype)
    grad_in = torch.zeros(N_IMAGES, CHANNELS, HEIGHT, WIDTH, dtype=dtype)
    atomic_add_calls = run_roi_align(host_kernels, 'roi_align_backward', grad, rois,
                                     spatial_scale, (7, 7), 0, aligned, grad_in)
    expected = torchvision_roi_align_backward(grad, rois, spatial_scale, 0, aligned)
    bound = atomic_add_calls * torch.finfo(dtype).eps * torchvision_roi_align_backward(
        grad.abs(), rois, spatial_scale, 0, aligned)
    assert ((grad_in - expected).abs() <= bound).all()
    assert atomic_add_calls > 2 * grad_in.numel()


# --------------------------------------------- model.ops's CUDA branch, with the host build

@pytest.fixture
def cuda_path_on_host(monkeypatch, host_kernels):
    """model.ops takes its CuPy branch for CPU tensors, with CuPy's compile_kernel and launch
    replaced by the host build: its launch configurations and arguments are what runs."""
    from model.ops import backend

    def compile_kernel(source_file, name, dtype=torch.float32):
        assert name in KERNELS[source_file]
        return host_kernels(name, dtype)

    monkeypatch.setattr(backend, 'use_cupy', lambda tensor, backend='auto': True)
    monkeypatch.setattr(backend, 'compile_kernel', compile_kernel)
    monkeypatch.setattr(backend, 'launch', launch)


@pytest.mark.parametrize('dtype', SCALARS)
def test_model_ops_cuda_path(cuda_path_on_host, dtype):
    """non_maximum_suppression (with and without scores, with a limit) and RoIPool (forward and
    backward) through their CUDA branch equal torchvision.ops.nms and torchvision.ops.roi_pool
    (with its autograd backward)."""
    from model.ops import RoIPool, non_maximum_suppression

    boxes, score = random_boxes(300, seed=3, dtype=dtype)
    expected = torchvision.ops.nms(boxes, score, 0.7)
    for limit in (None, 5):
        keep = non_maximum_suppression(boxes, 0.7, score, limit=limit, backend='cupy')
        assert keep.tolist() == expected[:limit].tolist()
    in_given_order = torchvision.ops.nms(boxes, torch.arange(300, 0, -1).to(dtype), 0.7)
    assert non_maximum_suppression(boxes, 0.7, backend='cupy').tolist() == in_given_order.tolist()

    x, rois = roi_pool_inputs(dtype, 1 / 16)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = RoIPool(7, 7, 1 / 16, backend='cupy')(x_ours, rois)
    expected_out = torchvision.ops.roi_pool(x_theirs, rois, (7, 7), 1 / 16)
    assert torch.equal(out, expected_out)
    grad = (torch.randint(-16, 17, out.shape, generator=torch.Generator().manual_seed(2)) / 4)
    out.backward(grad.to(dtype))
    expected_out.backward(grad.to(dtype))
    assert torch.equal(x_ours.grad, x_theirs.grad)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16])
def test_roi_align_cuda_path(cuda_path_on_host, dtype):
    """RoIAlign through its CUDA branch equals torchvision.ops.roi_align with its autograd,
    forward and backward (exact on half cells, as in test_roi_align_backward_equals_torchvision),
    adaptive and fixed sampling; float16 runs in float32 on both sides. No RoIs: no launch."""
    from model.ops import RoIAlign

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x, rois = half_cell_rois(compute, 1 / 16)
    x = x.to(dtype)
    grad = torch.randint(-8, 9, (rois.shape[0], CHANNELS, 4, 4),
                         generator=torch.Generator().manual_seed(5))
    for output_size, sampling_ratio, aligned in [((4, 4), 2, True), (4, 0, False)]:
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = RoIAlign(output_size, 1 / 16, sampling_ratio, aligned, backend='cupy')(x_ours, rois)
        expected = torchvision.ops.roi_align(x_theirs.to(compute), rois, output_size, 1 / 16,
                                             sampling_ratio, aligned).to(dtype)
        assert out.dtype == dtype and torch.equal(out, expected)
        if sampling_ratio:  # adaptive grids of 3 x 3 divide by 9: not exact in any order
            out.backward(grad.to(dtype))
            expected.backward(grad.to(dtype))
            assert x_ours.grad.dtype == dtype and torch.equal(x_ours.grad, x_theirs.grad)

    x_ours = x.clone().requires_grad_()
    out = RoIAlign(7, 1 / 16, backend='cupy')(x_ours, rois[:0])
    assert out.shape == (0, CHANNELS, 7, 7)
    out.sum().backward()
    assert torch.equal(x_ours.grad, torch.zeros_like(x_ours))


# ----------------------------------------------------------------------------------- NVRTC

def find_nvrtc():
    """libnvrtc from the nvidia-* wheels that CUDA builds of torch install, else None."""
    spec = importlib.util.find_spec('nvidia')
    if spec is None or spec.submodule_search_locations is None:
        return None
    found = sorted(path for folder in spec.submodule_search_locations
                   for path in glob.glob(f'{folder}/*/lib/libnvrtc.so*'))
    return found[0] if found else None


def nvrtc_compile(nvrtc, source, name):
    """(success, log) of compiling `source` as CuPy's RawKernel does, with --fmad=false."""
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(),
                                    0, None, None) == 0
    options = (ctypes.c_char_p * 1)(b'--fmad=false')
    result = nvrtc.nvrtcCompileProgram(program, 1, options)
    log_size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
    log = ctypes.create_string_buffer(log_size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return result == 0, log.value.decode(errors='replace')


def test_kernels_compile_with_nvrtc():
    """The unmodified sources compile with NVRTC (what CuPy uses; it needs no GPU) for float
    and double, without warnings: the host build above cannot catch device-only errors."""
    path = find_nvrtc()
    if path is None:
        pytest.skip('needs libnvrtc (the nvidia-cuda-nvrtc wheel of a CUDA build of torch)')
    nvrtc = ctypes.CDLL(path)
    assert nvrtc_compile(nvrtc, 'this is not CUDA', 'broken.cu')[0] is False
    for name in KERNELS:
        for scalar in SCALARS.values():
            source = f'typedef {scalar} scalar_t;\n' + (OPS_DIR / name).read_text()
            success, log = nvrtc_compile(nvrtc, source, name)
            assert success and not log.strip(), f'{name} with {scalar}:\n{log}'
