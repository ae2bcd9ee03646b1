// The dropout mask of dropout.h as a tensor, for the ATen ("addmm") path and for tests.
#include "dropout.h"

#include <ATen/Parallel.h>

#include "common.h"

namespace peftkern {

Tensor dropout_mask(int64_t seed, int64_t M, int64_t K, double p, const Tensor& like) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "peftkern.dropout_mask: p must be in [0, 1), got ", p);
  Tensor keep = at::empty({M, K}, like.options().device(at::kCPU).dtype(at::kFloat));
  float* out = keep.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  at::parallel_for(0, M * K, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = dropout::keeps(s, i, p) ? 1.0f : 0.0f;
  });
  return keep.to(like.options());
}

}  // namespace peftkern
