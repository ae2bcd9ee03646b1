// shrink: hu = u⊙(x·Aᵀ), the joint-QKV form's shared down-projection (one per layer).
//
// Forward is the rank-r half of the adapter's forward pass; backward takes dhu (the sum
// of the q/k/v expands' contributions, accumulated by autograd) and produces du, dA and
// dx = dh·A in one pass over x.
#include "common.h"

namespace peftkern {

using detail::has;

namespace {
Tensor dropped(const Tensor& x, double dropout, int64_t seed) {
  if (dropout <= 0) return x;
  return x * dropout_mask(seed, x.size(0), x.size(1), dropout, x).mul_(1.0 / (1.0 - dropout));
}
}  // namespace

std::tuple<Tensor, Tensor> shrink_forward(const Tensor& x, const Tensor& A, const OptTensor& u, double dropout,
                                          int64_t seed) {
  TORCH_CHECK_VALUE(x.dim() == 2, "peftkern.shrink: x must be flattened to [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  detail::check_matrix(A, r, K, "shrink", "A");
  detail::check_vector(u, r, "shrink", "u");
  detail::check_same(x, A, "shrink", "A");
  detail::check_same(x, u, "shrink", "u");
  if (choose_unmerged(x, r) != kFused) {
    record_path("shrink", false, kAddmm);
    Tensor h = at::mm(dropped(x, dropout, seed), A.t());
    return {has(u) ? h * *u : h, h};
  }
  record_path("shrink", false, kFused);
  Tensor xc = x.contiguous(), Ac = A.contiguous();
  OptTensor uc = detail::contiguous(u);
  Tensor h = at::empty({M, r}, x.options());
  Tensor hu = has(u) ? at::empty({M, r}, x.options()) : h;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "peftkern.shrink.forward", [&] {
    lowrank::ForwardArgs<scalar_t> a;
    a.M = M, a.K = K, a.r = r;
    a.x = xc.data_ptr<scalar_t>(), a.A = Ac.data_ptr<scalar_t>(), a.u = detail::ptr_or_null<scalar_t>(uc);
    a.h = h.data_ptr<scalar_t>(), a.hu = has(u) ? hu.data_ptr<scalar_t>() : nullptr;
    a.dropout = dropout, a.seed = static_cast<uint64_t>(seed);
    lowrank::forward(a);
  });
  return {hu, h};
}

std::vector<OptTensor> shrink_backward(const Tensor& dhu, const OptTensor& x, const Tensor& A, const OptTensor& u,
                                       const OptTensor& h, double dropout, int64_t seed, std::vector<bool> needs) {
  TORCH_CHECK_VALUE(needs.size() >= 3, "peftkern.shrink_backward: needs 3 flags (x, A, u)");
  const bool need_x = needs[0], need_A = needs[1], need_u = needs[2] && has(u);
  TORCH_CHECK_VALUE((has(x) || !need_A) && (has(h) || !need_u),
                    "peftkern.shrink_backward: x is needed for dA and h for du");
  const int64_t M = dhu.size(0), K = A.size(1), r = A.size(0);
  std::vector<OptTensor> grads(3);
  if (!need_x && !need_A && !need_u) return grads;
  if (choose_unmerged(dhu, r) != kFused) {
    record_path("shrink", true, kAddmm);
    if (need_u) grads[2] = (dhu * *h).sum(0);
    Tensor dh = has(u) ? dhu * *u : dhu;
    if (need_A) grads[1] = at::mm(dh.t(), dropped(*x, dropout, seed));
    if (need_x) {
      Tensor dx = at::mm(dh, A);
      if (dropout > 0) dx.mul_(dropout_mask(seed, M, K, dropout, dx)).mul_(1.0 / (1.0 - dropout));
      grads[0] = dx;
    }
    return grads;
  }
  record_path("shrink", true, kFused);
  auto opts = dhu.options();
  Tensor dx = need_x ? at::empty({M, K}, opts) : Tensor(), dA = need_A ? at::empty({r, K}, opts) : Tensor(),
         du = need_u ? at::empty({r}, opts) : Tensor();
  Tensor Ac = A.contiguous(), dhuc = dhu.contiguous();
  OptTensor uc = detail::contiguous(u), xc = need_A ? detail::contiguous(x) : OptTensor(),
            hc = need_u ? detail::contiguous(h) : OptTensor();
  AT_DISPATCH_FLOATING_TYPES(dhu.scalar_type(), "peftkern.shrink.backward", [&] {
    lowrank::BackwardArgs<scalar_t> a;
    a.M = M, a.K = K, a.r = r;
    a.x = detail::ptr_or_null<scalar_t>(xc), a.A = Ac.data_ptr<scalar_t>(), a.u = detail::ptr_or_null<scalar_t>(uc);
    a.h = detail::ptr_or_null<scalar_t>(hc), a.dhu_in = dhuc.data_ptr<scalar_t>();
    a.dropout = dropout, a.seed = static_cast<uint64_t>(seed);
    a.dA = detail::ptr_or_null<scalar_t>(dA), a.du = detail::ptr_or_null<scalar_t>(du);
    a.dx = detail::ptr_or_null<scalar_t>(dx);
    lowrank::backward(a);
  });
  if (need_x) grads[0] = dx;
  if (need_A) grads[1] = dA;
  if (need_u) grads[2] = du;
  return grads;
}

}  // namespace peftkern
