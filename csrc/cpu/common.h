// Helpers shared by the adapter, shrink and expand ops (internal to csrc/cpu).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "../ops.h"
#include "lowrank.h"

namespace peftkern {
namespace detail {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// The streaming kernels exist for CPU float and double; bf16/fp16 and other devices use
// the ATen sequence ("addmm" path), which keeps those dtypes' fp32 accumulation.
inline bool streams(const Tensor& x) {
  return x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// Merging W0 + ΔW is exact enough only with a wide mantissa: in bf16/fp16 the small ΔW
// would be rounded away against W0.
inline bool may_merge(const Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
}

// (v⊙B)ᵀ as a contiguous [r, N] matrix: rows of the up-projection the kernels stream over.
inline Tensor folded_vBt(const Tensor& B, const OptTensor& v) {
  Tensor vB = has(v) ? B * v->unsqueeze(1) : B;
  return vB.t().contiguous();
}

inline Tensor folded_vB(const Tensor& B, const OptTensor& v) { return has(v) ? B * v->unsqueeze(1) : B; }
inline Tensor folded_uA(const Tensor& A, const OptTensor& u) { return has(u) ? A * u->unsqueeze(1) : A; }

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}
template <typename T>
T* ptr_or_null(Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

inline OptTensor contiguous(const OptTensor& t) {
  return has(t) ? OptTensor(t->contiguous()) : OptTensor();
}

// Every tensor of one op call must share x's dtype and device: the layer casts factors
// to the activation dtype before calling, so a mismatch here is a caller bug.
inline void check_same(const Tensor& x, const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "peftkern.", op, ": ", name, " has dtype ", t.scalar_type(),
                   " but x has ", x.scalar_type(), "; cast the factors to the activation dtype");
  TORCH_CHECK_VALUE(t.device() == x.device(), "peftkern.", op, ": ", name, " is on ", t.device(), " but x is on ",
                    x.device());
}
inline void check_same(const Tensor& x, const OptTensor& t, const char* op, const char* name) {
  if (has(t)) check_same(x, *t, op, name);
}

inline void check_matrix(const Tensor& t, int64_t rows, int64_t cols, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "peftkern.", op, ": ", name,
                    " must have shape [", rows, ", ", cols, "], got ", t.sizes());
}
inline void check_vector(const OptTensor& t, int64_t n, const char* op, const char* name) {
  if (has(t))
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, "peftkern.", op, ": ", name, " must have shape [", n,
                      "], got ", t->sizes());
}

}  // namespace detail
}  // namespace peftkern
