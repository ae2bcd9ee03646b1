// DoRA's column scale, forward and backward (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
// Adaptation"; peftkern/ops/functions.py's DoraFunction composes these with the adapter op):
//
//   forward    y = g⊙z + b                    g = m / ‖W0 + ΔW‖_row  [N], z = W0·x + ΔW·x  [M, N]
//   backward   dz = dy⊙g,  dg = Σ_m dy⊙z      with z = (y − b)/g read from the output when only y was kept
//
// Both are one pass over [M, N]: the forward in place on the adapter's output (nothing else
// holds it), the backward reading dy (and y or z) once and writing dz, with dg accumulated per
// thread in the accumulation type and reduced at the end. Without dz (`need_dz` false: the caller
// folded g into W0 and v, so the adapter's backward takes dy itself) the backward only reads.
// CPU tensors of every float dtype here; tensors on other devices (a CUDA build, meta) take the
// torch backend's ATen sequence (peftkern/ops/backends/torch.py), so every caller, the DoRA node
// included, has one entry point.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"

namespace peftkern {
namespace {

// wide_g: g may have any float dtype (dora_scale_backward without dz)
void check_scale(const Tensor& z, const Tensor& g, const OptTensor& bias, const char* op, bool wide_g = false) {
  TORCH_CHECK_VALUE(z.dim() == 2, "peftkern.", op, ": the output must be [M, N], got ", z.sizes());
  detail::check_vector(g, z.size(1), op, "g");
  detail::check_vector(bias, z.size(1), op, "bias");
  if (wide_g) {
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), "peftkern.", op, ": g has dtype ", g.scalar_type(),
                     "; it must be a float dtype");
    TORCH_CHECK_VALUE(g.device() == z.device(), "peftkern.", op, ": g is on ", g.device(), " but x is on ", z.device());
  } else {
    detail::check_same(z, g, op, "g");
  }
  detail::check_same(z, bias, op, "bias");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The torch backend's dora_scale_forward and dora_scale_backward, op for op (its comments say why
// bf16 multiplies in its own dtype): the same results on every device as the Python Function's.
Tensor scale_forward_aten(const Tensor& z, const Tensor& g, const OptTensor& bias) {
  if (!detail::has(bias)) return z.mul_(g);
  Tensor y = z;  // a handle on z's storage: y = b + z⊙g written over z
  return at::addcmul_out(y, *bias, z, g);
}

std::tuple<OptTensor, OptTensor> scale_backward_aten(const Tensor& dy, const Tensor& saved, const Tensor& g,
                                                     const OptTensor& bias, bool from_output, bool need_g,
                                                     bool need_dz) {
  OptTensor dz = need_dz ? OptTensor(dy * g) : OptTensor();
  if (!need_g) return {dz, OptTensor()};
  const at::ScalarType acc = acc_type(dy.scalar_type());
  const bool minus_bias = from_output && detail::has(bias);
  const Tensor d = dy.scalar_type() == at::kBFloat16 && !minus_bias ? dy : dy.to(acc);
  Tensor dg = at::sum(d * saved, {0}, false, acc);
  if (!from_output) return {dz, OptTensor(dg.to(g.scalar_type()))};
  if (minus_bias) dg.sub_(at::sum(d, {0}, false, acc) * *bias);
  Tensor out = at::empty_like(g);  // the division in fp32, written in g's dtype: one launch
  at::div_out(out, dg, g);
  return {dz, OptTensor(out)};
}

// rows per task: enough work per task to amortise the split, and whole rows
int64_t grain(int64_t N) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(N, 1)); }

// one row of the backward: dz = dy⊙g, and acc += dy⊙(saved − b) when acc is given
template <typename scalar_t, typename O>
inline void row_scale_backward(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ saved,
                               const scalar_t* __restrict__ g, const scalar_t* __restrict__ bias,
                               scalar_t* __restrict__ dz, O* __restrict__ acc, int64_t N) {
  if (dz != nullptr)
    for (int64_t n = 0; n < N; ++n) dz[n] = static_cast<scalar_t>(O(dy[n]) * O(g[n]));
  if (acc == nullptr) return;
  if (bias != nullptr) {
    for (int64_t n = 0; n < N; ++n) acc[n] += O(dy[n]) * (O(saved[n]) - O(bias[n]));
  } else {
    for (int64_t n = 0; n < N; ++n) acc[n] += O(dy[n]) * O(saved[n]);
  }
}

}  // namespace

Tensor dora_scale_forward(const Tensor& z, const Tensor& g, const OptTensor& bias) {
  check_scale(z, g, bias, "dora_scale_forward");
  if (!z.device().is_cpu()) return scale_forward_aten(z, g, bias);
  Tensor y = z.is_contiguous() ? z : z.contiguous();  // in place on the adapter's own output
  const Tensor gc = g.contiguous();
  const OptTensor bc = detail::contiguous(bias);
  const int64_t M = y.size(0), N = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "peftkern.dora_scale_forward", [&] {
    using O = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* bp = detail::ptr_or_null<scalar_t>(bc);
    at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        scalar_t* row = yp + m * N;
        if (bp != nullptr) {
          for (int64_t n = 0; n < N; ++n) row[n] = static_cast<scalar_t>(O(gp[n]) * O(row[n]) + O(bp[n]));
        } else {
          for (int64_t n = 0; n < N; ++n) row[n] = static_cast<scalar_t>(O(gp[n]) * O(row[n]));
        }
      }
    });
  });
  return y;
}

std::tuple<OptTensor, OptTensor> dora_scale_backward(const Tensor& dy, const Tensor& saved, const Tensor& g,
                                                     const OptTensor& bias, bool from_output, bool need_g,
                                                     bool need_dz) {
  // Without dz, g may be wider than dy (DoRA's folded route passes an fp32 m itself, so m is cast
  // neither way): the pass then reads g only in its final division, done in g's dtype.
  const bool wide_g = !need_dz && g.scalar_type() != dy.scalar_type();
  check_scale(dy, g, bias, "dora_scale_backward", wide_g);
  TORCH_CHECK_VALUE(saved.sizes() == dy.sizes(), "peftkern.dora_scale_backward: the saved output has shape ",
                    saved.sizes(), " but dy has ", dy.sizes());
  detail::check_same(dy, saved, "dora_scale_backward", "saved");
  if (!dy.device().is_cpu()) return scale_backward_aten(dy, saved, g, bias, from_output, need_g, need_dz);
  const Tensor dyc = dy.contiguous(), sc = saved.contiguous(), gc = wide_g ? Tensor() : g.contiguous();
  const OptTensor bc = detail::contiguous(bias);
  const int64_t M = dy.size(0), N = dy.size(1);
  Tensor dz = need_dz ? at::empty_like(dyc) : Tensor();
  OptTensor dg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "peftkern.dora_scale_backward", [&] {
    using O = at::opmath_type<scalar_t>;
    const scalar_t* d = dyc.data_ptr<scalar_t>();
    const scalar_t* s = sc.data_ptr<scalar_t>();
    const scalar_t* gp = wide_g ? nullptr : gc.data_ptr<scalar_t>();  // read for dz and the division only
    const scalar_t* bp = detail::ptr_or_null<scalar_t>(bc);
    scalar_t* out = need_dz ? dz.data_ptr<scalar_t>() : nullptr;
    const int threads = at::get_num_threads();
    std::vector<O> partial(need_g ? static_cast<size_t>(threads) * N : 0, O(0));
    const bool minus_bias = from_output && bp != nullptr;
    at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
      O* acc = need_g ? partial.data() + static_cast<size_t>(at::get_thread_num()) * N : nullptr;
      for (int64_t m = begin; m < end; ++m) {
        // restrict-qualified rows and the branches outside the n loop let the compiler
        // vectorise it: with dz and the fp32 accumulator possibly aliasing dy (all float),
        // GCC kept it scalar, ten times slower than the pass without dg.
        row_scale_backward<scalar_t, O>(d + m * N, s + m * N, gp, minus_bias ? bp : nullptr,
                                        out != nullptr ? out + m * N : nullptr, acc, N);
      }
    });
    if (need_g && wide_g) {  // the sums in the accumulation type, then one division in g's dtype
      Tensor sums = at::empty({N}, dy.options().dtype(c10::CppTypeToScalarType<O>::value));
      O* sp = sums.data_ptr<O>();
      for (int64_t n = 0; n < N; ++n) {
        O total = 0;
        for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * N + n];
        sp[n] = total;
      }
      if (from_output) {
        Tensor result = at::empty_like(g);
        at::div_out(result, sums, g);
        dg = result;
      } else {
        dg = sums.to(g.scalar_type());
      }
    } else if (need_g) {
      Tensor result = at::empty({N}, g.options());
      scalar_t* rp = result.data_ptr<scalar_t>();
      for (int64_t n = 0; n < N; ++n) {
        O total = 0;
        for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * N + n];
        rp[n] = static_cast<scalar_t>(from_output ? total / O(gp[n]) : total);
      }
      dg = result;
    }
  });
  return {need_dz ? OptTensor(dz) : OptTensor(), dg};
}

}  // namespace peftkern
