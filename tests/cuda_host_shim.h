// Host emulation of the CUDA subset that model/ops/*.cu use, so that g++ can compile the
// unmodified kernel source and run it thread by thread (tests/test_cuda_kernels_host.py).
//
// The test builds one translation unit per scalar type:
//
//   typedef float scalar_t;        (or double, as model/ops/backend.py compile_kernel does)
//   #include "cuda_host_shim.h"
//   <nms.cu, roi_pool.cu, roi_align.cu>  (only `extern __shared__ T name[];` rewritten, below)
//   HOST_CUDA_EXPORT(nms_mask) ... (one extern "C" launcher per kernel)
//
// What is emulated, and how:
// - __global__ / __device__: nothing; kernels and their helpers (roi_align.cu's structs and
//   __device__ functions) are plain C++.
// - Built-in variables: threadIdx, blockIdx, blockDim, gridDim are thread_local uint3 / dim3
//   (unsigned, as in CUDA, so the kernels' signed/unsigned arithmetic is the same).
// - A launch runs the blocks one after another; each block's threads are real std::threads
//   running concurrently, as a block's warps do on the GPU.
// - __shared__ T a[N] becomes a function-level static: one copy shared by the block's threads
//   (blocks do not overlap in time, so one copy serves them all; it is not reset in between).
// - extern __shared__ T a[] (dynamic shared memory): the test rewrites the declaration to
//   `T* a = static_cast<T*>(host_cuda::dynamic_shared);`, a buffer of exactly the launch's
//   shared-memory size, filled with garbage before every block and followed by a guard zone
//   that must be intact after the block (an overflow fails the launch).
// - The launch configuration limits of CUDA (without opt-in): no dimension 0, grid y and z at
//   most 65535, at most 1024 threads per block, at most 48 KiB of dynamic shared memory.
// - __syncthreads(): a std::barrier over the block's threads. A thread that returns leaves the
//   barrier (arrive_and_drop), as exited threads do on the GPU, so the others cannot hang; the
//   launch fails if the threads of a block did not all call __syncthreads() equally often
//   (a barrier in divergent code is undefined behaviour in CUDA).
// - atomicAdd: std::atomic_ref<T>::fetch_add (C++20), returning the old value like CUDA's, and
//   counted (host_cuda_atomic_add_calls), so a test can tell that a kernel adds atomically: a
//   lost update in a plain += is too unlikely on a few CPU cores to be caught by its result.
// - min / max: CUDA's overloads, fminf / fmaxf semantics for floating point. round, floor, ceil:
//   the <cmath> overloads for float and double (CUDA: roundf / round, ... half away from zero).
// Compile with -ffp-contract=off: like nvcc --fmad=false, every multiply and add rounds.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace host_cuda {
namespace {
std::barrier<>* block_barrier = nullptr;  // the running block's threads
thread_local int sync_count = 0;          // __syncthreads() calls of this thread in this block
void* dynamic_shared = nullptr;           // the running block's dynamic shared memory
std::atomic<long long> atomic_add_calls{0};
}  // namespace
}  // namespace host_cuda

inline void __syncthreads() {
  ++host_cuda::sync_count;
  host_cuda::block_barrier->arrive_and_wait();
}

template <class T>
T atomicAdd(T* address, T value) {
  ++host_cuda::atomic_add_calls;
  return std::atomic_ref<T>(*address).fetch_add(value);
}

// The number of atomicAdd calls since the last call of this function.
extern "C" __attribute__((visibility("default"))) long long host_cuda_atomic_add_calls() {
  return host_cuda::atomic_add_calls.exchange(0);
}

inline int min(int a, int b) { return std::min(a, b); }
inline int max(int a, int b) { return std::max(a, b); }
inline unsigned int min(unsigned int a, unsigned int b) { return std::min(a, b); }
inline unsigned int max(unsigned int a, unsigned int b) { return std::max(a, b); }
inline long long min(long long a, long long b) { return std::min(a, b); }
inline long long max(long long a, long long b) { return std::max(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
using std::ceil;
using std::floor;
using std::round;

namespace host_cuda {
namespace {

enum Status {
  kOk = 0,
  kDivergentSyncthreads = 1,
  kSharedMemoryOverflow = 2,
  kInvalidConfiguration = 3,
};

constexpr std::size_t kGuardBytes = 256;
constexpr unsigned char kGarbage = 0xA5, kGuard = 0x5A;

// Calls kernel(args...) with the arguments that `args` points to, one pointer per parameter,
// as cudaLaunchKernel and CuPy pass them.
template <class... Params, std::size_t... I>
void call(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<Params>*>(args[I])...);
}

// Runs kernel<<<grid, block, shared_bytes>>>(args); a Status. One std::thread per thread of
// a block runs that thread in every block, block after block: all threads wait at block_start
// until the launcher has prepared the block and at block_end until all have finished it.
template <class... Params>
int launch(void (*kernel)(Params...), const unsigned int* grid, const unsigned int* block,
           std::size_t shared_bytes, void** args) {
  const dim3 grid_dim{grid[0], grid[1], grid[2]}, block_dim{block[0], block[1], block[2]};
  const unsigned int n_threads = block_dim.x * block_dim.y * block_dim.z;
  const unsigned int n_blocks = grid_dim.x * grid_dim.y * grid_dim.z;
  if (n_threads == 0 || n_blocks == 0 || grid_dim.y > 65535 || grid_dim.z > 65535 ||
      block_dim.z > 64 || n_threads > 1024 || shared_bytes > 48 * 1024) {
    return kInvalidConfiguration;
  }
  std::vector<unsigned char> shared(shared_bytes + kGuardBytes);
  std::vector<int> syncs(n_threads);  // __syncthreads() calls of each thread in the block
  std::optional<std::barrier<>> syncthreads_barrier;
  std::barrier<> block_start(n_threads + 1), block_end(n_threads + 1);
  std::vector<std::thread> threads;
  for (unsigned int t = 0; t < n_threads; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = {t % block_dim.x, t / block_dim.x % block_dim.y, t / block_dim.x / block_dim.y};
      blockDim = block_dim;
      gridDim = grid_dim;
      for (unsigned int b = 0; b < n_blocks; ++b) {
        block_start.arrive_and_wait();
        blockIdx = {b % grid_dim.x, b / grid_dim.x % grid_dim.y, b / grid_dim.x / grid_dim.y};
        sync_count = 0;
        call(kernel, args, std::index_sequence_for<Params...>{});
        syncs[t] = sync_count;
        syncthreads_barrier->arrive_and_drop();  // an exited thread no longer holds others up
        block_end.arrive_and_wait();
      }
    });
  }
  int status = kOk;
  for (unsigned int b = 0; b < n_blocks; ++b) {
    std::memset(shared.data(), kGarbage, shared_bytes);
    std::memset(shared.data() + shared_bytes, kGuard, kGuardBytes);
    dynamic_shared = shared.data();
    block_barrier = &syncthreads_barrier.emplace(n_threads);
    block_start.arrive_and_wait();
    block_end.arrive_and_wait();
    if (std::count(syncs.begin(), syncs.end(), syncs[0]) != (long)n_threads) {
      status = kDivergentSyncthreads;
    }
    for (std::size_t i = 0; i < kGuardBytes; ++i) {
      if (shared[shared_bytes + i] != kGuard) status = kSharedMemoryOverflow;
    }
  }
  for (std::thread& thread : threads) thread.join();
  return status;
}

}  // namespace
}  // namespace host_cuda

// extern "C" int launch_<kernel>(grid[3], block[3], shared_bytes, args): the one symbol of the
// library for <kernel> (everything else is built with hidden visibility).
#define HOST_CUDA_EXPORT(kernel)                                                             \
  extern "C" __attribute__((visibility("default"))) int launch_##kernel(                    \
      const unsigned int* grid, const unsigned int* block, std::size_t shared_bytes,          \
      void** args) {                                                                         \
    return host_cuda::launch(kernel, grid, block, shared_bytes, args);                       \
  }
