// What the C++ autograd nodes share (adapter_node.cpp, dora_node.cpp): the Python Functions'
// helpers of peftkern/ops/functions.py, in C++.
#pragma once
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <memory>
#include <string>

#include "../ops.h"

namespace peftkern {
namespace node {

using torch::autograd::variable_list;

inline Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
inline OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// Python's @once_differentiable for a C++ backward run with create_graph=True: the gradients
// were computed without a graph (the saved tensors have none either), so differentiating them
// again must raise, not return a wrong second derivative.
inline variable_list once_differentiable(variable_list grads, const char* op) {
  variable_list fake(grads.size());
  for (size_t i = 0; i < grads.size(); ++i)
    if (grads[i].defined()) fake[i] = grads[i].detach().requires_grad_(true);
  auto error = std::make_shared<torch::autograd::DelayedError>(
      std::string("peftkern.") + op + ": second derivatives (a gradient of a gradient) are not supported",
      fake.size());
  return (*error)(std::move(fake));
}

// A node's backward: ``gradients()`` computed without a graph, which differentiating again (after a
// backward with create_graph=True) makes raise, as Python's functions.first_order_only does
template <typename F>
variable_list first_order_only(F gradients, const char* op) {
  const bool create_graph = at::GradMode::is_enabled();
  variable_list out;
  {
    at::NoGradGuard no_grad;
    out = gradients();
  }
  return create_graph ? once_differentiable(std::move(out), op) : out;
}

// t [..., width] as [M, width]; reshape({-1, 0}) cannot infer M (0 elements fit any M), so a
// zero width computes it (functions._rows)
inline Tensor rows(const Tensor& t, int64_t width) {
  if (width) return t.reshape({-1, width});
  const auto lead = t.sizes().slice(0, t.dim() - 1);
  return t.reshape({c10::multiply_integers(lead.begin(), lead.end()), 0});
}

// A node's 2-D output [M, N] with x's leading dims, not a differentiable view: a Function's
// output that is one may not be modified in place, and a model may do `y += ...` on a
// projection's output as on nn.Linear's (functions._shaped)
inline Tensor shaped(const Tensor& y, const Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> out = x.sizes().vec();
  out.back() = y.size(1);
  return y.view(out).detach();
}

// needs_input_grad as a Python Function sees it (inside forward grad mode is off), one bit each
inline int64_t need(const Tensor& t, int64_t bit) {
  return at::GradMode::is_enabled() && t.requires_grad() ? bit : int64_t(0);
}
inline int64_t need(const OptTensor& t, int64_t bit) { return t.has_value() ? need(*t, bit) : int64_t(0); }

}  // namespace node
}  // namespace peftkern
