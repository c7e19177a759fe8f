// The Python module cmfast._C. Its tensor ops register themselves with the torch dispatcher
// (TORCH_LIBRARY in each csrc/<op>.cpp); this file only tells Python how the library was built.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

#ifdef CMFAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define CMFAST_STR2(x) #x
#define CMFAST_STR(x) CMFAST_STR2(x)

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "cmfast compiled kernels (CPU, and CUDA when built with it)";
  m.def("group_norm", &cmfast::group_norm, "the group_norm op's eager call: layout, output, kernel",
        py::call_guard<py::gil_scoped_release>());  // other Python threads run meanwhile
#ifdef CMFAST_WITH_CUDA
  m.def("group_norm_cuda_path", &cmfast::group_norm_cuda_path, "which CUDA kernel group_norm runs for x");
#endif
  m.def("build_info", [] {
    py::dict info;
    info["source_hash"] = CMFAST_STR(CMFAST_SOURCE_HASH);
    info["torch_version"] = CMFAST_STR(CMFAST_TORCH_VERSION);
    info["cpu_flags"] = CMFAST_STR(CMFAST_CPU_FLAGS);
#ifdef CMFAST_WITH_CUDA
    info["cuda"] = true;
    info["cuda_runtime"] = CUDART_VERSION;
    info["cuda_arch_list"] = CMFAST_STR(CMFAST_CUDA_ARCHS);
#else
    info["cuda"] = false;
#endif
    return info;
  });
}
