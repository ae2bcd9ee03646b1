// AdaLoRA's importance update for every adapter tensor in one call, in place:
//     ipt = |p·g|;  e = β1·e + (1-β1)·ipt;  u = β2·u + (1-β2)·|ipt - e|
//
// It must agree bit for bit with peftkern/ops/importance.py::update_reference_ (and so
// with PEFT), because AdaLoRA's rank pattern is a threshold on these scores. Torch
// evaluates each tensor op separately in the dtype's opmath type, rounding to the tensor
// dtype after every op, with the Python scalars cast to the opmath type. This file does
// exactly that, and floating-point contraction is off so that no a·b + c becomes an FMA.
#pragma STDC FP_CONTRACT OFF
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "common.h"

namespace peftkern {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename T>
struct Update {
  using O = at::opmath_type<T>;
  O b1, c1, b2, c2;

  // Each line is one torch op: compute in O, round to T.
  void operator()(const T* p, const T* g, T* e, T* u, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) {
      const T ipt = static_cast<T>(std::abs(O(p[i]) * O(g[i])));
      const T e_new = static_cast<T>(O(static_cast<T>(b1 * O(e[i]))) + O(static_cast<T>(c1 * O(ipt))));
      const T dev = static_cast<T>(std::abs(O(static_cast<T>(O(ipt) - O(e_new)))));
      const T u_new = static_cast<T>(O(static_cast<T>(b2 * O(u[i]))) + O(static_cast<T>(c2 * O(dev))));
      e[i] = e_new;
      u[i] = u_new;
    }
  }
};

void check_lists(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                 const std::vector<Tensor>& exp_avg_ipt, const std::vector<Tensor>& exp_avg_unc) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avg_ipt.size() == n && exp_avg_unc.size() == n,
                    "peftkern.update_importance_: params, grads, exp_avg_ipt and exp_avg_unc must have the same "
                    "length, got ", n, ", ", grads.size(), ", ", exp_avg_ipt.size(), ", ", exp_avg_unc.size());
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    for (auto [t, name] : {std::pair<const Tensor*, const char*>{&grads[i], "grads"}, {&exp_avg_ipt[i], "exp_avg_ipt"},
                           {&exp_avg_unc[i], "exp_avg_unc"}}) {
      TORCH_CHECK_VALUE(t->defined(), "peftkern.update_importance_: ", name, "[", i, "] is None");
      TORCH_CHECK_VALUE(t->sizes() == p.sizes(), "peftkern.update_importance_: ", name, "[", i, "] has shape ",
                        t->sizes(), " but params[", i, "] has ", p.sizes());
      TORCH_CHECK_TYPE(t->scalar_type() == p.scalar_type(), "peftkern.update_importance_: ", name, "[", i,
                       "] has dtype ", t->scalar_type(), " but params[", i, "] has ", p.scalar_type());
      TORCH_CHECK_VALUE(t->device() == p.device(), "peftkern.update_importance_: ", name, "[", i, "] is on ",
                        t->device(), " but params[", i, "] is on ", p.device());
    }
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), "peftkern.update_importance_: params[", i,
                     "] has dtype ", p.scalar_type(), "; valid: float32, float64, bfloat16, float16");
    TORCH_CHECK_VALUE(exp_avg_ipt[i].is_contiguous() && exp_avg_unc[i].is_contiguous(),
                      "peftkern.update_importance_: exp_avg_ipt[", i, "] and exp_avg_unc[", i,
                      "] are updated in place and must be contiguous");
  }
}

template <typename T>
void update_cpu(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, std::vector<Tensor>& e,
                std::vector<Tensor>& u, double beta1, double beta2) {
  using O = at::opmath_type<T>;
  const Update<T> step{static_cast<O>(beta1), static_cast<O>(1.0 - beta1), static_cast<O>(beta2),
                       static_cast<O>(1.0 - beta2)};
  // One flat index space over all tensors, so threads split elements, not tensors.
  std::vector<int64_t> start(params.size() + 1, 0);
  for (size_t i = 0; i < params.size(); ++i) start[i + 1] = start[i] + params[i].numel();
  std::vector<Tensor> pc(params.size()), gc(params.size());
  for (size_t i = 0; i < params.size(); ++i) pc[i] = params[i].contiguous(), gc[i] = grads[i].contiguous();
  at::parallel_for(0, start.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      const int64_t off = pos - start[t], n = std::min(end, start[t + 1]) - pos;
      if (n <= 0) continue;
      step(pc[t].data_ptr<T>() + off, gc[t].data_ptr<T>() + off, e[t].data_ptr<T>() + off,
           u[t].data_ptr<T>() + off, n);
      pos += n;
    }
  });
}

}  // namespace

void update_importance_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                        const std::vector<Tensor>& exp_avg_ipt, const std::vector<Tensor>& exp_avg_unc, double beta1,
                        double beta2) {
  check_lists(params, grads, exp_avg_ipt, exp_avg_unc);
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  for (size_t i = 1; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(params[i].scalar_type() == dtype, "peftkern.update_importance_: all tensors must share one "
                     "dtype; params[0] is ", dtype, ", params[", i, "] is ", params[i].scalar_type());
    TORCH_CHECK_VALUE(params[i].device() == device, "peftkern.update_importance_: all tensors must be on one "
                      "device; params[0] is on ", device, ", params[", i, "] on ", params[i].device());
  }
  // CUDA tensors take torch's foreach ops (peftkern/ops/importance.py): about ten launches for the
  // whole model, which a kernel of our own could not beat by enough to be worth keeping unverified.
  TORCH_CHECK_VALUE(device.is_cpu(), "peftkern.update_importance_: CPU tensors only, got tensors on ", device);
  std::vector<Tensor> e(exp_avg_ipt), u(exp_avg_unc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "peftkern.update_importance_",
                                  [&] { update_cpu<scalar_t>(params, grads, e, u, beta1, beta2); });
}

}  // namespace peftkern
