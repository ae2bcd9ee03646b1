// pybind11 bindings of peftkern._C. Each op lives in its own file under csrc/cpu (and
// csrc/cuda when built with CUDA); this file only exposes them.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftkern compiled ops (C++ for CPU, CUDA when built with it)";
  m.def("build_info", &peftkern::build_info, "How this extension was built (OpenMP threads, CUDA)");
}
