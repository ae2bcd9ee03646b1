// Which code path an adapter call runs, and a record of the paths that ran.
//
// The cost model compares the extra memory traffic each path adds to the base GEMM
// (counted in elements; these rank-r products are bandwidth-bound on a CPU):
//
//   forward  fused : read x, write y before the GEMM accumulates      ~ M·(K + N)
//            merged: read W0, write W_eff = W0 + s·(v⊙B)·(u⊙A)        ~ 2·N·K
//   backward fused : write dx = dh·A before the GEMM accumulates      ~ M·K
//            merged: rebuild W_eff for dx = dy·W_eff                  ~ 2·N·K
//
// (the reads of x and dy for dA, dB, du and dv are the same on both paths). The
// constants scale the merged side. They come from interleaved single-thread timings of
// both paths on an AVX-512 CPU (AMD EPYC, K, N in {192, 576, 1536}, M 128..2048, r = 8):
//  * forward: merged won from M ≈ 1024 for 576→576 and from M ≈ 512 for 576→192, but a
//    merged forward saves no h, so the backward recomputes it; 2.0 puts the crossover
//    where fused+backward and merged+backward were equal;
//  * backward: merged lost at every measured size (the fused pass writes dh·A at close
//    to bandwidth), so 4.0 keeps it for much larger M than measured.
// They only move the crossover, never correctness; forced_path() in Python pins a path.
//
// Unmerged, the fused kernels win for small ranks and the ATen GEMMs for large ones: at
// M = 512..2048 the fused path was 5-10% faster per call at r = 8, level at r = 16-32 and
// 5-15% slower at r = 64-128 (MKL's GEMMs reuse data better once r is GEMM-sized).
//
// GEMM-sized ranks (r > kMaxFusedRank, e.g. VeRA's r = 128) are bound by FLOPs, not by
// memory traffic, so the forward compares multiply-adds instead:
//   unmerged  h = x·Aᵀ and s·hu·(v⊙B)ᵀ                                   M·r·(K + N)
//   merged    W_eff = W0 + s·(v⊙B)·(u⊙A), whose GEMM replaces the base one  N·K·r
// and a merged forward keeps W_eff for the backward (rebuilding it would cost N·K·r
// again), where dx = dy·W_eff then costs nothing beyond the base GEMM. Measured at
// M = 512, K = 576, r = 128, u and v trained, A and B frozen (single thread, CPU time of
// forward + backward beyond the base layer's own, on a shared machine): 3.2 ms against
// 5.3 ms unmerged for N = 576, and 2.0 ms against 3.2 ms for N = 192.
#include <array>
#include <atomic>

#include "common.h"

namespace peftkern {
namespace {

constexpr double kMergeForward = 2.0;
constexpr double kMergeBackward = 4.0;

constexpr std::array<const char*, 3> kOps = {"adapter", "shrink", "expand"};
constexpr std::array<const char*, 4> kPathNames = {"auto", "fused", "merged", "addmm"};

std::atomic<int64_t> g_counts[kOps.size()][2][kPathNames.size()];

int op_index(const char* op) {
  for (size_t i = 0; i < kOps.size(); ++i)
    if (std::string(op) == kOps[i]) return static_cast<int>(i);
  TORCH_CHECK(false, "peftkern: unknown op name in record_path: ", op);
}

Path check_forced(int64_t forced) {
  TORCH_CHECK_VALUE(forced >= kAuto && forced <= kAddmm, "peftkern: path code ", forced,
                    " is not valid; valid: 0 (auto), 1 (fused), 2 (merged), 3 (addmm)");
  return static_cast<Path>(forced);
}

// A forced path that cannot run for these tensors is an error, not a silent substitute.
Path validate(Path p, const Tensor& x, bool dropout) {
  TORCH_CHECK_VALUE(p != kMerged || !dropout, "peftkern: the merged path cannot apply dropout (it folds ΔW into ",
                    "W0, so the adapter never sees its own input); use 'fused' or 'addmm', or dropout=0");
  TORCH_CHECK_VALUE(p != kFused || detail::streams(x), "peftkern: the fused path needs CPU float32/float64 tensors, got ",
                    x.scalar_type(), " on ", x.device(), "; use path 'addmm'");
  TORCH_CHECK_VALUE(p != kMerged || detail::may_merge(x), "peftkern: the merged path is never used for ",
                    x.scalar_type(), " (the small ΔW would be rounded away against W0); use 'fused' or 'addmm'");
  return p;
}

Path unmerged(const Tensor& x, int64_t r) { return detail::streams(x) && r <= kMaxFusedRank ? kFused : kAddmm; }

}  // namespace

Path choose_unmerged(const Tensor& x, int64_t r) { return unmerged(x, r); }

bool keeps_merged_weight(int64_t r) { return r > kMaxFusedRank; }

Path choose_forward(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& x, int64_t forced, bool dropout) {
  Path p = check_forced(forced);
  if (p != kAuto) return validate(p, x, dropout);
  if (dropout) return unmerged(x, r);  // ΔW folded into W0 cannot see a dropped input
  if (r > kMaxFusedRank)  // FLOP-bound: multiply-adds of the W_eff build against the two skinny GEMMs
    return detail::may_merge(x) && double(N) * double(K) < double(M) * double(K + N) ? kMerged : unmerged(x, r);
  const double fused = double(M) * double(K + N), merged = kMergeForward * 2.0 * double(N) * double(K);
  return detail::may_merge(x) && merged < fused ? kMerged : unmerged(x, r);
}

Path choose_backward(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& x, int64_t forced,
                     bool have_merged_weight, bool dropout) {
  // A merged backward without the forward's W_eff rebuilds it for dx and streams the rank-r gradients
  // on the CPU (adapter.cpp): CPU float32/float64 only. A CUDA (or meta) float32 call with many rows
  // once chose it and ran the CPU streaming pass on device tensors.
  const bool can_merge = have_merged_weight || detail::streams(x);
  Path p = check_forced(forced);
  if (p != kAuto) {
    p = validate(p, x, dropout);
    TORCH_CHECK_VALUE(p != kMerged || can_merge, "peftkern: the merged backward needs the forward's merged weight or ",
                      "CPU float32/float64 tensors, got ", x.scalar_type(), " on ", x.device(), "; use path 'addmm'");
    return p;
  }
  if (dropout) return unmerged(x, r);
  if (have_merged_weight) return kMerged;  // dx = dy·W_eff is then as cheap as the base GEMM alone
  const double fused = double(M) * double(K), merged = kMergeBackward * 2.0 * double(N) * double(K);
  return detail::may_merge(x) && can_merge && merged < fused ? kMerged : unmerged(x, r);
}

void record_path(const char* op, bool backward, Path path) {
  g_counts[op_index(op)][backward ? 1 : 0][path].fetch_add(1, std::memory_order_relaxed);
}

std::vector<std::tuple<std::string, int64_t>> path_counts() {
  std::vector<std::tuple<std::string, int64_t>> out;
  for (size_t o = 0; o < kOps.size(); ++o)
    for (int d = 0; d < 2; ++d)
      for (size_t p = 1; p < kPathNames.size(); ++p) {
        const int64_t n = g_counts[o][d][p].load(std::memory_order_relaxed);
        if (n) out.emplace_back(std::string(kOps[o]) + (d ? ".backward." : ".forward.") + kPathNames[p], n);
      }
  return out;
}

void reset_path_counts() {
  for (auto& op : g_counts)
    for (auto& dir : op)
      for (auto& c : dir) c.store(0, std::memory_order_relaxed);
}

std::string path_name(int64_t path) {
  TORCH_CHECK_VALUE(path >= 0 && path < int64_t(kPathNames.size()), "peftkern: no path with code ", path);
  return kPathNames[path];
}

std::tuple<std::string, std::string> planned_paths(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& like,
                                                   int64_t forced, bool dropout) {
  const Path forward = choose_forward(M, N, K, r, like, forced, dropout);
  const bool kept = forward == kMerged && keeps_merged_weight(r);
  return {path_name(forward), path_name(choose_backward(M, N, K, r, like, forced, kept, dropout))};
}

}  // namespace peftkern
