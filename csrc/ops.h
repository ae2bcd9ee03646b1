// Declarations of every op in peftkern._C. One op per source file (csrc/cpu/<op>.cpp).
//
// Shapes follow peftkern/ops/reference.py: x [M, K] (callers flatten leading dims),
// weight [N, K], bias [N], A [r, K], B [N, r], u [r], v [N], hu [M, r]. Optional
// tensors are None in Python. Backward functions take the `needs` flags of
// ctx.needs_input_grad and return one tensor (or None) per differentiable input.
#pragma once
#include <ATen/ATen.h>  // not torch/extension.h: only bindings.cpp needs Python and pybind11 (faster builds)

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace peftkern {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::string build_info();

// --- which code path an adapter call runs (paths.cpp) ---------------------------------
// kFused: row-streaming rank-r pass + base GEMM accumulating on top (CPU float/double).
// kMerged: W_eff = W0 + s·(v⊙B)·(u⊙A) and one GEMM (float/double only: never bf16/fp16).
// kAddmm: the ATen GEMM sequence (any dtype and device).
enum Path : int64_t { kAuto = 0, kFused = 1, kMerged = 2, kAddmm = 3 };
// With dropout the merged path is never chosen (and forcing it is an error).
Path choose_forward(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& x, int64_t forced, bool dropout);
// have_merged_weight: the forward ran merged and kept W_eff (see keeps_merged_weight).
Path choose_backward(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& x, int64_t forced,
                     bool have_merged_weight, bool dropout);
// The largest rank the row-streaming fused pass takes; above it ranks are GEMM-sized (paths.cpp).
constexpr int64_t kMaxFusedRank = 32;
// Whether a merged forward keeps W_eff for the backward: for GEMM-sized ranks, where
// rebuilding it would cost N·K·r multiply-adds again (it costs N·K memory until then).
bool keeps_merged_weight(int64_t r);
// Fused or addmm for an op that has no merged form (shrink, expand).
Path choose_unmerged(const Tensor& x, int64_t r);
void record_path(const char* op, bool backward, Path path);
std::vector<std::tuple<std::string, int64_t>> path_counts();
void reset_path_counts();
std::string path_name(int64_t path);
std::tuple<std::string, std::string> planned_paths(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& like,
                                                   int64_t forced, bool dropout);

// --- dropout on the adapter's input (dropout.h, dropout.cpp) ------------------------------
// keep[m, k] in {0, 1} as a tensor like `like` (dtype, device): the mask every op of this
// extension applies for (seed, p), built here only for the ATen path and for tests.
Tensor dropout_mask(int64_t seed, int64_t M, int64_t K, double p, const Tensor& like);

// --- adapter: y = x·W0ᵀ + b + s·(v⊙(B·(u⊙(A·D(x))))) (adapter.cpp) ----------------------
// D is dropout with probability `dropout` and mask seed `seed` (dropout.h; 0 = none).
// Returns (y, h = D(x)·Aᵀ or None when the merged path ran, W_eff when a merged forward
// kept it or None, the path that ran). The backward takes both saved tensors back; its x
// may be None when no gradient reads it (then h must be given if B, u or v is trained).
std::tuple<Tensor, OptTensor, OptTensor, int64_t> adapter_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                       const Tensor& A, const Tensor& B, const OptTensor& u,
                                                       const OptTensor& v, double scale, double dropout, int64_t seed,
                                                       int64_t path);
// Returns (dx, dweight, dbias, dA, dB, du, dv, the path that ran).
std::tuple<std::vector<OptTensor>, int64_t> adapter_backward(const Tensor& dy, const OptTensor& x, const Tensor& weight,
                                                             const Tensor& A, const Tensor& B, const OptTensor& u,
                                                             const OptTensor& v, const OptTensor& h,
                                                             const OptTensor& w_eff, double scale, double dropout,
                                                             int64_t seed, std::vector<bool> needs, int64_t path);

// --- the adapter as one C++ autograd node (csrc/autograd/adapter_node.cpp) -----------------
// y = adapter_forward(...)'s y for x [..., K], differentiable: its backward calls adapter_backward
// with the needs_input_grad of x, weight, bias, A, B, u, v. The eager path of the cpp backend.
Tensor adapter_apply(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A, const Tensor& B,
                     const OptTensor& u, const OptTensor& v, double scale, double dropout, int64_t seed, int64_t path);

// --- DoRA as one C++ autograd node (csrc/autograd/dora_node.cpp) ----------------------------
// y = g⊙(adapter without bias) + b, g = m / norm (functions.DoraFunction without dropout; `folded` is
// functions.dora_folds' choice), differentiable in x, weight, bias, A, B, u, v and m. norm [N] (fp32
// at least) and g = m / norm [N] in x's dtype, both or neither: neither only where
// dora_norm_in_forward says the forward's merged weight gives the norm.
Tensor dora_apply(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& A, const Tensor& B,
                  const OptTensor& u, const OptTensor& v, const Tensor& m, const OptTensor& norm, const OptTensor& g,
                  double scale, bool folded, int64_t path);
// Whether the unfolded forward for these sizes keeps W_eff = W0 + ΔW (merged path, GEMM-sized rank),
// whose row norms are DoRA's norm.
bool dora_norm_in_forward(int64_t M, int64_t N, int64_t K, int64_t r, const Tensor& like, int64_t path);
// The advice the node gives when a tensor it saved was edited in place. Its text is Python's
// (functions.DORA_INPLACE_ADVICE, set once when the backend loads), so it is written once.
void set_dora_inplace_advice(const std::string& text);

// --- joint-QKV form (shrink.cpp, expand.cpp) -------------------------------------------
// shrink: hu = u⊙(D(x)·Aᵀ). Returns (hu, h).
std::tuple<Tensor, Tensor> shrink_forward(const Tensor& x, const Tensor& A, const OptTensor& u, double dropout,
                                          int64_t seed);
// Returns (dx, dA, du); x may be None unless A is trained, h None unless u is.
std::vector<OptTensor> shrink_backward(const Tensor& dhu, const OptTensor& x, const Tensor& A, const OptTensor& u,
                                       const OptTensor& h, double dropout, int64_t seed, std::vector<bool> needs);
// expand: y = x·W0ᵀ + b + s·(v⊙(B·hu)).
Tensor expand_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& hu, const Tensor& B,
                      const OptTensor& v, double scale);
// Returns (dx, dweight, dbias, dhu, dB, dv); x may be None unless the weight is trained.
std::vector<OptTensor> expand_backward(const Tensor& dy, const OptTensor& x, const Tensor& weight, const Tensor& hu,
                                       const Tensor& B, const OptTensor& v, double scale, std::vector<bool> needs);

// --- hypernetwork: GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 (hypernet.cpp) --------------------------------
// Returns (out, pre) where pre = E·W1ᵀ + b1 is what backward needs.
std::tuple<Tensor, Tensor> hypernet_forward(const Tensor& E, const Tensor& W1, const OptTensor& b1, const Tensor& W2,
                                            const OptTensor& b2);
// Returns (dE, dW1, db1, dW2, db2).
std::vector<OptTensor> hypernet_backward(const Tensor& dout, const Tensor& E, const Tensor& W1, const Tensor& W2,
                                         const Tensor& pre, std::vector<bool> needs);

// --- DoRA's column scale (dora.cpp) ---------------------------------------------------------
// forward: y = g⊙z + bias, in place on z [M, N] (returned). backward: (dz = dy⊙g or None, dg = Σ_m dy⊙z
// or None), with z = (saved − bias)/g when `from_output` (saved is y), else z = saved; dz only when
// `need_dz` (a caller that folded g into the weight reduces dg alone: a read of dy and y, no write; g
// may then be wider than dy, DoRA's fp32 m, and dg is in g's dtype).
Tensor dora_scale_forward(const Tensor& z, const Tensor& g, const OptTensor& bias);
std::tuple<OptTensor, OptTensor> dora_scale_backward(const Tensor& dy, const Tensor& saved, const Tensor& g,
                                                     const OptTensor& bias, bool from_output, bool need_g,
                                                     bool need_dz);

// --- AdaLoRA (importance.cpp, orthogonality.cpp) -------------------------------------------
// The importance scores of every tensor, in place (CPU tensors; CUDA ones take torch's foreach ops).
void update_importance_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                        const std::vector<Tensor>& exp_avg_ipt, const std::vector<Tensor>& exp_avg_unc, double beta1,
                        double beta2);
// The orthogonality regulariser's distances ‖G − I‖_F, one per matrix: G = XᵀX for each of
// `columns` (P [N, r]), then G = XXᵀ for each of `rows` (Q [r, K]) (orthogonality.cpp).
// Returns (distances, D): D holds every G − I (float64, flat) for the backward.
std::tuple<Tensor, Tensor> gram_distances(const std::vector<Tensor>& columns, const std::vector<Tensor>& rows);
// Gradients of Σ_i grad[i]·d_i with respect to every matrix, in the same order.
std::vector<Tensor> gram_distances_backward(const Tensor& grad, const Tensor& distances, const Tensor& D,
                                            const std::vector<Tensor>& columns, const std::vector<Tensor>& rows);

}  // namespace peftkern
