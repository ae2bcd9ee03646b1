// Row-streaming passes of the rank-r part of the adapter, for float and double.
//
// The adapter's low-rank work is small in FLOPs (r << K, N) but, done as separate skinny
// GEMMs, it reads x and dy several times and writes M×N / M×K temporaries. These passes
// walk the rows once, in blocks that stay in cache, and do every rank-r product of a
// direction in that one pass; the big base GEMM then accumulates on top (beta = 1).
//
//   forward   h = x·Aᵀ, hu = u⊙h, y = bias + s·hu·(v⊙B)ᵀ            (one read of x, one write of y)
//   backward  dhu = s·dy·(v⊙B), Gtᵀ = (dyᵀ·hu)ᵀ, du = Σ h⊙dhu,
//             dh = u⊙dhu, dA = dhᵀ·x, dx = dh·A                      (one read of x and dy, one write of dx)
//
// With dropout > 0, every read of x for the rank-r products reads D(x) = x⊙keep/(1-p)
// instead, built block by block in scratch from dropout.h's hash (no M×K mask exists),
// and dx = dh·A is written as D'(dh·A) = (dh·A)⊙keep/(1-p).
//
// Every pointer marked "or nullptr" is optional: a missing output is not computed, a
// missing input is not needed by the outputs asked for. All matrices are row-major and
// contiguous. Reductions over rows (Gt, dA, du) use one partial per thread, summed in a
// fixed order, so results are deterministic for a given thread count.
#pragma once
#include <cstdint>

namespace peftkern {
namespace lowrank {

template <typename T>
struct ForwardArgs {
  int64_t M = 0, K = 0, N = 0, r = 0;
  const T* x = nullptr;     // [M, K]
  const T* A = nullptr;     // [r, K]
  const T* u = nullptr;     // [r] or nullptr (identity)
  const T* vBt = nullptr;   // [r, N] = (v⊙B)ᵀ, needed when y is written
  const T* bias = nullptr;  // [N] or nullptr
  T scale = 1;
  const T* hu_in = nullptr; // [M, r] given hidden state (expand's forward): x, A, u are then unused
  T* h = nullptr;           // out [M, r]: x·Aᵀ, or nullptr
  T* hu = nullptr;          // out [M, r]: u⊙h, or nullptr
  T* y = nullptr;           // out [M, N]: bias + s·hu·vBtᵀ (written, not accumulated), or nullptr
  double dropout = 0;       // p of dropout on x (0: none)
  uint64_t seed = 0;        // the dropout mask's seed
};

template <typename T>
struct BackwardArgs {
  int64_t M = 0, K = 0, N = 0, r = 0;
  const T* x = nullptr;       // [M, K], needed for dA and to recompute h
  const T* dy = nullptr;      // [M, N], needed unless dhu_in is given
  const T* A = nullptr;       // [r, K]
  const T* vBt = nullptr;     // [r, N] = (v⊙B)ᵀ
  const T* u = nullptr;       // [r] or nullptr (identity)
  T scale = 1;
  const T* h = nullptr;       // [M, r] saved x·Aᵀ (before u), or nullptr to recompute it from x
  const T* dhu_in = nullptr;  // [M, r] given gradient of hu (shrink's backward), or nullptr
  T* dhu = nullptr;           // out [M, r]: s·dy·vBtᵀ, or nullptr
  T* GtT = nullptr;           // out [r, N]: (dyᵀ·hu)ᵀ, or nullptr
  T* dA = nullptr;            // out [r, K]: dhᵀ·x, or nullptr
  T* du = nullptr;            // out [r]: Σ_m h⊙dhu, or nullptr
  T* dx = nullptr;            // out [M, K]: dh·A (written, not accumulated), or nullptr
  double dropout = 0;         // p of dropout on x (0: none)
  uint64_t seed = 0;          // the dropout mask's seed
};

void forward(const ForwardArgs<float>& a);
void forward(const ForwardArgs<double>& a);
void backward(const BackwardArgs<float>& a);
void backward(const BackwardArgs<double>& a);

// The instruction set the kernels were dispatched to on this CPU: "avx512", "avx2" or "baseline".
const char* isa_name();

}  // namespace lowrank
}  // namespace peftkern
