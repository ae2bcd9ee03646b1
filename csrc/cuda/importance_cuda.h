// Launchers of the CUDA importance update (importance.cu). Raw pointers and a stream
// only, so that neither side needs the other's headers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace peftkern {
namespace cuda {

constexpr int kMaxTensors = 32;  // tensors per launch (their pointers ride in the parameter block)

// p, g, e, u: host arrays of n_tensors device pointers; numel: host array of sizes.
cudaError_t update_importance_f32(const float* const* p, const float* const* g, float* const* e, float* const* u,
                                  const int64_t* numel, int64_t n_tensors, double beta1, double beta2,
                                  cudaStream_t stream);
cudaError_t update_importance_f64(const double* const* p, const double* const* g, double* const* e,
                                  double* const* u, const int64_t* numel, int64_t n_tensors, double beta1,
                                  double beta2, cudaStream_t stream);

}  // namespace cuda
}  // namespace peftkern
