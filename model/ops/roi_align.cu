// RoIAlign, forward and backward; compiled by model/ops/backend.py with scalar_t = float or
// double. The semantics are described in roi_align.py. Every expression is the one of
// torchvision's CPU kernel, in the same order of operations and precision, so that (compiled
// without FMA contraction) the forward is bit-identical to it and the backward adds the same
// terms (in another order: atomicAdd).

// A RoI in feature cells: where its bins start, their size, and the sampling grid in each bin.
struct RoIGrid {
  int batch;                  // the RoI's image
  scalar_t start_h, start_w;  // top left corner, shifted by -0.5 if aligned
  scalar_t bin_h, bin_w;      // bin height and width
  int grid_h, grid_w;         // sampling points per bin: sampling_ratio, or adaptive
  scalar_t count;             // the divisor of the average, max(grid_h * grid_w, 1)
};

__device__ RoIGrid roi_grid(const scalar_t* roi, const double spatial_scale, const int pooled_h,
                            const int pooled_w, const int sampling_ratio, const int aligned) {
  const scalar_t scale = (scalar_t)spatial_scale;
  const scalar_t offset = aligned ? (scalar_t)0.5 : (scalar_t)0.0;
  RoIGrid grid;
  grid.batch = (int)roi[0];
  grid.start_w = roi[1] * scale - offset;
  grid.start_h = roi[2] * scale - offset;
  scalar_t roi_w = (roi[3] * scale - offset) - grid.start_w;
  scalar_t roi_h = (roi[4] * scale - offset) - grid.start_h;
  if (!aligned) {  // not aligned: malformed RoIs are forced to 1 x 1
    roi_w = max(roi_w, (scalar_t)1);
    roi_h = max(roi_h, (scalar_t)1);
  }
  grid.bin_h = roi_h / (scalar_t)pooled_h;
  grid.bin_w = roi_w / (scalar_t)pooled_w;
  grid.grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceil(roi_h / pooled_h);
  grid.grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceil(roi_w / pooled_w);
  grid.count = (scalar_t)max(grid.grid_h * grid.grid_w, 1);
  return grid;
}

// Sampling point i of bin p along one axis: the centre of the i-th of `n` equal parts.
__device__ scalar_t sample_point(const scalar_t start, const int p, const scalar_t bin,
                                 const int i, const int n) {
  return start + p * bin + (scalar_t)(i + .5f) * bin / (scalar_t)n;
}

// Bilinear interpolation at (y, x) of a height x width plane: the flat indices of the four
// cells around it and their weights. Outside [-1, height] x [-1, width] (or NaN): false, with
// weights 0 at index 0; inside, coordinates below 0 or beyond the last cell are clamped to it.
__device__ bool bilinear(const int height, const int width, scalar_t y, scalar_t x, int* index,
                         scalar_t* weight) {
  if (!(y >= -1.0 && y <= height && x >= -1.0 && x <= width)) {
    for (int k = 0; k < 4; ++k) {
      index[k] = 0;
      weight[k] = 0;
    }
    return false;
  }
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int y_low = (int)y, x_low = (int)x, y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = (scalar_t)y_low;
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = (scalar_t)x_low;
  } else {
    x_high = x_low + 1;
  }
  const scalar_t ly = y - y_low, lx = x - x_low;
  const scalar_t hy = 1. - ly, hx = 1. - lx;  // subtracted in double, as torchvision does
  index[0] = y_low * width + x_low;
  index[1] = y_low * width + x_high;
  index[2] = y_high * width + x_low;
  index[3] = y_high * width + x_high;
  weight[0] = hy * hx;
  weight[1] = hy * lx;
  weight[2] = ly * hx;
  weight[3] = ly * lx;
  return true;
}

// One thread per output element (r, c, ph, pw) of the (R, C, PH, PW) output: the average of
// the bilinear samples of its bin. Samples outside the map add 0 * x[0], as in torchvision.
extern "C" __global__ void roi_align_forward(
    const scalar_t* x, const scalar_t* rois, const double spatial_scale, const int channels,
    const int height, const int width, const int pooled_h, const int pooled_w,
    const int sampling_ratio, const int aligned, const int total, scalar_t* out) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int pw = index % pooled_w;
  const int ph = (index / pooled_w) % pooled_h;
  const int c = (index / pooled_w / pooled_h) % channels;
  const int r = index / pooled_w / pooled_h / channels;
  const RoIGrid grid = roi_grid(rois + r * 5, spatial_scale, pooled_h, pooled_w,
                                sampling_ratio, aligned);
  const scalar_t* plane = x + ((long long)grid.batch * channels + c) * height * width;
  scalar_t sum = 0;
  for (int iy = 0; iy < grid.grid_h; ++iy) {
    const scalar_t y = sample_point(grid.start_h, ph, grid.bin_h, iy, grid.grid_h);
    for (int ix = 0; ix < grid.grid_w; ++ix) {
      const scalar_t x_point = sample_point(grid.start_w, pw, grid.bin_w, ix, grid.grid_w);
      int cell[4];
      scalar_t weight[4];
      bilinear(height, width, y, x_point, cell, weight);
      sum += weight[0] * plane[cell[0]] + weight[1] * plane[cell[1]] +
             weight[2] * plane[cell[2]] + weight[3] * plane[cell[3]];
    }
  }
  out[index] = sum / grid.count;
}

// One thread per element of grad_out (R, C, PH, PW): spread it over the cells its bin sampled,
// grad * weight / count to each (atomicAdd: bins of overlapping RoIs share cells).
extern "C" __global__ void roi_align_backward(
    const scalar_t* grad_out, const scalar_t* rois, const double spatial_scale,
    const int channels, const int height, const int width, const int pooled_h,
    const int pooled_w, const int sampling_ratio, const int aligned, const int total,
    scalar_t* grad_in) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int pw = index % pooled_w;
  const int ph = (index / pooled_w) % pooled_h;
  const int c = (index / pooled_w / pooled_h) % channels;
  const int r = index / pooled_w / pooled_h / channels;
  const RoIGrid grid = roi_grid(rois + r * 5, spatial_scale, pooled_h, pooled_w,
                                sampling_ratio, aligned);
  scalar_t* plane = grad_in + ((long long)grid.batch * channels + c) * height * width;
  const scalar_t grad = grad_out[index];
  for (int iy = 0; iy < grid.grid_h; ++iy) {
    const scalar_t y = sample_point(grid.start_h, ph, grid.bin_h, iy, grid.grid_h);
    for (int ix = 0; ix < grid.grid_w; ++ix) {
      const scalar_t x_point = sample_point(grid.start_w, pw, grid.bin_w, ix, grid.grid_w);
      int cell[4];
      scalar_t weight[4];
      if (!bilinear(height, width, y, x_point, cell, weight)) continue;
      for (int k = 0; k < 4; ++k) atomicAdd(plane + cell[k], grad * weight[k] / grid.count);
    }
  }
}
