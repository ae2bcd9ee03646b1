// AdaLoRA's orthogonality distances for every adapter matrix in one call, forward and backward:
//
//     d_i = ‖G_i − I‖_F,   G_i = X_iᵀ·X_i for X_i [L, r] ("columns": P)  or  X_i·X_iᵀ for X_i [r, L] ("rows": Q)
//     ∂d_i/∂X_i = 2·X_i·D_i / d_i  (columns)   or   2·D_i·X_i / d_i  (rows),   D_i = G_i − I (symmetric)
//
// and 0 where d_i = 0, the subgradient torch's vector_norm uses. Done as separate torch
// ops this is ~4 tiny GEMMs, a subtraction and a norm per matrix, each a Python call and
// an autograd node (120 matrices for 30 layers × q, v: about 7 ms a step on one core).
// Here one call per direction handles every matrix. The forward returns every D_i (r×r
// each) for the backward, so the Gram matrices are built once.
//
// The two products per matrix (the Gram matrix forward, X·D or D·X backward) are ATen GEMMs
// in the matrices' dtype, as in the torch reference; only the r×r parts (G − I, its norm,
// the scaling) run here, in double.
#include <cmath>
#include <vector>

#include "common.h"

namespace peftkern {
namespace {

struct Matrix {
  Tensor t;      // contiguous
  bool columns;  // true: X [L, r], G = XᵀX; false: X [r, L], G = XXᵀ
  int64_t L, r;
  int64_t offset;  // of its D in the flat buffer of every D
};

std::vector<Matrix> collect(const std::vector<Tensor>& columns, const std::vector<Tensor>& rows, const char* op) {
  std::vector<Matrix> out;
  int64_t offset = 0;
  for (bool col : {true, false})
    for (const Tensor& t : col ? columns : rows) {
      TORCH_CHECK_VALUE(t.dim() == 2, "peftkern.", op, ": every matrix must be 2-D, got ", t.sizes());
      TORCH_CHECK_VALUE(t.device().is_cpu(), "peftkern.", op, ": CPU tensors only, got one on ", t.device());
      TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "peftkern.", op,
                       ": float32 or float64 only, got ", t.scalar_type());
      const int64_t r = col ? t.size(1) : t.size(0);
      out.push_back({t.contiguous(), col, col ? t.size(0) : t.size(1), r, offset});
      offset += r * r;
    }
  for (const Matrix& m : out)
    TORCH_CHECK_TYPE(m.t.scalar_type() == out[0].t.scalar_type(), "peftkern.", op, ": all matrices must share "
                     "one dtype, got ", out[0].t.scalar_type(), " and ", m.t.scalar_type());
  return out;
}

int64_t d_numel(const std::vector<Matrix>& mats) {
  return mats.empty() ? 0 : mats.back().offset + mats.back().r * mats.back().r;
}

Tensor gram(const Matrix& m) { return m.columns ? at::mm(m.t.t(), m.t) : at::mm(m.t, m.t.t()); }

}  // namespace

std::tuple<Tensor, Tensor> gram_distances(const std::vector<Tensor>& columns, const std::vector<Tensor>& rows) {
  const std::vector<Matrix> mats = collect(columns, rows, "gram_distances");
  const auto dtype = mats.empty() ? at::kFloat : mats[0].t.scalar_type();
  Tensor out = at::empty({int64_t(mats.size())}, at::TensorOptions().dtype(dtype));
  Tensor D = at::empty({d_numel(mats)}, at::TensorOptions().dtype(at::kDouble));
  double* Dp = D.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "peftkern.gram_distances", [&] {
    scalar_t* d = out.data_ptr<scalar_t>();
    for (size_t i = 0; i < mats.size(); ++i) {
      const Matrix& m = mats[i];
      const Tensor G = gram(m);
      const scalar_t* Gp = G.data_ptr<scalar_t>();
      double* Di = Dp + m.offset;
      double ss = 0;
      for (int64_t e = 0; e < m.r * m.r; ++e) {
        Di[e] = double(Gp[e]) - (e % (m.r + 1) == 0 ? 1.0 : 0.0);
        ss += Di[e] * Di[e];
      }
      d[i] = static_cast<scalar_t>(std::sqrt(ss));
    }
  });
  return {out, D};
}

std::vector<Tensor> gram_distances_backward(const Tensor& grad, const Tensor& distances, const Tensor& D,
                                            const std::vector<Tensor>& columns, const std::vector<Tensor>& rows) {
  const std::vector<Matrix> mats = collect(columns, rows, "gram_distances_backward");
  const int64_t n = int64_t(mats.size());
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == n && distances.dim() == 1 && distances.size(0) == n,
                    "peftkern.gram_distances_backward: grad and distances must have one entry per matrix (", n,
                    "), got ", grad.sizes(), " and ", distances.sizes());
  TORCH_CHECK_VALUE(D.scalar_type() == at::kDouble && D.is_contiguous() && D.numel() == d_numel(mats),
                    "peftkern.gram_distances_backward: D must be the contiguous float64 buffer the forward returned");
  std::vector<Tensor> grads(mats.size());
  const Tensor g = grad.to(at::kDouble).contiguous(), dist = distances.to(at::kDouble).contiguous();
  const double *gp = g.data_ptr<double>(), *dp = dist.data_ptr<double>();
  for (size_t i = 0; i < mats.size(); ++i) {
    const Matrix& m = mats[i];
    // 2·g/‖D‖ folded into D once; a zero distance has a zero (sub)gradient.
    const double c = dp[i] > 0 ? 2.0 * gp[i] / dp[i] : 0.0;
    const Tensor Di = D.narrow(0, m.offset, m.r * m.r).view({m.r, m.r}).mul(c).to(m.t.scalar_type());
    grads[i] = m.columns ? at::mm(m.t, Di) : at::mm(Di, m.t);
  }
  return grads;
}

}  // namespace peftkern
