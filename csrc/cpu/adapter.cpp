// The fused adapter, forward and backward: y = x·W0ᵀ + b + s·(v⊙(B·(u⊙(A·x)))).
//
// Mirrors the dataflow of peftkern/ops/torch_kernels.py (u and v are folded into the
// rank-r factors, no M×N temporary is saved). The fused path changes one order: the
// rank-r term is written into y (and dh·A into dx) *first*, and the base GEMM then
// accumulates on top with beta = 1. The GEMM reads its C tile while it is compute-bound
// anyway, so the output is written by the rank-r pass once instead of read and rewritten
// after the GEMM. The addmm path is torch_kernels.py's GEMM sequence (forward_addmm).
//
// Paths (chosen per call in paths.cpp, or forced by the caller):
//   fused   rank-r work in one row-streaming pass (lowrank_pass.cpp)       CPU float/double
//   merged  W_eff = W0 + s·(v⊙B)·(u⊙A); y = x·W_effᵀ; dx = dy·W_eff        float/double, large M
//   addmm   ATen GEMMs, scalings on their alpha (forward_addmm)            any dtype/device
// For GEMM-sized ranks the merged forward keeps W_eff, and its backward takes the factor
// gradients from G = dyᵀ·h alone (backward_with_merged_weight below).
#include "common.h"
#include "dropout.h"

namespace peftkern {
namespace {

using detail::has;

struct Shapes {
  int64_t M, K, N, r;
};

Shapes check_adapter(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A, const Tensor& B,
                     const OptTensor& u, const OptTensor& v) {
  const char* op = "adapter";
  TORCH_CHECK_VALUE(x.dim() == 2, "peftkern.adapter: x must be flattened to [M, K], got ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "peftkern.adapter: weight must be [N, K], got ", weight.sizes());
  const Shapes s{x.size(0), x.size(1), weight.size(0), A.size(0)};
  detail::check_matrix(weight, s.N, s.K, op, "weight");
  detail::check_matrix(A, s.r, s.K, op, "A");
  detail::check_matrix(B, s.N, s.r, op, "B");
  detail::check_vector(bias, s.N, op, "bias");
  detail::check_vector(u, s.r, op, "u");
  detail::check_vector(v, s.N, op, "v");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&weight, "weight"}, {&A, "A"}, {&B, "B"}})
    detail::check_same(x, *t, op, name);
  detail::check_same(x, bias, op, "bias");
  detail::check_same(x, u, op, "u");
  detail::check_same(x, v, op, "v");
  return s;
}

Tensor merged_weight(const Tensor& weight, const Tensor& A, const Tensor& B, const OptTensor& u, const OptTensor& v,
                     double scale) {
  return at::addmm(weight, detail::folded_vB(B, v), detail::folded_uA(A, u), 1.0, scale);
}

// alpha·a·b as one GEMM (alpha on BLAS's alpha; beta = 0 never reads the 0-d input).
Tensor scaled_mm(const Tensor& a, const Tensor& b, double alpha) {
  if (alpha == 1.0) return at::mm(a, b);
  return at::addmm(at::empty({}, a.options()), a, b, 0.0, alpha);
}

// v⊗u as a factor of [N, r] tensors (Λv·X·Λu = X⊙(v⊗u)): undefined when both are the
// identity, a column or a row when one is, so applying it is at most one launch.
Tensor outer_vu(const OptTensor& u, const OptTensor& v) {
  if (!has(v)) return has(u) ? *u : Tensor();
  return has(u) ? at::outer(*v, *u) : v->unsqueeze(1);
}
Tensor fold(const Tensor& X, const Tensor& vu) { return vu.defined() ? X * vu : X; }

// D'(x): the kept elements of x, without dropout's 1/(1-p) (that rides on a GEMM's alpha).
Tensor kept(const Tensor& x, const Tensor& keep) { return keep.defined() ? x * keep : x; }

Tensor forward_fused(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A, const Tensor& B,
                     const OptTensor& u, const OptTensor& v, double scale, double dropout, int64_t seed, Tensor& h) {
  const Shapes s{x.size(0), x.size(1), weight.size(0), A.size(0)};
  Tensor xc = x.contiguous(), Ac = A.contiguous(), vBt = detail::folded_vBt(B, v);
  OptTensor bc = detail::contiguous(bias), uc = detail::contiguous(u);
  Tensor y = at::empty({s.M, s.N}, x.options());
  h = at::empty({s.M, s.r}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "peftkern.adapter.forward", [&] {
    lowrank::ForwardArgs<scalar_t> a;
    a.M = s.M, a.K = s.K, a.N = s.N, a.r = s.r;
    a.x = xc.data_ptr<scalar_t>(), a.A = Ac.data_ptr<scalar_t>(), a.u = detail::ptr_or_null<scalar_t>(uc);
    a.vBt = vBt.data_ptr<scalar_t>(), a.bias = detail::ptr_or_null<scalar_t>(bc);
    a.scale = static_cast<scalar_t>(scale), a.h = h.data_ptr<scalar_t>(), a.y = y.data_ptr<scalar_t>();
    a.dropout = dropout, a.seed = static_cast<uint64_t>(seed);
    lowrank::forward(a);
  });
  return y.addmm_(xc, weight.t());
}

// The addmm path is the torch backend's dataflow (peftkern/ops/torch_kernels.py) with this
// extension's h = D(x)·Aᵀ (unscaled: the fused backward reads the same h). Every diagonal
// scaling rides on a GEMM's alpha or on an [N, r] factor, never on an [M, ·] pass:
//   forward   h = (1/(1-p))·D'(x)·Aᵀ;  y = x·W0ᵀ + b;  y += s·h·((v⊗u)⊙B)ᵀ
// LoRA (u, v identity, no dropout) is 3 GEMMs forward and 5 backward.
Tensor forward_addmm(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A, const Tensor& B,
                     const OptTensor& u, const OptTensor& v, double scale, double dropout, int64_t seed, Tensor& h) {
  const Tensor keep = dropout > 0 ? dropout_mask(seed, x.size(0), x.size(1), dropout, x) : Tensor();
  h = scaled_mm(kept(x, keep), A.t(), 1.0 / (1.0 - dropout));
  Tensor y = has(bias) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  return y.addmm_(h, fold(B, outer_vu(u, v)).t(), 1.0, scale);
}

//   backward  Gt = s·dyᵀ·h [N, r] -> dB = Gt⊙(v⊗u);  P = Gt⊙B -> dv = P·u, du = Pᵀ·v
//             dh = (s/(1-p))·dy·((v⊗u)⊙B) -> dA = dhᵀ·D'(x);  dx = dy·W0 + D'(dh·A)
// (du and dv from Gt: Σ_m dy[m,n]·Σ_j h[m,j]·u[j]·B[n,j] = Σ_j P[n,j]·u[j], and likewise du.)
std::vector<OptTensor> backward_addmm(const Tensor& dy, const OptTensor& x, const Tensor& weight, const Tensor& A,
                                      const Tensor& B, const OptTensor& u, const OptTensor& v, const OptTensor& h,
                                      double scale, double dropout, int64_t seed, bool need_x, bool need_A,
                                      bool need_B, bool need_u, bool need_v) {
  std::vector<OptTensor> grads(7);
  const Tensor vu = outer_vu(u, v);
  const Tensor keep = dropout > 0 ? dropout_mask(seed, dy.size(0), A.size(1), dropout, dy) : Tensor();
  if (need_B || need_u || need_v) {
    const Tensor hh = has(h) ? *h : scaled_mm(kept(*x, keep), A.t(), 1.0 / (1.0 - dropout));
    const Tensor gt = scaled_mm(dy.t(), hh, scale);
    if (need_B) grads[4] = fold(gt, vu);
    if (need_u || need_v) {
      const Tensor p = gt * B;
      if (need_v) grads[6] = has(u) ? at::mv(p, *u) : p.sum(1);
      if (need_u) grads[5] = has(v) ? at::mv(p.t(), *v) : p.sum(0);
    }
  }
  if (need_x || need_A) {
    const Tensor dh = scaled_mm(dy, fold(B, vu), scale / (1.0 - dropout));
    if (need_A) grads[3] = at::mm(dh.t(), kept(*x, keep));
    if (need_x) {
      Tensor dx = at::mm(dy, weight);
      grads[0] = keep.defined() ? dx.addcmul_(at::mm(dh, A), keep) : dx.addmm_(dh, A);
    }
  }
  return grads;
}

// Backward of a merged forward that kept W_eff (GEMM-sized ranks, where every rank-r
// product costs a real GEMM). dx = dy·W_eff replaces the base GEMM, so x's gradient costs
// nothing extra; the factor gradients all come from G = dyᵀ·h [N, r]:
//   du_j = s·Σ_n (v⊙B)_nj·G_nj,   dv_n = s·Σ_j B_nj·u_j·G_nj,   dB = s·v ⊙ G ⊙ uᵀ
// (Σ_m h_mj·dhu_mj = s·Σ_n (v⊙B)_nj·G_nj), and dhu = s·dy·(v⊙B) is formed only for dA.
// With A and B frozen (VeRA) that is one [M, r] and one [N, r] GEMM per call, against
// three for the unmerged dataflow.
void backward_with_merged_weight(const Tensor& dy, const Tensor& x, const Tensor& A, const Tensor& B,
                                 const OptTensor& u, const OptTensor& v, const Tensor& w_eff, double scale,
                                 bool need_x, bool need_A, bool need_u, bool need_Bv, Tensor& dx, Tensor& dA,
                                 Tensor& du, Tensor& GtT) {
  if (need_x) dx = at::mm(dy, w_eff);
  Tensor vB = detail::folded_vB(B, v);
  if (need_u || need_Bv) {
    Tensor G = at::mm(dy.t(), at::mm(x, A.t()));  // [N, r]
    if (need_u) du = (vB * G).sum(0).mul_(scale);
    if (need_Bv) GtT = (has(u) ? G * *u : G).t();  // (dyᵀ·hu)ᵀ, as the other paths leave it
  }
  if (need_A) {
    Tensor dhu = at::mm(dy, vB * scale);
    dA = at::mm((has(u) ? dhu * *u : dhu).t(), x);
  }
}

// The rank-r gradients from one streaming pass; dx (if given) receives dh·A.
void backward_pass(const Tensor& dy, const OptTensor& x, const Tensor& A, const Tensor& B, const OptTensor& u,
                   const OptTensor& v, const OptTensor& h, double scale, double dropout, int64_t seed, Tensor& GtT,
                   Tensor& dA, Tensor& du, Tensor& dx_lowrank) {
  const int64_t M = dy.size(0), K = A.size(1), N = B.size(0), r = A.size(0);
  Tensor dyc = dy.contiguous(), Ac = A.contiguous(), vBt = detail::folded_vBt(B, v);
  OptTensor xc = detail::contiguous(x), uc = detail::contiguous(u), hc = detail::contiguous(h);
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "peftkern.adapter.backward", [&] {
    lowrank::BackwardArgs<scalar_t> a;
    a.M = M, a.K = K, a.N = N, a.r = r;
    a.x = detail::ptr_or_null<scalar_t>(xc), a.dy = dyc.data_ptr<scalar_t>(), a.A = Ac.data_ptr<scalar_t>();
    a.vBt = vBt.data_ptr<scalar_t>(), a.u = detail::ptr_or_null<scalar_t>(uc);
    a.scale = static_cast<scalar_t>(scale), a.h = detail::ptr_or_null<scalar_t>(hc);
    a.GtT = detail::ptr_or_null<scalar_t>(GtT), a.dA = detail::ptr_or_null<scalar_t>(dA);
    a.du = detail::ptr_or_null<scalar_t>(du), a.dx = detail::ptr_or_null<scalar_t>(dx_lowrank);
    a.dropout = dropout, a.seed = static_cast<uint64_t>(seed);
    lowrank::backward(a);
  });
}

}  // namespace

std::tuple<Tensor, OptTensor, OptTensor, int64_t> adapter_forward(const Tensor& x, const Tensor& weight,
                                                                  const OptTensor& bias, const Tensor& A,
                                                                  const Tensor& B, const OptTensor& u,
                                                                  const OptTensor& v, double scale, double dropout,
                                                                  int64_t seed, int64_t forced) {
  const Shapes s = check_adapter(x, weight, bias, A, B, u, v);
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, "peftkern.adapter: dropout must be in [0, 1), got ", dropout);
  const Path path = choose_forward(s.M, s.N, s.K, s.r, x, forced, dropout > 0);
  record_path("adapter", false, path);
  Tensor h, w_eff, y;
  switch (path) {
    case kFused: y = forward_fused(x, weight, bias, A, B, u, v, scale, dropout, seed, h); break;
    case kMerged: {
      w_eff = merged_weight(weight, A, B, u, v, scale);
      y = has(bias) ? at::addmm(*bias, x, w_eff.t()) : at::mm(x, w_eff.t());
      if (!keeps_merged_weight(s.r)) w_eff = Tensor();
      break;
    }
    default: y = forward_addmm(x, weight, bias, A, B, u, v, scale, dropout, seed, h); break;
  }
  auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  return {y, opt(h), opt(w_eff), path};
}

std::tuple<std::vector<OptTensor>, int64_t> adapter_backward(const Tensor& dy, const OptTensor& x, const Tensor& weight,
                                                             const Tensor& A, const Tensor& B, const OptTensor& u,
                                                             const OptTensor& v, const OptTensor& h,
                                                             const OptTensor& w_eff, double scale, double dropout,
                                                             int64_t seed, std::vector<bool> needs, int64_t forced) {
  TORCH_CHECK_VALUE(needs.size() >= 7, "peftkern.adapter_backward: needs 7 flags (x, weight, bias, A, B, u, v)");
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_A = needs[3], need_B = needs[4],
             need_u = needs[5] && has(u), need_v = needs[6] && has(v);
  const int64_t M = dy.size(0), K = weight.size(1), N = weight.size(0), r = A.size(0);
  TORCH_CHECK_VALUE(has(x) || !(need_w || need_A || ((need_B || need_u || need_v) && !has(h) && !has(w_eff))),
                    "peftkern.adapter_backward: x is needed for the gradients asked for but was not given");
  std::vector<OptTensor> grads(7);
  if (need_w) grads[1] = at::mm(dy.t(), *x);
  if (need_b) grads[2] = dy.sum(0);
  const bool need_dhu = need_x || need_A || need_u;  // the rank-r path back to x, A and u
  if (!need_dhu && !need_B && !need_v) return {grads, kAuto};

  const Path path = choose_backward(M, N, K, r, dy, forced, has(w_eff), dropout > 0);
  record_path("adapter", true, path);
  Tensor GtT, dA, du, dx;
  if (path == kMerged && has(w_eff)) {
    backward_with_merged_weight(dy, x.value_or(Tensor()), A, B, u, v, *w_eff, scale, need_x, need_A, need_u,
                                need_B || need_v, dx, dA, du, GtT);
  } else if (path == kAddmm) {
    std::vector<OptTensor> low = backward_addmm(dy, x, weight, A, B, u, v, h, scale, dropout, seed, need_x, need_A,
                                                need_B, need_u, need_v);
    for (int i : {0, 3, 4, 5, 6}) grads[i] = low[i];
    return {grads, path};
  } else {
    auto opts = dy.options();
    if (need_B || need_v) GtT = at::empty({r, N}, opts);
    if (need_A) dA = at::empty({r, K}, opts);
    if (need_u) du = at::empty({r}, opts);
    Tensor dx_lowrank;
    if (need_x && path == kFused) dx = dx_lowrank = at::empty({M, K}, opts);
    backward_pass(dy, x, A, B, u, v, h, scale, dropout, seed, GtT, dA, du, dx_lowrank);
    if (need_x) {
      if (path == kFused)
        dx.addmm_(dy, weight);
      else
        dx = at::mm(dy, merged_weight(weight, A, B, u, v, scale));
    }
  }
  if (need_x) grads[0] = dx;
  if (need_A) grads[3] = dA;
  if (need_u) grads[5] = du;
  if (need_B || need_v) {
    Tensor Gt = GtT.t();
    if (need_B) grads[4] = has(v) ? Gt * (*v * scale).unsqueeze(1) : Gt * scale;
    if (need_v) grads[6] = (Gt * B).sum(1).mul_(scale);
  }
  return {grads, path};
}

}  // namespace peftkern
