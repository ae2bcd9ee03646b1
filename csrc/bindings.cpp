// pybind11 bindings of peftkern._C. Each op lives in its own file under csrc/cpu (the C++
// autograd node in csrc/autograd); this file only exposes them. The autograd Functions that
// call these are in peftkern/ops/functions.py, through peftkern/ops/backends/cpp.py. A CUDA
// build (PEFTKERN_WITH_CUDA) runs the same sources on CUDA tensors through ATen's GEMMs.
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;
using namespace peftkern;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftkern compiled ops (C++ for the CPU; CUDA tensors through ATen in a CUDA build)";
  m.def("build_info", &build_info, "How this extension was built (OpenMP threads, CUDA)");
#ifdef PEFTKERN_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif

  // Path codes for the `path` argument of the adapter ops (0 lets the cost model choose).
  m.attr("PATH_AUTO") = int64_t(kAuto);
  m.attr("PATH_FUSED") = int64_t(kFused);
  m.attr("PATH_MERGED") = int64_t(kMerged);
  m.attr("PATH_ADDMM") = int64_t(kAddmm);
  // Ranks above it are GEMM-sized: the merged path may run, and its forward keeps W_eff.
  m.attr("MAX_FUSED_RANK") = kMaxFusedRank;
  m.def("path_name", &path_name, py::arg("path"));
  m.def("path_counts", &path_counts, "(name, calls) of every path that ran since the last reset");
  m.def("reset_path_counts", &reset_path_counts);
  m.def("planned_paths", &planned_paths, "(forward, backward) path the cost model picks for these sizes",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"), py::arg("like"), py::arg("path") = int64_t(kAuto),
        py::arg("dropout") = false);
  m.def("choose_unmerged", [](const at::Tensor& like, int64_t r) { return int64_t(choose_unmerged(like, r)); },
        "the path code the cost model takes where merging is not an option", py::arg("like"), py::arg("r"));
  m.def("dropout_mask", &dropout_mask, "keep[m, k] in {0, 1} of the dropout every op here applies for (seed, p)",
        py::arg("seed"), py::arg("M"), py::arg("K"), py::arg("p"), py::arg("like"));

  m.def("adapter_forward", &adapter_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("A"),
        py::arg("B"), py::arg("u"), py::arg("v"), py::arg("scale"), py::arg("dropout"), py::arg("seed"),
        py::arg("path") = int64_t(kAuto));
  m.def("adapter_backward", &adapter_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("A"),
        py::arg("B"), py::arg("u"), py::arg("v"), py::arg("h"), py::arg("w_eff"), py::arg("scale"), py::arg("dropout"),
        py::arg("seed"), py::arg("needs"), py::arg("path") = int64_t(kAuto));
  m.def("adapter_apply", &adapter_apply, "the adapter as one autograd node (forward and backward in C++)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("A"), py::arg("B"), py::arg("u"), py::arg("v"),
        py::arg("scale"), py::arg("dropout"), py::arg("seed"), py::arg("path") = int64_t(kAuto));
  m.def("dora_apply", &dora_apply, "DoRA as one autograd node (forward and backward in C++), without dropout",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("A"), py::arg("B"), py::arg("u"), py::arg("v"),
        py::arg("m"), py::arg("norm"), py::arg("g"), py::arg("scale"), py::arg("folded"),
        py::arg("path") = int64_t(kAuto));
  m.def("set_dora_inplace_advice", &set_dora_inplace_advice,
        "the message the DoRA node gives when a tensor it saved was edited in place", py::arg("text"));
  m.def("dora_norm_in_forward", &dora_norm_in_forward, "whether the unfolded DoRA forward gives the norm itself",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"), py::arg("like"), py::arg("path") = int64_t(kAuto));
  m.def("shrink_forward", &shrink_forward, py::arg("x"), py::arg("A"), py::arg("u"), py::arg("dropout"),
        py::arg("seed"));
  m.def("shrink_backward", &shrink_backward, py::arg("dhu"), py::arg("x"), py::arg("A"), py::arg("u"), py::arg("h"),
        py::arg("dropout"), py::arg("seed"), py::arg("needs"));
  m.def("expand_forward", &expand_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("hu"),
        py::arg("B"), py::arg("v"), py::arg("scale"));
  m.def("expand_backward", &expand_backward, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("hu"),
        py::arg("B"), py::arg("v"), py::arg("scale"), py::arg("needs"));
  m.def("hypernet_forward", &hypernet_forward, py::arg("E"), py::arg("W1"), py::arg("b1"), py::arg("W2"),
        py::arg("b2"));
  m.def("hypernet_backward", &hypernet_backward, py::arg("dout"), py::arg("E"), py::arg("W1"), py::arg("W2"),
        py::arg("pre"), py::arg("needs"));

  m.def("dora_scale_forward", &dora_scale_forward, "DoRA: y = g * z + bias, in place on z", py::arg("z"),
        py::arg("g"), py::arg("bias"));
  m.def("dora_scale_backward", &dora_scale_backward, "DoRA: (dy * g, sum over rows of dy * z)", py::arg("dy"),
        py::arg("saved"), py::arg("g"), py::arg("bias"), py::arg("from_output"), py::arg("need_g"),
        py::arg("need_dz"));

  m.def("update_importance_", &update_importance_, "AdaLoRA importance update of every tensor, in place",
        py::arg("params"), py::arg("grads"), py::arg("exp_avg_ipt"), py::arg("exp_avg_unc"), py::arg("beta1"),
        py::arg("beta2"));
  m.def("gram_distances", &gram_distances, "‖XᵀX − I‖_F for each of columns, then ‖XXᵀ − I‖_F for each of rows",
        py::arg("columns"), py::arg("rows"));
  m.def("gram_distances_backward", &gram_distances_backward, "gradients of Σ grad[i]·distance[i]", py::arg("grad"),
        py::arg("distances"), py::arg("D"), py::arg("columns"), py::arg("rows"));
}
