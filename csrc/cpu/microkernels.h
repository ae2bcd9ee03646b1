// Register-tiled kernels of the three rank-r products (internal to lowrank_pass.cpp).
//
// L is the number of lanes of one vector register for the target the caller is compiled
// for (16 floats with AVX-512). Each kernel holds a small tile of accumulators in vector
// registers (explicit vector types, not left to the auto-vectoriser), so that every
// loaded vector feeds several FMAs. Everything is always_inline so that it is compiled
// with the instruction set of the function that includes it.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PEFTKERN_X86_DISPATCH 1
#else
#define PEFTKERN_X86_DISPATCH 0
#endif
#define PEFTKERN_INLINE inline __attribute__((always_inline))

namespace peftkern {
namespace lowrank {

template <typename T, int L>
struct Microkernels {
  // One vector register of L lanes (GCC/Clang vector extension: arithmetic is lane-wise,
  // a scalar operand is broadcast). VU is the same type for unaligned loads and stores.
  typedef T V __attribute__((vector_size(sizeof(T) * L)));
  typedef T VU __attribute__((vector_size(sizeof(T) * L), aligned(alignof(T)), may_alias));
  static constexpr int KV = 2;       // vectors per tile row in rank_update and expand_rows
  static constexpr int KT = KV * L;  // columns per tile

  static PEFTKERN_INLINE V load(const T* p) { return *reinterpret_cast<const VU*>(p); }
  static PEFTKERN_INLINE void store(T* p, V v) { *reinterpret_cast<VU*>(p) = v; }
  static PEFTKERN_INLINE V splat(T s) { return V{} + s; }

  // out[i*r + j] = alpha · Σ_k X[i*ldx + k] · Y[j*len + k] for an IB×JB tile of (i, j).
  template <int IB, int JB>
  static PEFTKERN_INLINE void dots_tile(const T* X, int64_t ldx, const T* Y, int64_t len, T alpha, T* out,
                                        int64_t r) {
    V acc[IB][JB];
    for (int i = 0; i < IB; ++i)
      for (int j = 0; j < JB; ++j) acc[i][j] = V{};
    int64_t k = 0;
    for (; k + L <= len; k += L) {
      V x[IB];
      for (int i = 0; i < IB; ++i) x[i] = load(X + i * ldx + k);
      for (int j = 0; j < JB; ++j) {
        const V y = load(Y + j * len + k);
        for (int i = 0; i < IB; ++i) acc[i][j] += x[i] * y;
      }
    }
    for (int i = 0; i < IB; ++i)
      for (int j = 0; j < JB; ++j) {
        T sum = 0;
        for (int t = 0; t < L; ++t) sum += acc[i][j][t];
        for (int64_t kk = k; kk < len; ++kk) sum += X[i * ldx + kk] * Y[j * len + kk];
        out[i * r + j] = alpha * sum;
      }
  }

  // out[i*r + j] = alpha · Σ_k X[i*ldx + k] · Y[j*len + k]       (i < rows, j < r)
  static PEFTKERN_INLINE void row_dots(const T* X, int64_t ldx, int64_t rows, const T* Y, int64_t r, int64_t len,
                                       T alpha, T* out) {
    int64_t i = 0;
    for (; i + 2 <= rows; i += 2) {
      int64_t j = 0;
      for (; j + 4 <= r; j += 4) dots_tile<2, 4>(X + i * ldx, ldx, Y + j * len, len, alpha, out + i * r + j, r);
      for (; j < r; ++j) dots_tile<2, 1>(X + i * ldx, ldx, Y + j * len, len, alpha, out + i * r + j, r);
    }
    for (; i < rows; ++i) {
      int64_t j = 0;
      for (; j + 4 <= r; j += 4) dots_tile<1, 4>(X + i * ldx, ldx, Y + j * len, len, alpha, out + i * r + j, r);
      for (; j < r; ++j) dots_tile<1, 1>(X + i * ldx, ldx, Y + j * len, len, alpha, out + i * r + j, r);
    }
  }

  // Acc[j*len + t] += Σ_i C[i*r + j] · X[i*ldx + t] for a JB×KT tile (pointers at its corner).
  template <int JB>
  static PEFTKERN_INLINE void update_tile(const T* C, int64_t rows, int64_t r, const T* X, int64_t ldx, T* Acc,
                                          int64_t len) {
    V acc[JB][KV];
    for (int j = 0; j < JB; ++j)
      for (int v = 0; v < KV; ++v) acc[j][v] = load(Acc + j * len + v * L);
    for (int64_t i = 0; i < rows; ++i) {
      V x[KV];
      for (int v = 0; v < KV; ++v) x[v] = load(X + i * ldx + v * L);
      for (int j = 0; j < JB; ++j) {
        const V c = splat(C[i * r + j]);
        for (int v = 0; v < KV; ++v) acc[j][v] += c * x[v];
      }
    }
    for (int j = 0; j < JB; ++j)
      for (int v = 0; v < KV; ++v) store(Acc + j * len + v * L, acc[j][v]);
  }

  // Acc[j*len + k] += Σ_i C[i*r + j] · X[i*ldx + k]: a rank-`rows` update of an [r, len] partial.
  static PEFTKERN_INLINE void rank_update(const T* C, int64_t rows, int64_t r, const T* X, int64_t ldx, int64_t len,
                                          T* Acc) {
    int64_t k = 0;
    for (; k + KT <= len; k += KT) {
      int64_t j = 0;
      for (; j + 4 <= r; j += 4) update_tile<4>(C + j, rows, r, X + k, ldx, Acc + j * len + k, len);
      for (; j < r; ++j) update_tile<1>(C + j, rows, r, X + k, ldx, Acc + j * len + k, len);
    }
    if (k == len) return;
    for (int64_t j = 0; j < r; ++j)  // the columns past the last full tile
      for (int64_t i = 0; i < rows; ++i) {
        const T c = C[i * r + j];
        for (int64_t kk = k; kk < len; ++kk) Acc[j * len + kk] += c * X[i * ldx + kk];
      }
  }

  // Out[i*ldo + t] = init[t] + Σ_j C[i*r + j] · Y[j*len + t] for an IB×KT tile (pointers at its corner).
  template <int IB>
  static PEFTKERN_INLINE void expand_tile(const T* C, int64_t r, const T* Y, int64_t len, const T* init, T* Out,
                                          int64_t ldo) {
    V acc[IB][KV];
    for (int v = 0; v < KV; ++v) {
      const V start = init ? load(init + v * L) : V{};
      for (int i = 0; i < IB; ++i) acc[i][v] = start;
    }
    for (int64_t j = 0; j < r; ++j) {
      V y[KV];
      for (int v = 0; v < KV; ++v) y[v] = load(Y + j * len + v * L);
      for (int i = 0; i < IB; ++i) {
        const V c = splat(C[i * r + j]);
        for (int v = 0; v < KV; ++v) acc[i][v] += c * y[v];
      }
    }
    for (int i = 0; i < IB; ++i)
      for (int v = 0; v < KV; ++v) store(Out + i * ldo + v * L, acc[i][v]);
  }

  // Out[i*ldo + k] = init[k] (0 if init is null) + Σ_j C[i*r + j] · Y[j*len + k]
  static PEFTKERN_INLINE void expand_rows(const T* C, int64_t rows, int64_t r, const T* Y, int64_t len,
                                          const T* init, T* Out, int64_t ldo) {
    int64_t k = 0;
    for (; k + KT <= len; k += KT) {
      const T* init_k = init ? init + k : nullptr;
      int64_t i = 0;
      for (; i + 4 <= rows; i += 4) expand_tile<4>(C + i * r, r, Y + k, len, init_k, Out + i * ldo + k, ldo);
      for (; i < rows; ++i) expand_tile<1>(C + i * r, r, Y + k, len, init_k, Out + i * ldo + k, ldo);
    }
    if (k == len) return;
    for (int64_t i = 0; i < rows; ++i) {  // the columns past the last full tile
      T* o = Out + i * ldo;
      for (int64_t kk = k; kk < len; ++kk) o[kk] = init ? init[kk] : T(0);
      for (int64_t j = 0; j < r; ++j) {
        const T c = C[i * r + j];
        for (int64_t kk = k; kk < len; ++kk) o[kk] += c * Y[j * len + kk];
      }
    }
  }
};

}  // namespace lowrank
}  // namespace peftkern
