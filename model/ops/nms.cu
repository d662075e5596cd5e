// Bitmask NMS, compiled by model/ops/backend.py with scalar_t = float or double.
//
// Boxes are sorted by score (highest first) before the kernels run, so "box i" is the i-th
// highest. n boxes make col_blocks = ceil(n / 64) column blocks of 64 boxes each.
//
// nms_mask: grid (col_blocks, col_blocks), 64 threads. Block (x = column block, y = row block)
// stages its 64 column boxes in shared memory; thread t takes row box i = 64 * y + t and sets
// bit k of mask[i, x] when box i overlaps box 64 * x + k with IoU > thresh and 64 * x + k > i.
// Words left of the diagonal (x < y) are never read, so they are never written.
//
// nms_reduce: one block walks the boxes in order with a `removed` bitset of col_blocks words in
// shared memory: a box whose bit is clear is kept, and its mask row is OR-ed into `removed` by
// all threads together. It stops after max_keep kept boxes and writes keep[i] = 1 for kept i.

// IoU(a, b) > thresh with continuous coordinates (no +1), in the order of operations of
// torchvision's CPU nms; thresh is a double as there, so the comparison rounds the same.
__device__ bool iou_above(const scalar_t* a, const scalar_t* b, const double thresh) {
  const scalar_t w = max(min(a[2], b[2]) - max(a[0], b[0]), (scalar_t)0);
  const scalar_t h = max(min(a[3], b[3]) - max(a[1], b[1]), (scalar_t)0);
  const scalar_t inter = w * h;
  const scalar_t area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const scalar_t area_b = (b[2] - b[0]) * (b[3] - b[1]);
  return inter / (area_a + area_b - inter) > thresh;
}

extern "C" __global__ void nms_mask(const scalar_t* boxes, const int n, const double thresh,
                                    unsigned long long* mask) {
  const int row_block = blockIdx.y, col_block = blockIdx.x, col_blocks = gridDim.x;
  if (col_block < row_block) return;  // whole block: below the diagonal is never read
  __shared__ scalar_t col_boxes[64 * 4];
  const int col = col_block * 64 + threadIdx.x;
  if (col < n) {
    for (int k = 0; k < 4; ++k) col_boxes[threadIdx.x * 4 + k] = boxes[col * 4 + k];
  }
  __syncthreads();
  const int row = row_block * 64 + threadIdx.x;
  if (row >= n) return;
  const int col_size = min(n - col_block * 64, 64);
  unsigned long long bits = 0;
  for (int k = col_block == row_block ? threadIdx.x + 1 : 0; k < col_size; ++k) {
    if (iou_above(boxes + row * 4, col_boxes + k * 4, thresh)) bits |= 1ULL << k;
  }
  mask[(long long)row * col_blocks + col_block] = bits;
}

extern "C" __global__ void nms_reduce(const unsigned long long* mask, const int n,
                                      const int max_keep, unsigned char* keep) {
  extern __shared__ unsigned long long removed[];
  const int col_blocks = (n + 63) / 64;
  for (int w = threadIdx.x; w < col_blocks; w += blockDim.x) removed[w] = 0;
  __syncthreads();
  int n_keep = 0;  // the same in every thread: all of them take the same branches
  for (int i = 0; i < n && n_keep < max_keep; ++i) {
    if (removed[i / 64] & (1ULL << (i % 64))) continue;
    ++n_keep;
    if (threadIdx.x == 0) keep[i] = 1;
    __syncthreads();  // all threads have read removed[i / 64] before any thread updates it
    const unsigned long long* row = mask + (long long)i * col_blocks;
    for (int w = i / 64 + threadIdx.x; w < col_blocks; w += blockDim.x) removed[w] |= row[w];
    __syncthreads();
  }
}
