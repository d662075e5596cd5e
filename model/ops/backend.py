"""The one place that picks the backend of NMS and RoI pooling, and the CuPy plumbing.

Backends: 'cupy' runs our CUDA kernels (nms.cu, roi_pool.cu, roi_align.cu here) through CuPy;
'torchvision' uses torchvision.ops; 'auto' takes CuPy for CUDA tensors when CuPy imports and
can launch a kernel on that device, torchvision.ops otherwise. CuPy is optional: nothing here
imports it until a CUDA tensor asks for it.
"""
import functools
import warnings
from pathlib import Path

import torch

BACKENDS = ('auto', 'cupy', 'torchvision')


@functools.cache
def _cupy_error(device_index):
    """None if CuPy imports, compiles and launches a kernel on cuda:device_index, else why not."""
    try:
        import cupy
        with cupy.cuda.Device(device_index):
            cupy.RawKernel('extern "C" __global__ void probe() {}', 'probe')((1,), (1,), ())
    except Exception as error:  # ImportError, no driver, no NVRTC, ...: use torchvision.ops
        return f'{type(error).__name__}: {error}'
    return None


def cupy_problem():
    """None if our CuPy kernels can run on this machine's first GPU, else why not."""
    return _cupy_error(0) if torch.cuda.is_available() else 'no CUDA GPU'


def use_cupy(tensor, backend='auto'):
    """True if the op on `tensor` should run our CuPy kernels, False for torchvision.ops.

    backend: 'auto' | 'cupy' | 'torchvision'. Forcing 'cupy' where it cannot run raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if backend == 'cupy' and not tensor.is_cuda:
        raise ValueError("backend='cupy' needs a CUDA tensor and CuPy (pip install -r "
                         f"requirements-gpu.txt); got a {tensor.device.type} tensor")
    if backend == 'torchvision' or not tensor.is_cuda:
        return False
    error = _cupy_error(tensor.device.index)
    if error is not None and backend == 'cupy':
        raise RuntimeError("backend='cupy' needs CuPy working on the tensor's device (pip "
                           f'install -r requirements-gpu.txt); CuPy failed with {error}')
    if error is not None and not error.startswith(('ImportError', 'ModuleNotFoundError')):
        warnings.warn(f'CuPy is installed but failed ({error}); using torchvision.ops instead',
                      stacklevel=2)
    return error is None


def pool_rois(x, rois, backend, cupy_op, torchvision_op, *params):
    """RoIPool's and RoIAlign's forward: x (N, C, H, W) float; rois (R, 5) (batch index, x_min,
    y_min, x_max, y_max) in input pixels. Runs cupy_op (our kernels' autograd Function's apply,
    given contiguous inputs) where use_cupy says so, else torchvision_op; both take (x, rois,
    *params) with x and rois in float32 or float64: float16 / bfloat16 run in float32. Returns
    the output in x's dtype."""
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f'rois must be (R, 5), got {tuple(rois.shape)}')
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if use_cupy(x, backend):
        return cupy_op(x.to(dtype).contiguous(), rois.to(dtype).contiguous(), *params).to(x.dtype)
    return torchvision_op(x.to(dtype), rois.to(dtype), *params).to(x.dtype)


@functools.cache
def compile_kernel(source_file, name, dtype=torch.float32):
    """The kernel `name` of the CUDA file `source_file` (in model/ops), compiled once with
    scalar_t = float or double.

    Compiled without FMA contraction so that every multiply and add rounds as on the CPU,
    which keeps box arithmetic bit-identical to torchvision's CPU ops.
    """
    import cupy
    scalar = {torch.float32: 'float', torch.float64: 'double'}[dtype]
    source = Path(__file__).with_name(source_file).read_text()
    return cupy.RawKernel(f'typedef {scalar} scalar_t;\n{source}', name, options=('--fmad=false',))


def launch_per_element(source_file, name, n_elements, args):
    """Launches the kernel `name` of `source_file`, compiled for the dtype of args[0], with one
    thread per output element: n_elements threads in blocks of 256, none if n_elements is 0."""
    if n_elements > 0:
        kernel = compile_kernel(source_file, name, args[0].dtype)
        launch(kernel, (-(-n_elements // 256),), (256,), args)


def launch(kernel, grid, block, args, shared_mem=0):
    """Launch `kernel` on torch's current CUDA stream of the tensors' device.

    args: contiguous CUDA tensors (passed as device pointers, no copy), Python ints (C int)
    and floats (C double).
    """
    import cupy
    device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
    stream = torch.cuda.current_stream(device)
    if hasattr(cupy.cuda.Stream, 'from_external') and hasattr(stream, '__cuda_stream__'):
        cupy_stream = cupy.cuda.Stream.from_external(stream)  # CuPy >= 14
    else:  # CuPy 13, or a torch stream without the CUDA stream protocol
        cupy_stream = cupy.cuda.ExternalStream(stream.cuda_stream, device.index)
    to_c = {int: cupy.int32, float: cupy.float64}
    assert all(arg.is_contiguous() for arg in args if isinstance(arg, torch.Tensor))
    with cupy.cuda.Device(device.index), cupy_stream:
        args = tuple(cupy.from_dlpack(arg.detach()) if isinstance(arg, torch.Tensor)
                     else to_c[type(arg)](arg) for arg in args)
        kernel(grid, block, args, shared_mem=shared_mem)
