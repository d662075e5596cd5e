// RoI max pooling, forward and backward; compiled by model/ops/backend.py with
// scalar_t = float or double. The arithmetic is described in roi_pool.py.

// One thread per output element (r, c, ph, pw) of the (R, C, PH, PW) output.
extern "C" __global__ void roi_pool_forward(
    const scalar_t* x, const scalar_t* rois, const double spatial_scale, const int channels,
    const int height, const int width, const int pooled_h, const int pooled_w,
    const int total, scalar_t* out, int* argmax) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int pw = index % pooled_w;
  const int ph = (index / pooled_w) % pooled_h;
  const int c = (index / pooled_w / pooled_h) % channels;
  const int r = index / pooled_w / pooled_h / channels;
  const scalar_t* roi = rois + r * 5;
  const scalar_t scale = (scalar_t)spatial_scale;
  const int start_w = (int)round(roi[1] * scale);
  const int start_h = (int)round(roi[2] * scale);
  const int roi_w = max((int)round(roi[3] * scale) - start_w + 1, 1);
  const int roi_h = max((int)round(roi[4] * scale) - start_h + 1, 1);
  const scalar_t bin_w = (scalar_t)roi_w / (scalar_t)pooled_w;
  const scalar_t bin_h = (scalar_t)roi_h / (scalar_t)pooled_h;
  const int hstart = min(max((int)floor((scalar_t)ph * bin_h) + start_h, 0), height);
  const int hend = min(max((int)ceil((scalar_t)(ph + 1) * bin_h) + start_h, 0), height);
  const int wstart = min(max((int)floor((scalar_t)pw * bin_w) + start_w, 0), width);
  const int wend = min(max((int)ceil((scalar_t)(pw + 1) * bin_w) + start_w, 0), width);
  const bool empty = hend <= hstart || wend <= wstart;
  // -FLT_MAX as torchvision starts from, for double too; an empty bin gives 0 and -1.
  scalar_t best = empty ? (scalar_t)0 : (scalar_t)-3.402823466e+38f;
  int best_index = -1;
  const scalar_t* plane = x + ((long long)(int)roi[0] * channels + c) * height * width;
  for (int h = hstart; h < hend; ++h) {
    for (int w = wstart; w < wend; ++w) {
      if (plane[h * width + w] > best) {
        best = plane[h * width + w];
        best_index = h * width + w;
      }
    }
  }
  out[index] = best;
  argmax[index] = best_index;
}

// One thread per element of grad_out (R, C, PH, PW): add it to grad_in at its argmax.
extern "C" __global__ void roi_pool_backward(
    const scalar_t* grad_out, const int* argmax, const scalar_t* rois, const int channels,
    const int height, const int width, const int pooled_size, const int total,
    scalar_t* grad_in) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total || argmax[index] < 0) return;
  const int c = (index / pooled_size) % channels;
  const int r = index / pooled_size / channels;
  const long long plane = ((long long)(int)rois[r * 5] * channels + c) * height * width;
  atomicAdd(grad_in + plane + argmax[index], grad_out[index]);
}
