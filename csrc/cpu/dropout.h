// Dropout on the adapter's input without a stored mask (PEFT's lora_dropout, inverted).
//
// Element (m, k) of an [M, K] input is kept when a counter-based hash of (seed, m·K + k)
// maps to a uniform number >= p, and kept elements are scaled by 1/(1-p). The hash is
// SplitMix64's finaliser (Steele et al. 2014), so the mask is a pure function of the seed
// and the position: the backward recomputes it where it needs it, the fused row pass
// inlines it, and the ATen path builds the same mask as a tensor (dropout_mask). No
// M×K mask or dropped copy of x outlives the call that uses it.
#pragma once
#include <cstdint>

namespace peftkern {
namespace dropout {

inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// True when element `index` (row-major position m·K + k) of the input is kept.
inline bool keeps(uint64_t seed, int64_t index, double p) {
  const uint64_t z = mix(seed + (static_cast<uint64_t>(index) + 1) * 0x9E3779B97F4A7C15ULL);
  return static_cast<double>(z >> 11) * 0x1.0p-53 >= p;
}

}  // namespace dropout
}  // namespace peftkern
