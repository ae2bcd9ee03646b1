// The row-streaming passes declared in lowrank.h. See there for what they compute.
//
// Speed comes from three things:
//  * every rank-r product of a direction happens in one walk over the rows, in blocks
//    of kRowBlock rows that stay in L1/L2 between the products;
//  * the three products are small register-tiled kernels (microkernels.h): tiles have
//    compile-time sizes so the compiler keeps them in vector registers;
//  * the block functions are compiled three times, for AVX-512, AVX2+FMA and baseline
//    x86-64, each with tiles sized for its vector width, and the widest one the CPU
//    supports is picked once at load time. One portable build uses the machine it runs on.
#include "lowrank.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dropout.h"
#include "microkernels.h"

namespace peftkern {
namespace lowrank {
namespace {

constexpr int64_t kRowBlock = 16;  // rows per block: the block of x/dy rows stays in L1/L2

// Per-thread scratch: rank-r rows of one block.
template <typename T>
struct Scratch {
  std::vector<T> h, hu, dhu, dh, c, xd;  // xd: the block's rows of D(x), only with dropout
  Scratch(int64_t r, int64_t K, bool dropout)
      : h(kRowBlock * r), hu(kRowBlock * r), dhu(kRowBlock * r), dh(kRowBlock * r), c(kRowBlock * r),
        xd(dropout ? kRowBlock * K : 0) {}
};

// Rows m0..m1 of D(x) = x⊙keep/(1-p) into s.xd; returns the rows to read for rank-r products.
template <typename T>
PEFTKERN_INLINE const T* input_rows(const T* x, int64_t K, int64_t m0, int64_t m1, double p, uint64_t seed,
                                    Scratch<T>& s) {
  if (p <= 0) return x + m0 * K;
  const T inv = static_cast<T>(1.0 / (1.0 - p));
  for (int64_t m = m0; m < m1; ++m) {
    const T* src = x + m * K;
    T* dst = s.xd.data() + (m - m0) * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = dropout::keeps(seed, m * K + k, p) ? src[k] * inv : T(0);
  }
  return s.xd.data();
}

// dx rows m0..m1 (holding dh·A) ⊙ keep/(1-p), in place.
template <typename T>
PEFTKERN_INLINE void mask_rows(T* dx, int64_t K, int64_t m0, int64_t m1, double p, uint64_t seed) {
  const T inv = static_cast<T>(1.0 / (1.0 - p));
  for (int64_t m = m0; m < m1; ++m) {
    T* row = dx + m * K;
    for (int64_t k = 0; k < K; ++k) row[k] = dropout::keeps(seed, m * K + k, p) ? row[k] * inv : T(0);
  }
}

// Partial sums of the row reductions, one slab per thread.
template <typename T>
struct Partials {
  T* gt;
  T* dA;
  T* du;
};

template <typename T>
PEFTKERN_INLINE void scale_columns(const T* in, int64_t rows, int64_t r, const T* col, T* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < r; ++j) out[i * r + j] = in[i * r + j] * col[j];
}

template <typename T, int L>
PEFTKERN_INLINE void forward_block(const ForwardArgs<T>& a, int64_t m0, int64_t m1, Scratch<T>& s) {
  using K = Microkernels<T, L>;
  const int64_t rows = m1 - m0, r = a.r;
  const T* hu = nullptr;
  if (a.hu_in) {
    hu = a.hu_in + m0 * r;
  } else {
    T* h = a.h ? a.h + m0 * r : s.h.data();
    K::row_dots(input_rows(a.x, a.K, m0, m1, a.dropout, a.seed, s), a.K, rows, a.A, r, a.K, T(1), h);
    T* out = a.hu ? a.hu + m0 * r : (a.u ? s.hu.data() : h);
    if (a.u)
      scale_columns(h, rows, r, a.u, out);
    else if (out != h)
      std::copy(h, h + rows * r, out);
    hu = out;
  }
  if (a.y) {
    for (int64_t e = 0; e < rows * r; ++e) s.c[e] = a.scale * hu[e];
    K::expand_rows(s.c.data(), rows, r, a.vBt, a.N, a.bias, a.y + m0 * a.N, a.N);
  }
}

template <typename T, int L>
PEFTKERN_INLINE void backward_block(const BackwardArgs<T>& a, int64_t m0, int64_t m1, Scratch<T>& s,
                                    const Partials<T>& p) {
  using K = Microkernels<T, L>;
  const int64_t rows = m1 - m0, r = a.r;
  const bool want_dh = a.dA || a.dx;
  const bool want_dhu = want_dh || a.du || a.dhu;
  const bool want_h = a.GtT || a.du;
  // D(x) rows, built once per block when dA or a recomputed h reads them
  const T* xr = (a.dA || (want_h && !a.h)) ? input_rows(a.x, a.K, m0, m1, a.dropout, a.seed, s) : nullptr;
  const T* h = nullptr;
  if (want_h) {
    if (a.h) {
      h = a.h + m0 * r;
    } else {
      K::row_dots(xr, a.K, rows, a.A, r, a.K, T(1), s.h.data());
      h = s.h.data();
    }
  }
  const T* dhu = nullptr;
  if (want_dhu) {
    if (a.dhu_in) {
      dhu = a.dhu_in + m0 * r;
    } else {
      T* out = a.dhu ? a.dhu + m0 * r : s.dhu.data();
      K::row_dots(a.dy + m0 * a.N, a.N, rows, a.vBt, r, a.N, a.scale, out);
      dhu = out;
    }
  }
  if (a.GtT) {
    const T* hu = h;
    if (a.u) {
      scale_columns(h, rows, r, a.u, s.hu.data());
      hu = s.hu.data();
    }
    K::rank_update(hu, rows, r, a.dy + m0 * a.N, a.N, a.N, p.gt);
  }
  if (a.du) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < r; ++j) p.du[j] += h[i * r + j] * dhu[i * r + j];
  }
  if (want_dh) {
    const T* dh = dhu;
    if (a.u) {
      scale_columns(dhu, rows, r, a.u, s.dh.data());
      dh = s.dh.data();
    }
    if (a.dA) K::rank_update(dh, rows, r, xr, a.K, a.K, p.dA);
    if (a.dx) {
      K::expand_rows(dh, rows, r, a.A, a.K, static_cast<const T*>(nullptr), a.dx + m0 * a.K, a.K);
      if (a.dropout > 0) mask_rows(a.dx, a.K, m0, m1, a.dropout, a.seed);
    }
  }
}

// --- one compiled copy per instruction set; the lane count L sizes the register tiles ------
template <typename T>
using ForwardFn = void (*)(const ForwardArgs<T>&, int64_t, int64_t, Scratch<T>&);
template <typename T>
using BackwardFn = void (*)(const BackwardArgs<T>&, int64_t, int64_t, Scratch<T>&, const Partials<T>&);

#define PEFTKERN_DEFINE_BLOCKS(SUFFIX, ATTR, BYTES)                                                              \
  ATTR void forward_f32_##SUFFIX(const ForwardArgs<float>& a, int64_t m0, int64_t m1, Scratch<float>& s) {      \
    forward_block<float, BYTES / 4>(a, m0, m1, s);                                                               \
  }                                                                                                              \
  ATTR void forward_f64_##SUFFIX(const ForwardArgs<double>& a, int64_t m0, int64_t m1, Scratch<double>& s) {    \
    forward_block<double, BYTES / 8>(a, m0, m1, s);                                                              \
  }                                                                                                              \
  ATTR void backward_f32_##SUFFIX(const BackwardArgs<float>& a, int64_t m0, int64_t m1, Scratch<float>& s,      \
                                  const Partials<float>& p) {                                                    \
    backward_block<float, BYTES / 4>(a, m0, m1, s, p);                                                           \
  }                                                                                                              \
  ATTR void backward_f64_##SUFFIX(const BackwardArgs<double>& a, int64_t m0, int64_t m1, Scratch<double>& s,    \
                                  const Partials<double>& p) {                                                   \
    backward_block<double, BYTES / 8>(a, m0, m1, s, p);                                                          \
  }

PEFTKERN_DEFINE_BLOCKS(base, , 16)
#if PEFTKERN_X86_DISPATCH
PEFTKERN_DEFINE_BLOCKS(avx2, __attribute__((target("arch=x86-64-v3"))), 32)
PEFTKERN_DEFINE_BLOCKS(avx512, __attribute__((target("arch=x86-64-v4"))), 64)
#endif
#undef PEFTKERN_DEFINE_BLOCKS

// The widest instruction set this CPU supports, decided once.
enum class Isa { kBase, kAvx2, kAvx512 };
Isa detect_isa() {
#if PEFTKERN_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}
const Isa kIsa = detect_isa();

template <typename T>
struct Table;
template <>
struct Table<float> {
  static ForwardFn<float> forward() {
#if PEFTKERN_X86_DISPATCH
    if (kIsa == Isa::kAvx512) return forward_f32_avx512;
    if (kIsa == Isa::kAvx2) return forward_f32_avx2;
#endif
    return forward_f32_base;
  }
  static BackwardFn<float> backward() {
#if PEFTKERN_X86_DISPATCH
    if (kIsa == Isa::kAvx512) return backward_f32_avx512;
    if (kIsa == Isa::kAvx2) return backward_f32_avx2;
#endif
    return backward_f32_base;
  }
};
template <>
struct Table<double> {
  static ForwardFn<double> forward() {
#if PEFTKERN_X86_DISPATCH
    if (kIsa == Isa::kAvx512) return forward_f64_avx512;
    if (kIsa == Isa::kAvx2) return forward_f64_avx2;
#endif
    return forward_f64_base;
  }
  static BackwardFn<double> backward() {
#if PEFTKERN_X86_DISPATCH
    if (kIsa == Isa::kAvx512) return backward_f64_avx512;
    if (kIsa == Isa::kAvx2) return backward_f64_avx2;
#endif
    return backward_f64_base;
  }
};

// Rows per parallel chunk: enough that a thread streams at least ~64K elements.
int64_t grain(int64_t K, int64_t N) {
  return std::max<int64_t>(kRowBlock, (int64_t(1) << 16) / std::max<int64_t>(1, K + N));
}

template <typename T>
void forward_impl(const ForwardArgs<T>& a) {
  const ForwardFn<T> block = Table<T>::forward();
  at::parallel_for(0, a.M, grain(a.K, a.N), [&](int64_t begin, int64_t end) {
    Scratch<T> s(a.r, a.K, a.dropout > 0);
    for (int64_t m0 = begin; m0 < end; m0 += kRowBlock) block(a, m0, std::min(m0 + kRowBlock, end), s);
  });
}

template <typename T>
void backward_impl(const BackwardArgs<T>& a) {
  const BackwardFn<T> block = Table<T>::backward();
  const int64_t threads = at::get_num_threads();
  const int64_t gt_n = a.GtT ? a.r * a.N : 0, dA_n = a.dA ? a.r * a.K : 0, du_n = a.du ? a.r : 0;
  const int64_t slab = gt_n + dA_n + du_n;
  std::vector<T> partial(threads * slab, T(0));
  at::parallel_for(0, a.M, grain(a.K, a.N), [&](int64_t begin, int64_t end) {
    T* mine = partial.data() + at::get_thread_num() * slab;
    Partials<T> p{mine, mine + gt_n, mine + gt_n + dA_n};
    Scratch<T> s(a.r, a.K, a.dropout > 0);
    for (int64_t m0 = begin; m0 < end; m0 += kRowBlock) block(a, m0, std::min(m0 + kRowBlock, end), s, p);
  });
  // Sum the per-thread slabs in thread order (deterministic for a given thread count).
  auto reduce = [&](T* out, int64_t offset, int64_t n) {
    if (!out) return;
    std::fill(out, out + n, T(0));
    for (int64_t t = 0; t < threads; ++t) {
      const T* src = partial.data() + t * slab + offset;
      for (int64_t e = 0; e < n; ++e) out[e] += src[e];
    }
  };
  reduce(a.GtT, 0, gt_n);
  reduce(a.dA, gt_n, dA_n);
  reduce(a.du, gt_n + dA_n, du_n);
}

}  // namespace

void forward(const ForwardArgs<float>& a) { forward_impl(a); }
void forward(const ForwardArgs<double>& a) { forward_impl(a); }
void backward(const BackwardArgs<float>& a) { backward_impl(a); }
void backward(const BackwardArgs<double>& a) { backward_impl(a); }

const char* isa_name() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace lowrank
}  // namespace peftkern
