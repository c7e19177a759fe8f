// The Python module cmfast._C. Its tensor ops register themselves with the torch dispatcher
// (TORCH_LIBRARY in each csrc/<op>.cpp); this file binds the eager entry points and tells Python how the library
// was built and how its CUDA kernels plan a call.
#include <torch/csrc/utils/pybind.h>

#include "../kernels/group_norm_plan.h"
#include "cpu_features.h"
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
  m.def("transpose_last2", &cmfast::transpose_last2, "out[n, k, r] = src[n, r, k] (CPU, contiguous (N, R, K) -> (N, K, R))",
        py::arg("src"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("cpu_runs_amx_bf16", &cmfast::cpu_runs_amx_bf16,
        "whether this CPU and OS run AMX-BF16 tile instructions (the AMX kernels: attention, Winograd)");
  m.def("winograd_bf16_engines", &cmfast::winograd_bf16_engines,
        "the bf16 Winograd convolution's engines this CPU runs, fastest first (amx, dot)");
  m.def("attention_cpu_kernels", &cmfast::attention_cpu_kernels, "the attention CPU kernels this CPU runs");
  m.def("attention_cpu", &cmfast::attention_cpu, "the attention op's CPU kernel `kernel` (f32 or bf16) on qkv into out",
        py::arg("qkv"), py::arg("num_heads"), py::arg("out"), py::arg("kernel"), py::call_guard<py::gil_scoped_release>());
  m.def("cpu_memory_enter", &cmfast::cpu_memory_enter,
        "start a scope where large CPU tensors reuse freed memory (kept up to cap_bytes); true when it is in effect",
        py::arg("cap_bytes"));
  m.def("cpu_memory_exit", &cmfast::cpu_memory_exit, "end a scope of cpu_memory_enter");
  m.def("cpu_memory_trim", &cmfast::cpu_memory_trim, "free the kept blocks", py::call_guard<py::gil_scoped_release>());
  m.def("cpu_memory_stats", &cmfast::cpu_memory_stats, "the reusing allocator's blocks and counts");
#ifdef CMFAST_WITH_CUDA
  m.def("group_norm_cuda_path", &cmfast::group_norm_cuda_path, "which CUDA kernel group_norm runs for x");
#endif
  m.def(
      "group_norm_cuda_plan",
      [](int64_t batch, int64_t channels, int64_t spatial, int64_t groups, bool channels_last, int element_bytes,
         int alignment, int sms, int shared_optin, int major, bool clusters) {
        const cmfast::GroupNormLaunch plan = cmfast::plan_group_norm(
            {batch, channels, spatial, groups, channels_last}, element_bytes, alignment, {sms, shared_optin, major},
            clusters);
        py::dict d;
        d["kernel"] = plan.kernel();
        d["vec"] = plan.vec;
        d["items"] = plan.items;
        d["splits"] = plan.splits;
        d["shared_bytes"] = plan.shared_bytes;
        d["workspace_floats"] = plan.workspace_floats;
        return d;
      },
      "how the CUDA group_norm would run a shape on a device with these limits (kernels/group_norm_plan.h), in any "
      "build",
      py::arg("batch"), py::arg("channels"), py::arg("spatial"), py::arg("groups"), py::arg("channels_last"),
      py::arg("element_bytes"), py::arg("alignment") = 16, py::arg("sms"), py::arg("shared_optin"), py::arg("major"),
      py::arg("clusters") = true);
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
