#include "../ops.h"
#include "lowrank.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace peftkern {

std::string build_info() {
  std::string info = std::string("cpu kernels=") + lowrank::isa_name();
#ifdef _OPENMP
  info += " openmp(max_threads=" + std::to_string(omp_get_max_threads()) + ")";
#else
  info += " no-openmp";
#endif
#ifdef PEFTKERN_WITH_CUDA
  info += " cuda";
#endif
  return info;
}

}  // namespace peftkern
