// expand: y = x·W0ᵀ + b + s·(v⊙(B·hu)) given a precomputed hu (the joint-QKV form).
//
// Forward writes bias + s·hu·(v⊙B)ᵀ into y and lets the base GEMM accumulate on top.
// Backward is the single streaming pass over dy that yields both dhu = s·dy·(v⊙B) and
// Gt = dyᵀ·hu (for dB and dv), next to the base GEMM dx = dy·W0.
#include "common.h"

namespace peftkern {

using detail::has;

Tensor expand_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& hu, const Tensor& B,
                      const OptTensor& v, double scale) {
  const char* op = "expand";
  TORCH_CHECK_VALUE(x.dim() == 2 && hu.dim() == 2, "peftkern.expand: x and hu must be 2-D, got ", x.sizes(), " and ",
                    hu.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = hu.size(1);
  detail::check_matrix(weight, N, K, op, "weight");
  detail::check_matrix(hu, M, r, op, "hu");
  detail::check_matrix(B, N, r, op, "B");
  detail::check_vector(bias, N, op, "bias");
  detail::check_vector(v, N, op, "v");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&weight, "weight"}, {&hu, "hu"}, {&B, "B"}})
    detail::check_same(x, *t, op, name);
  detail::check_same(x, bias, op, "bias");
  detail::check_same(x, v, op, "v");
  if (choose_unmerged(x, r) != kFused) {
    record_path("expand", false, kAddmm);
    Tensor vBs_t = (detail::folded_vB(B, v) * scale).t();
    Tensor y = has(bias) ? at::addmm(*bias, hu, vBs_t) : at::mm(hu, vBs_t);
    return y.addmm_(x, weight.t());
  }
  record_path("expand", false, kFused);
  Tensor huc = hu.contiguous(), vBt = detail::folded_vBt(B, v);
  OptTensor bc = detail::contiguous(bias);
  Tensor y = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "peftkern.expand.forward", [&] {
    lowrank::ForwardArgs<scalar_t> a;
    a.M = M, a.N = N, a.r = r;
    a.hu_in = huc.data_ptr<scalar_t>(), a.vBt = vBt.data_ptr<scalar_t>();
    a.bias = detail::ptr_or_null<scalar_t>(bc), a.scale = static_cast<scalar_t>(scale);
    a.y = y.data_ptr<scalar_t>();
    lowrank::forward(a);
  });
  return y.addmm_(x, weight.t());
}

std::vector<OptTensor> expand_backward(const Tensor& dy, const OptTensor& x, const Tensor& weight, const Tensor& hu,
                                       const Tensor& B, const OptTensor& v, double scale, std::vector<bool> needs) {
  TORCH_CHECK_VALUE(needs.size() >= 6, "peftkern.expand_backward: needs 6 flags (x, weight, bias, hu, B, v)");
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_hu = needs[3], need_B = needs[4],
             need_v = needs[5] && has(v);
  TORCH_CHECK_VALUE(has(x) || !need_w, "peftkern.expand_backward: x is needed for the weight's gradient");
  const int64_t M = dy.size(0), N = weight.size(0), r = hu.size(1);
  std::vector<OptTensor> grads(6);
  if (need_x) grads[0] = at::mm(dy, weight);
  if (need_w) grads[1] = at::mm(dy.t(), *x);
  if (need_b) grads[2] = dy.sum(0);
  if (!need_hu && !need_B && !need_v) return grads;
  Tensor dhu, GtT;
  if (choose_unmerged(dy, r) != kFused) {
    record_path("expand", true, kAddmm);
    if (need_hu) dhu = at::mm(dy, detail::folded_vB(B, v) * scale);
    if (need_B || need_v) GtT = at::mm(dy.t(), hu).t();
  } else {
    record_path("expand", true, kFused);
    auto opts = dy.options();
    if (need_hu) dhu = at::empty({M, r}, opts);
    if (need_B || need_v) GtT = at::empty({r, N}, opts);
    Tensor dyc = dy.contiguous(), huc = hu.contiguous(), vBt = detail::folded_vBt(B, v);
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "peftkern.expand.backward", [&] {
      lowrank::BackwardArgs<scalar_t> a;
      a.M = M, a.N = N, a.r = r;
      a.dy = dyc.data_ptr<scalar_t>(), a.vBt = vBt.data_ptr<scalar_t>(), a.h = huc.data_ptr<scalar_t>();
      a.scale = static_cast<scalar_t>(scale);
      a.dhu = detail::ptr_or_null<scalar_t>(dhu), a.GtT = detail::ptr_or_null<scalar_t>(GtT);
      lowrank::backward(a);
    });
  }
  if (need_hu) grads[3] = dhu;
  if (need_B || need_v) {
    Tensor Gt = GtT.t();
    if (need_B) grads[4] = has(v) ? Gt * (*v * scale).unsqueeze(1) : Gt * scale;
    if (need_v) grads[5] = (Gt * B).sum(1).mul_(scale);
  }
  return grads;
}

}  // namespace peftkern
