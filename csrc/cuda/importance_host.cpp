// Host side of the CUDA importance update: tensor checks, pointers, the current stream.
// Compiled only when setup.py builds with CUDA (it defines PEFTKERN_WITH_CUDA).
#ifdef PEFTKERN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "importance_cuda.h"

namespace peftkern {
namespace {

template <typename T, typename Launch>
void run(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& e,
         const std::vector<Tensor>& u, double beta1, double beta2, Launch launch) {
  std::vector<Tensor> keep;  // contiguous copies of p and g live until the launch is queued
  std::vector<const T*> pp, gp;
  std::vector<T*> ep, up;
  std::vector<int64_t> numel;
  for (size_t i = 0; i < params.size(); ++i) {
    keep.push_back(params[i].contiguous());
    pp.push_back(keep.back().data_ptr<T>());
    keep.push_back(grads[i].contiguous());
    gp.push_back(keep.back().data_ptr<T>());
    ep.push_back(e[i].data_ptr<T>());
    up.push_back(u[i].data_ptr<T>());
    numel.push_back(params[i].numel());
  }
  const cudaError_t err = launch(pp.data(), gp.data(), ep.data(), up.data(), numel.data(), int64_t(params.size()),
                                 beta1, beta2, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "peftkern.update_importance_ (CUDA): ", cudaGetErrorString(err));
}

}  // namespace

void update_importance_cuda_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                             const std::vector<Tensor>& exp_avg_ipt, const std::vector<Tensor>& exp_avg_unc,
                             double beta1, double beta2) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  switch (params[0].scalar_type()) {
    case at::kFloat:
      run<float>(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2, cuda::update_importance_f32);
      break;
    case at::kDouble:
      run<double>(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2, cuda::update_importance_f64);
      break;
    default:
      TORCH_CHECK_TYPE(false, "peftkern.update_importance_ (CUDA): dtype ", params[0].scalar_type(),
                       " is not supported; valid: float32, float64");
  }
}

}  // namespace peftkern
#endif  // PEFTKERN_WITH_CUDA
