// AdaLoRA's importance update on CUDA: the elementwise op of csrc/cpu/importance.cpp.
//
// Deliberately free of ATen/c10 headers: it takes raw device pointers and a stream, so it
// compiles standalone with `nvcc -c` and the host side (importance_host.cpp) does the
// tensor bookkeeping. One launch covers up to kMaxTensors tensors (their pointers travel
// in the kernel's parameter block), so every adapter is updated in a few launches.
//
// Bit-exactness with the CPU/PyTorch result: each product and sum uses the _rn
// intrinsics, which round to nearest and are never contracted into an FMA, and the build
// does not pass --use_fast_math (which would flush denormal scores to zero).
#include <cuda_runtime.h>

#include <cstdint>

#include "importance_cuda.h"

namespace peftkern {
namespace cuda {
namespace {

template <typename T>
struct Batch {
  const T* p[kMaxTensors];
  const T* g[kMaxTensors];
  T* e[kMaxTensors];
  T* u[kMaxTensors];
  int64_t start[kMaxTensors + 1];  // prefix sums of the tensors' element counts
  int count;
  T b1, c1, b2, c2;
};

__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename T>
__global__ void update_kernel(const Batch<T> batch) {
  const int64_t total = batch.start[batch.count];
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    int t = 0;
    while (batch.start[t + 1] <= i) ++t;  // at most kMaxTensors steps, uniform within a warp mostly
    const int64_t k = i - batch.start[t];
    const T ipt = fabs(mul_rn(batch.p[t][k], batch.g[t][k]));
    const T e = add_rn(mul_rn(batch.b1, batch.e[t][k]), mul_rn(batch.c1, ipt));
    const T u = add_rn(mul_rn(batch.b2, batch.u[t][k]), mul_rn(batch.c2, fabs(sub_rn(ipt, e))));
    batch.e[t][k] = e;
    batch.u[t][k] = u;
  }
}

template <typename T>
cudaError_t launch(const T* const* p, const T* const* g, T* const* e, T* const* u, const int64_t* numel,
                   int64_t n_tensors, double beta1, double beta2, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = 4096;
  for (int64_t first = 0; first < n_tensors; first += kMaxTensors) {
    Batch<T> b{};
    b.count = int(n_tensors - first < kMaxTensors ? n_tensors - first : kMaxTensors);
    b.b1 = T(beta1), b.c1 = T(1.0 - beta1), b.b2 = T(beta2), b.c2 = T(1.0 - beta2);
    for (int t = 0; t < b.count; ++t) {
      b.p[t] = p[first + t], b.g[t] = g[first + t], b.e[t] = e[first + t], b.u[t] = u[first + t];
      b.start[t + 1] = b.start[t] + numel[first + t];
    }
    if (b.start[b.count] == 0) continue;
    int64_t blocks = (b.start[b.count] + kThreads - 1) / kThreads;
    blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;
    update_kernel<T><<<int(blocks), kThreads, 0, stream>>>(b);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t update_importance_f32(const float* const* p, const float* const* g, float* const* e, float* const* u,
                                  const int64_t* numel, int64_t n_tensors, double beta1, double beta2,
                                  cudaStream_t stream) {
  return launch<float>(p, g, e, u, numel, n_tensors, beta1, beta2, stream);
}

cudaError_t update_importance_f64(const double* const* p, const double* const* g, double* const* e,
                                  double* const* u, const int64_t* numel, int64_t n_tensors, double beta1,
                                  double beta2, cudaStream_t stream) {
  return launch<double>(p, g, e, u, numel, n_tensors, beta1, beta2, stream);
}

}  // namespace cuda
}  // namespace peftkern
