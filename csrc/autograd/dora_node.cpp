// DoRA as one C++ autograd node: what peftkern/ops/functions.py's DoraFunction does without
// dropout (both of its routes), without Python in the forward or the backward.
//
//   y = g⊙(W0·x + s·Λv·B·Λu·A·x) + b,   g = m / ‖W0 + ΔW‖_row   (Liu et al. 2024, eq. 5; the
//   norm a constant in the backward, §4.3, so m alone gets g's gradient)
//
// folded  (many tokens, functions.dora_folds): g rides on W0 and on v (on B when there is no v),
//         y = adapter(x; g⊙W0, b, A, g⊙B or B, u, g⊙v); the backward runs the adapter's backward on
//         dy itself with g⊙W0 formed again, and dm = Σ_m dy⊙(y − b) / m from one read of dy and y.
// scaled  z = adapter(x; W0, no bias) scaled in place, y = g⊙z + b; the backward's one pass over dy
//         gives dz = dy⊙g and dg = Σ_m dy⊙(y − b)/g, then the adapter's backward on dz, dm = dg/norm.
//
// The norm and g come from the caller (the magnitude cache, peftkern/dora.py), except on the
// scaled route when the forward's merged path keeps W_eff = W0 + ΔW (ranks above kMaxFusedRank): W_eff's row
// norms are then the norm, as in the Python Function (the caller asks ``dora_norm_in_forward``).
// Dropout (PEFT's formula applies W0 to the undropped x, a second base GEMM) stays in the Python
// Function. The node saves what DoraFunction saves; the two are compared bit for bit in
// tests/unit/test_cpp_dora_node.py. On CUDA (a CUDA build) the same code runs ATen's ops.
#include "node_common.h"

namespace peftkern {
namespace {

using namespace node;
using torch::autograd::AutogradContext;

// needs_input_grad of the 8 differentiable inputs (x, weight, bias, A, B, u, v, m)
enum Need : int64_t { kX = 1, kW = 2, kBias = 4, kA = 8, kB = 16, kU = 32, kV = 64, kM = 128 };

// Set when the cpp backend loads (set_dora_inplace_advice); this default serves a direct use of peftkern._C.
std::string& inplace_advice() {
  static std::string text = "DoRA: a tensor this DoRA module saved for its backward was modified in place.";
  return text;
}

// a / b in their promoted dtype, rounded once to `dtype` by the division itself (functions.ratio)
Tensor ratio(const Tensor& a, const Tensor& b, at::ScalarType dtype) {
  Tensor out = at::empty(b.sizes(), b.options().dtype(dtype));
  at::div_out(out, a, b);
  return out;
}

struct DoraNode : public torch::autograd::Function<DoraNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const Tensor& A, const Tensor& B, const OptTensor& u, const OptTensor& v, const Tensor& m,
                        const OptTensor& norm, const OptTensor& g, double scale, bool folded, int64_t path,
                        int64_t needs) {
    const Tensor x2 = rows(x, weight.size(1));
    const bool want_h = needs & (kB | kU | kV);  // Gt and du read h; dx and dA do not
    Tensor gain = or_undefined(g), last, y, h, aux;
    Tensor B_run = B;
    OptTensor v_run = v;
    if (folded) {
      TORCH_CHECK_VALUE(gain.defined(), "peftkern.dora_adapter: the folded route needs g before its GEMM");
      // g rides on B itself when there is no v (LoRA): one launch fewer than a v = g (DoraFunction)
      if (v.has_value())
        v_run = *v * gain;
      else
        B_run = B * gain.unsqueeze(1);
      [[maybe_unused]] auto [out, hh, ax, ran] = adapter_forward(x2, weight * gain.unsqueeze(1), bias, A, B_run, u, v_run, scale, 0.0,
                                                0, path);
      y = out, h = or_undefined(hh), aux = or_undefined(ax);
      // the backward divides by m in m's own dtype (DoraFunction._folded_backward): no cast either way
      last = m.detach();
    } else {
      [[maybe_unused]] auto [z, hh, ax, ran] = adapter_forward(x2, weight, std::nullopt, A, B, u, v, scale, 0.0, 0, path);
      h = or_undefined(hh), aux = or_undefined(ax);
      last = or_undefined(norm);
      if (!gain.defined()) {
        TORCH_CHECK_VALUE(aux.defined(), "peftkern.dora_adapter: no norm was given and the forward kept no merged "
                                         "weight to take it from (ask dora_norm_in_forward)");
        last = at::linalg_vector_norm(aux, 2, {1}, false, std::nullopt);  // fp32/fp64: the merged path's dtypes
        gain = ratio(m.detach(), last, x2.scalar_type());
      }
      y = dora_scale_forward(z, gain, bias);
    }
    const Tensor hs = want_h ? h : Tensor();
    const bool keep_x = (needs & (kA | kW)) || (want_h && !hs.defined());
    ctx->save_for_backward({keep_x ? x2 : Tensor(), weight, A, B_run, or_undefined(u), or_undefined(v_run), hs, aux,
                            gain, or_undefined(bias), (needs & kM) ? y : Tensor(), last});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["path"] = path;
    ctx->saved_data["needs"] = needs;
    ctx->saved_data["folded"] = folded;
    ctx->saved_data["v_given"] = v.has_value();
    ctx->saved_data["m_dtype"] = static_cast<int64_t>(m.scalar_type());
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return shaped(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return first_order_only([&] { return gradients(ctx, grads); }, "dora_adapter");
  }

  // The output y is saved (dm comes from a read of dy and y): an in-place edit of y after the forward
  // fails torch's version check. Say what that means for DoRA, in DoraFunction's words.
  static variable_list saved(AutogradContext* ctx) {
    try {
      return ctx->get_saved_variables();
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      if (what.find("modified by an inplace operation") == std::string::npos) throw;
      TORCH_CHECK(false, inplace_advice(), " torch said: ", what);
    }
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    // x2, weight, A, B (g⊙B on the folded route without v), u, v (g⊙v folded), h, aux, g, bias, y, m or norm
    const variable_list s = saved(ctx);
    const Tensor &weight = s[1], &gain = s[8], &y = s[10], &last = s[11];
    const OptTensor bias = optional(s[9]);
    const int64_t needs = ctx->saved_data["needs"].toInt();
    const bool folded = ctx->saved_data["folded"].toBool();
    const auto m_dtype = static_cast<at::ScalarType>(ctx->saved_data["m_dtype"].toInt());
    const bool need_x = needs & kX, need_w = needs & kW, need_m = needs & kM;
    std::vector<bool> flags(7);
    for (int i = 0; i < 7; ++i) flags[i] = needs & (int64_t(1) << i);
    flags[2] = false;  // the bias's gradient is dy's column sum, below (the adapter saw no bias or a folded one)
    const Tensor dy = rows(grads[0], weight.size(0));
    auto adapter_grads = [&](const Tensor& d, const Tensor& w) {
      return std::get<0>(adapter_backward(d, optional(s[0]), w, s[2], s[3], optional(s[4]), optional(s[5]),
                                          optional(s[6]), optional(s[7]), ctx->saved_data["scale"].toDouble(), 0.0, 0,
                                          flags, ctx->saved_data["path"].toInt()));
    };
    std::vector<OptTensor> g7;
    Tensor dm;
    if (folded) {
      if (need_m) dm = *std::get<1>(dora_scale_backward(dy, y, last, bias, true, true, false));  // in m's dtype
      g7 = adapter_grads(dy, need_x || need_w ? weight * gain.unsqueeze(1) : weight);
      const Tensor col = gain.unsqueeze(1);
      if (flags[1] && g7[1].has_value()) g7[1] = *g7[1] * col;
      if (ctx->saved_data["v_given"].toBool()) {
        if (flags[6] && g7[6].has_value()) g7[6] = *g7[6] * gain;
      } else if (flags[4] && g7[4].has_value()) {
        g7[4] = *g7[4] * col;
      }
    } else {
      auto [dz, dg] = dora_scale_backward(dy, y.defined() ? y : dy, gain, bias, true, need_m, true);
      g7 = adapter_grads(*dz, weight);
      if (need_m && dg.has_value()) dm = ratio(*dg, last, m_dtype);
    }
    variable_list out(14);  // one per forward argument; norm, g and the last four take none
    for (int i = 0; i < 7; ++i)
      if (flags[i] && g7[i].has_value()) out[i] = *g7[i];
    if (needs & kBias) out[2] = dy.sum(0).to(weight.scalar_type());
    out[7] = dm;
    if (out[0].defined()) out[0] = out[0].view(ctx->saved_data["x_sizes"].toIntVector());
    return out;
  }
};

}  // namespace

void set_dora_inplace_advice(const std::string& text) { inplace_advice() = text; }

bool dora_norm_in_forward(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& like, int64_t path) {
  return choose_forward(M, N, K, r, like, path, false) == kMerged && keeps_merged_weight(r);
}

Tensor dora_apply(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A, const Tensor& B,
                  const OptTensor& u, const OptTensor& v, const Tensor& m, const OptTensor& norm, const OptTensor& g,
                  double scale, bool folded, int64_t path) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "peftkern.dora_adapter: weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "peftkern.dora_adapter: x must be [..., ",
                    weight.size(1), "] for a weight of shape ", weight.sizes(), ", got ", x.sizes());
  TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == weight.size(0), "peftkern.dora_adapter: m must be [",
                    weight.size(0), "], got ", m.sizes());
  TORCH_CHECK_VALUE(norm.has_value() == g.has_value(), "peftkern.dora_adapter: give both the norm and g, or neither");
  const int64_t needs = need(x, kX) | need(weight, kW) | need(bias, kBias) | need(A, kA) | need(B, kB) | need(u, kU) |
                        need(v, kV) | need(m, kM);
  return DoraNode::apply(x, weight, bias, A, B, u, v, m, norm, g, scale, folded, path, needs);
}

}  // namespace peftkern
