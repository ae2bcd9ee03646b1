// AdaLoRA's masking step for every adapter in one call, on the device, without reading
// the threshold back to the host:  values[i][scores[i] <= threshold] = 0   (in place).
//
// Same comparison as PEFT's `lora_E.masked_fill_(triplet_ipt <= threshold, 0.0)`; NaN
// scores compare false and are kept, as there. CPU tensors; on CUDA the same line of
// torch (`v.masked_fill_(s <= threshold_tensor, 0)`) is already sync-free.
#include <ATen/Parallel.h>

#include "common.h"

namespace peftkern {

void mask_below_(const std::vector<Tensor>& values, const std::vector<Tensor>& scores, const Tensor& threshold) {
  TORCH_CHECK_VALUE(values.size() == scores.size(), "peftkern.mask_below_: values and scores must have the same "
                    "length, got ", values.size(), " and ", scores.size());
  TORCH_CHECK_VALUE(threshold.numel() == 1, "peftkern.mask_below_: threshold must hold one value, got shape ",
                    threshold.sizes());
  for (size_t i = 0; i < values.size(); ++i) {
    TORCH_CHECK_VALUE(values[i].numel() == scores[i].numel(), "peftkern.mask_below_: values[", i, "] has ",
                      values[i].numel(), " elements but scores[", i, "] has ", scores[i].numel());
    TORCH_CHECK_VALUE(values[i].device().is_cpu() && scores[i].device().is_cpu(),
                      "peftkern.mask_below_: CPU tensors only (values[", i, "] is on ", values[i].device(),
                      "); on CUDA use values.masked_fill_(scores <= threshold, 0)");
    TORCH_CHECK_VALUE(values[i].is_contiguous(), "peftkern.mask_below_: values[", i,
                      "] is modified in place and must be contiguous");
    TORCH_CHECK_TYPE(at::isFloatingType(values[i].scalar_type()) && at::isFloatingType(scores[i].scalar_type()),
                     "peftkern.mask_below_: values and scores must be floating point");
  }
  TORCH_CHECK_VALUE(threshold.device().is_cpu(), "peftkern.mask_below_: threshold must be a CPU tensor");
  const double limit = threshold.to(at::kDouble).reshape({}).item<double>();  // a CPU read: no device sync
  at::parallel_for(0, int64_t(values.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      Tensor v = values[i], s = scores[i].contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "peftkern.mask_below_.v", [&] {
        using value_t = scalar_t;
        value_t* vp = v.data_ptr<value_t>();
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "peftkern.mask_below_.s", [&] {
          const scalar_t* sp = s.data_ptr<scalar_t>();
          for (int64_t k = 0; k < v.numel(); ++k)
            if (static_cast<double>(sp[k]) <= limit) vp[k] = value_t(0);
        });
      });
    }
  });
}

}  // namespace peftkern
