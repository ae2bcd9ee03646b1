// LEFT's hypernetwork for every layer at once: out = GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 → [L, P].
//
// Exact (erf) GeLU, as F.gelu's default. The forward keeps only pre = E·W1ᵀ + b1; the
// backward recomputes GeLU(pre) and GeLU'(pre) in one elementwise pass (the tensors are
// [L, h2], tiny next to the GEMMs), so nothing else is saved.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "common.h"

namespace peftkern {
namespace {

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr int64_t kGrain = 4096;

template <typename T>
inline T gelu(T p) {
  return T(0.5) * p * (T(1) + std::erf(p * T(kInvSqrt2)));
}

template <typename T>
inline T gelu_grad(T p) {
  return T(0.5) * (T(1) + std::erf(p * T(kInvSqrt2))) + p * std::exp(T(-0.5) * p * p) * T(kInvSqrt2Pi);
}

Tensor gelu_forward(const Tensor& pre) {
  if (!pre.device().is_cpu()) return at::gelu(pre);
  Tensor src = pre.contiguous(), act = at::empty_like(src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "peftkern.hypernet.gelu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* p = src.data_ptr<scalar_t>();
    scalar_t* a = act.data_ptr<scalar_t>();
    at::parallel_for(0, src.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) a[i] = static_cast<scalar_t>(gelu(static_cast<opmath_t>(p[i])));
    });
  });
  return act;
}

// act = GeLU(pre) and dpre = dact ⊙ GeLU'(pre), in one pass.
std::tuple<Tensor, Tensor> gelu_and_grad(const Tensor& dact, const Tensor& pre) {
  if (!pre.device().is_cpu()) return {at::gelu(pre), at::gelu_backward(dact, pre)};
  Tensor src = pre.contiguous(), g = dact.contiguous(), act = at::empty_like(src), dpre = at::empty_like(src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "peftkern.hypernet.gelu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* p = src.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* a = act.data_ptr<scalar_t>();
    scalar_t* d = dpre.data_ptr<scalar_t>();
    at::parallel_for(0, src.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const opmath_t pi = static_cast<opmath_t>(p[i]);
        a[i] = static_cast<scalar_t>(gelu(pi));
        d[i] = static_cast<scalar_t>(static_cast<opmath_t>(gp[i]) * gelu_grad(pi));
      }
    });
  });
  return {act, dpre};
}

}  // namespace

std::tuple<Tensor, Tensor> hypernet_forward(const Tensor& E, const Tensor& W1, const OptTensor& b1, const Tensor& W2,
                                            const OptTensor& b2) {
  const char* op = "hypernet";
  TORCH_CHECK_VALUE(E.dim() == 2, "peftkern.hypernet: E must be [L, h_in], got ", E.sizes());
  const int64_t h_in = E.size(1), h2 = W1.size(0), P = W2.size(0);
  detail::check_matrix(W1, h2, h_in, op, "W1");
  detail::check_vector(b1, h2, op, "b1");
  detail::check_matrix(W2, P, h2, op, "W2");
  detail::check_vector(b2, P, op, "b2");
  detail::check_same(E, W1, op, "W1");
  detail::check_same(E, W2, op, "W2");
  detail::check_same(E, b1, op, "b1");
  detail::check_same(E, b2, op, "b2");
  Tensor pre = detail::has(b1) ? at::addmm(*b1, E, W1.t()) : at::mm(E, W1.t());
  Tensor act = gelu_forward(pre);
  Tensor out = detail::has(b2) ? at::addmm(*b2, act, W2.t()) : at::mm(act, W2.t());
  return {out, pre};
}

std::vector<OptTensor> hypernet_backward(const Tensor& dout, const Tensor& E, const Tensor& W1, const Tensor& W2,
                                         const Tensor& pre, std::vector<bool> needs) {
  TORCH_CHECK_VALUE(needs.size() >= 5, "peftkern.hypernet_backward: needs 5 flags (E, W1, b1, W2, b2)");
  std::vector<OptTensor> grads(5);
  const bool need_pre = needs[0] || needs[1] || needs[2];
  if (needs[4]) grads[4] = dout.sum(0);
  if (!need_pre && !needs[3]) return grads;
  Tensor act, dpre;
  if (need_pre) {
    std::tie(act, dpre) = gelu_and_grad(at::mm(dout, W2), pre);
  } else {
    act = gelu_forward(pre);
  }
  if (needs[3]) grads[3] = at::mm(dout.t(), act);
  if (needs[0]) grads[0] = at::mm(dpre, W1);
  if (needs[1]) grads[1] = at::mm(dpre.t(), E);
  if (needs[2]) grads[2] = dpre.sum(0);
  return grads;
}

}  // namespace peftkern
