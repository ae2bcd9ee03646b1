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
#include "node_common.h"

namespace peftkern {
namespace {

using namespace node;
using torch::autograd::AutogradContext;

// needs_input_grad of the 7 differentiable inputs (x, weight, bias, A, B, u, v), packed in
// the bits of an int64 so that it travels in ctx->saved_data.
enum Need : int64_t { kX = 1, kW = 2, kBias = 4, kA = 8, kB = 16, kU = 32, kV = 64 };

struct AdapterNode : public torch::autograd::Function<AdapterNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const Tensor& A, const Tensor& B, const OptTensor& u, const OptTensor& v, double scale,
                        double dropout, int64_t seed, int64_t path, int64_t needs) {
    const Tensor x2 = rows(x, weight.size(1));
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
    return shaped(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return first_order_only([&] { return gradients(ctx, grads); }, "adapter");
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
  const int64_t needs = need(x, kX) | need(weight, kW) | need(bias, kBias) | need(A, kA) | need(B, kB) | need(u, kU) |
                        need(v, kV);
  return AdapterNode::apply(x, weight, bias, A, B, u, v, scale, dropout, seed, path, needs);
}

}  // namespace peftkern
