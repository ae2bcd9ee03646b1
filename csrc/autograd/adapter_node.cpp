// The adapter as one C++ autograd node: what peftkern/ops/functions.py's AdapterFunction
// does, without Python in the forward or the backward.
//
// A Python autograd.Function costs host time on every call: its apply, ctx bookkeeping,
// the wrapper's reshapes and flag reads, and a Python backward that the engine calls back
// into. benchmarks/bench_module_host.py measures it per module (results/module_host.md: the
// Python Function path 155 µs per forward+backward, this node 121, PEFT's LoRA layer 154, a
// frozen nn.Linear 48, on the 2-core CPU VM); bench_launches.py the whole step. Here forward
// and backward are C++ calls of the same kernels (adapter_forward / adapter_backward,
// csrc/cpu/adapter.cpp, with their per-call path choice), and the node saves exactly what
// AdapterFunction saves: never an M×N tensor, x only when a gradient reads it.
//
// It is the eager path only: under torch.compile the Python Function's custom ops are
// traced instead (peftkern/ops/library.py), and the math is the same code either way.
#include "../ops.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

namespace peftkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// needs_input_grad of the 7 differentiable inputs (x, weight, bias, A, B, u, v), packed in
// the bits of an int64 so that it travels in ctx->saved_data.
enum Need : int64_t { kX = 1, kW = 2, kBias = 4, kA = 8, kB = 16, kU = 32, kV = 64 };

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// Python's @once_differentiable for a C++ backward run with create_graph=True: the gradients
// were computed without a graph (the saved h has none either), so differentiating them again
// must raise, not return a wrong second derivative.
variable_list once_differentiable(variable_list grads) {
  variable_list fake(grads.size());
  for (size_t i = 0; i < grads.size(); ++i)
    if (grads[i].defined()) fake[i] = grads[i].detach().requires_grad_(true);
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "peftkern.adapter: second derivatives (a gradient of a gradient) are not supported", fake.size());
  return (*error)(std::move(fake));
}

// t [..., width] as [M, width]; reshape({-1, 0}) cannot infer M (0 elements fit any M), so a
// zero width computes it (functions._rows)
Tensor rows(const Tensor& t, int64_t width) {
  if (width) return t.reshape({-1, width});
  const auto lead = t.sizes().slice(0, t.dim() - 1);
  return t.reshape({c10::multiply_integers(lead.begin(), lead.end()), 0});
}

struct AdapterNode : public torch::autograd::Function<AdapterNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const Tensor& A, const Tensor& B, const OptTensor& u, const OptTensor& v, double scale,
                        double dropout, int64_t seed, int64_t path, int64_t needs) {
    const int64_t N = weight.size(0), K = weight.size(1);
    const Tensor x2 = rows(x, K);
    const bool want_h = needs & (kB | kU | kV);  // Gt and du read h; dx and dA do not
    [[maybe_unused]] auto [y, h, aux, ran] = adapter_forward(x2, weight, bias, A, B, u, v, scale, dropout, seed, path);
    const Tensor hs = want_h ? or_undefined(h) : Tensor();
    // a merged forward returns no h: its backward recomputes it from x
    const bool keep_x = (needs & (kA | kW)) || (want_h && !hs.defined());
    ctx->save_for_backward({keep_x ? x2 : Tensor(), weight, A, B, or_undefined(u), or_undefined(v), hs,
                            or_undefined(aux)});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["path"] = path;
    ctx->saved_data["needs"] = needs;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    std::vector<int64_t> out = x.sizes().vec();
    out.back() = N;
    // not a differentiable view: a Function's output that is one may not be modified in place,
    // and a model may do `y += ...` on a projection's output as on nn.Linear's (functions._shaped)
    return x.dim() == 2 ? y : y.view(out).detach();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool create_graph = at::GradMode::is_enabled();
    variable_list out;
    {
      at::NoGradGuard no_grad;
      out = gradients(ctx, grads);
    }
    return create_graph ? once_differentiable(std::move(out)) : out;
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const variable_list s = ctx->get_saved_variables();  // x2, weight, A, B, u, v, h, aux
    const Tensor& weight = s[1];
    const int64_t needs = ctx->saved_data["needs"].toInt();
    std::vector<bool> flags(7);
    for (int i = 0; i < 7; ++i) flags[i] = needs & (int64_t(1) << i);
    const Tensor dy = rows(grads[0], weight.size(0));
    [[maybe_unused]] auto [g, ran] = adapter_backward(dy, optional(s[0]), weight, s[2], s[3], optional(s[4]), optional(s[5]),
                                     optional(s[6]), optional(s[7]), ctx->saved_data["scale"].toDouble(),
                                     ctx->saved_data["dropout"].toDouble(), ctx->saved_data["seed"].toInt(), flags,
                                     ctx->saved_data["path"].toInt());
    variable_list out(12);  // one per forward argument; the last five are not tensors
    for (int i = 0; i < 7; ++i)
      if (flags[i] && g[i].has_value()) out[i] = *g[i];
    if (out[0].defined()) out[0] = out[0].view(ctx->saved_data["x_sizes"].toIntVector());
    return out;
  }
};

}  // namespace

Tensor adapter_apply(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A, const Tensor& B,
                     const OptTensor& u, const OptTensor& v, double scale, double dropout, int64_t seed,
                     int64_t path) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "peftkern.adapter: weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "peftkern.adapter: x must be [..., ",
                    weight.size(1), "] for a weight of shape ", weight.sizes(), ", got ", x.sizes());
  // needs_input_grad as the Python Function sees it (inside forward grad mode is off)
  const bool grad = at::GradMode::is_enabled();
  auto need = [grad](const Tensor& t, Need bit) { return grad && t.requires_grad() ? int64_t(bit) : int64_t(0); };
  auto need_opt = [&](const OptTensor& t, Need bit) { return t.has_value() ? need(*t, bit) : int64_t(0); };
  const int64_t needs = need(x, kX) | need(weight, kW) | need_opt(bias, kBias) | need(A, kA) | need(B, kB) |
                        need_opt(u, kU) | need_opt(v, kV);
  return AdapterNode::apply(x, weight, bias, A, B, u, v, scale, dropout, seed, path, needs);
}

}  // namespace peftkern
